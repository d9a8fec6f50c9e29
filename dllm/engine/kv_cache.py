"""The K/V pool: allocated once per engine, one slot per running request."""

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
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def used_slots(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise CacheFullError("no free KV-cache slot")
        return self._free.pop()

    def release(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.append(slot)

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
