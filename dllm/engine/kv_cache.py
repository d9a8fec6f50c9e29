"""The K/V pool: allocated once per engine, one slot per running request.

Prefix caching: a slot remembers which prompt's K/V sit at its start (its key), also once it is free.
A free slot keeps them until it is handed to a request with another prompt, so a later request with
the same key takes that slot and skips its prompt's forward; a running slot's prompt K/V can be copied.
"""

from __future__ import annotations

import torch

from ..config import LLaDAConfig
from ..model import CacheView


class CacheFullError(RuntimeError):
    pass


class KVCache:
    """Preallocated keys/values [n_layers, n_slots, capacity, n_kv_heads, head_dim].

    A slot holds one request: its committed context (prompt + finished blocks) at [0, length)
    followed by scratch positions where in-flight block K/V are written by each forward.
    With `scratch_slot`, one more slot (index num_slots) is never handed out: padding rows of a
    CUDA graph write there.
    """

    def __init__(self, config: LLaDAConfig, num_slots: int, capacity: int, *, device, dtype,
                 scratch_slot: bool = False) -> None:
        if num_slots < 1 or capacity < 1:
            raise ValueError(f"KV cache needs num_slots >= 1 and capacity >= 1, got {num_slots}, {capacity}")
        shape = (config.n_layers, num_slots + int(scratch_slot), capacity, config.n_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.capacity = capacity
        self.num_slots = num_slots
        self.scratch_slot = num_slots if scratch_slot else None
        self._free = list(range(num_slots))  # oldest release first
        self._key_of: dict[int, object] = {}  # slot -> the key of the prompt K/V at its start
        self._slots_of: dict[object, set[int]] = {}  # key -> slots holding that prompt

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def used_slots(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self, key=None) -> int:
        """A free slot: one holding `key`'s prompt if there is one, else one holding no prompt, else the
        one released longest ago (its prompt is forgotten)."""
        if not self._free:
            raise CacheFullError("no free KV-cache slot")
        holding = self._slots_of.get(key, ()) if key is not None else ()
        slot = next((s for s in self._free if s in holding), None)
        if slot is None:
            slot = next((s for s in self._free if s not in self._key_of), self._free[0])
            self.forget(slot)
        self._free.remove(slot)
        return slot

    def release(self, slot: int) -> None:
        """Free a slot; the prompt it holds (if any) stays findable until the slot is handed out again."""
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.append(slot)

    # ----- prefix caching --------------------------------------------------------------------

    def remember(self, slot: int, key) -> None:
        """`slot` now holds the prompt K/V of `key` at its start (written by a prefill or copied)."""
        self.forget(slot)
        self._key_of[slot] = key
        self._slots_of.setdefault(key, set()).add(slot)

    def forget(self, slot: int) -> None:
        key = self._key_of.pop(slot, None)
        if key is not None:
            self._slots_of[key].discard(slot)
            if not self._slots_of[key]:
                del self._slots_of[key]

    def holds(self, slot: int, key) -> bool:
        return self._key_of.get(slot) == key

    def find(self, key) -> int | None:
        """A slot holding `key`'s prompt K/V (running or free), or None."""
        return next(iter(self._slots_of.get(key, ())), None)

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Copy the K/V of positions [0, length) from slot `source` to slot `target` (a device copy)."""
        for pool in (self.k, self.v):
            pool[:, target, :length] = pool[:, source, :length]

    def view(self, slots: list[int], offsets: list[int], q_lens: list[int], q_pad: int) -> CacheView:
        """A CacheView for one forward; lengths are known on the host, so no device sync is needed."""
        device = self.k.device
        window = max(o + q_pad for o in offsets)
        return CacheView(
            self.k, self.v,
            slots=torch.tensor(slots, device=device),
            offsets=torch.tensor(offsets, device=device),
            q_lens=torch.tensor(q_lens, device=device),
            window=window,
        )
