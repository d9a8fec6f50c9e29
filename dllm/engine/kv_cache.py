"""The K/V pool: fixed-size pages allocated once per engine, mapped to requests through a page table.

A running request owns a slot: one row of the page table, which lists the pages holding its cache
positions (position p lives in page table[slot, p // page_size], at p % page_size). A slot is
allocated with the pages of some positions and grows by fresh pages (the scheduler decides how many:
see dllm.engine.scheduler); it gives them back when it ends. A request thus holds what its own length
needs, not max_model_len: the pool serves as many requests as their lengths allow (`num_pages`), up to
`num_slots` at a time. A preempted request's committed K/V go to host memory (`swap_out`) and come
back into fresh pages of a new slot (`swap_in`).

Prefix caching: a prompt's K/V (the prefill of prompt + B masks, see Request.prompt_key) is indexed
by its key once written. A later request with that key maps the prompt's full pages into its own
table (shared, reference counted, never written again: no cache policy that shares them recomputes
committed K/V) and gets a copy of the last, partly filled page, where its own blocks follow the
prompt. When the last request using them ends, a prompt's pages stay cached until the pool needs
them for someone else (least recently used first).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..config import LLaDAConfig
from ..model import CacheView

DEFAULT_PAGE_SIZE = 16


class CacheFullError(RuntimeError):
    pass


@dataclass
class SwappedKV:
    """A preempted request's committed K/V in host memory: [n_layers, pages, page_size, n_kv_heads,
    head_dim] each, covering cache positions [0, positions)."""

    k: torch.Tensor
    v: torch.Tensor
    positions: int

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class KVCache:
    """Preallocated keys/values [n_layers, num_pages + 1, page_size, n_kv_heads, head_dim] and a
    page table [num_slots (+1), pages_per_slot] on the device.

    capacity:  positions one slot can address (max_model_len); pages_per_slot = ceil(capacity / page_size)
    num_pages: pages in the pool; default num_slots * pages_per_slot (every slot can be full at once)
    The last page (index num_pages) is a scratch page no request owns: unmapped table entries point
    there. With `scratch_slot`, one more table row (index num_slots) maps only the scratch page:
    padding rows of a CUDA graph read and write there.
    """

    def __init__(self, config: LLaDAConfig, num_slots: int, capacity: int, *, device, dtype,
                 page_size: int = DEFAULT_PAGE_SIZE, num_pages: int | None = None, scratch_slot: bool = False) -> None:
        if num_slots < 1 or capacity < 1 or page_size < 1:
            raise ValueError(f"KV cache needs num_slots, capacity and page_size >= 1, got {num_slots}, {capacity}, "
                             f"{page_size}")
        self.page_size = page_size
        self.pages_per_slot = math.ceil(capacity / page_size)
        num_pages = num_slots * self.pages_per_slot if num_pages is None else num_pages
        if num_pages < 1:
            raise ValueError(f"KV cache needs num_pages >= 1, got {num_pages}")
        shape = (config.n_layers, num_pages + 1, page_size, config.n_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.capacity = capacity
        self.num_slots = num_slots
        self.num_pages = num_pages
        self.scratch_page = num_pages
        self.scratch_slot = num_slots if scratch_slot else None
        self.table = torch.full((num_slots + int(scratch_slot), self.pages_per_slot), self.scratch_page,
                                dtype=torch.int32, device=device)
        self._free_slots = list(range(num_slots))
        self._pages_of: dict[int, list[int]] = {}  # slot -> its pages, in position order
        self._refs = [0] * num_pages  # running slots that map each page
        self._free_pages = list(range(num_pages - 1, -1, -1))  # a stack: pages no one maps and no prompt holds
        self._prompts: OrderedDict[object, list[int]] = OrderedDict()  # key -> its prompt's pages, LRU first
        self._prompt_of: dict[int, object] = {}  # page -> the key whose prompt it holds
        self._idle_cached = 0  # pages that hold a prompt and that no slot maps: reclaimable

    # ----- sizes -----------------------------------------------------------------------------

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def used_slots(self) -> int:
        return self.num_slots - len(self._free_slots)

    @property
    def used_pages(self) -> int:
        """Pages mapped by at least one running slot."""
        return self.num_pages - self._available

    @property
    def cached_pages(self) -> int:
        """Pages holding an ended request's prompt, kept for the prefix cache until the pool needs them."""
        return self._idle_cached

    @property
    def _available(self) -> int:
        """Pages a slot can be given now: free ones, and cached prompts' that no slot maps."""
        return len(self._free_pages) + self._idle_cached

    def pages_for(self, positions: int) -> int:
        return math.ceil(positions / self.page_size)

    # ----- slots and their pages ---------------------------------------------------------------

    def can_allocate(self, positions: int, prefix: list[int] = (), prefix_len: int = 0, spare: int = 0) -> bool:
        """Whether `allocate(positions, prefix, prefix_len)` can succeed now, leaving `spare` pages free:
        a free slot, and enough pages free or reclaimable from cached prompts (other than the ones it
        would use)."""
        shared, source = self._split_prefix(prefix, prefix_len)
        used = shared + ([source] if source is not None else [])
        idle_used = sum(1 for p in used if self._refs[p] == 0 and p in self._prompt_of)
        needed = self.pages_for(positions) - len(shared) + spare
        return bool(self._free_slots) and needed <= self._available - idle_used

    def allocate(self, positions: int, prefix: list[int] = (), prefix_len: int = 0) -> int:
        """A slot for `positions` cache positions, whose first `prefix_len` are a prompt already in
        the pages `prefix` (a cached or running request's): its full pages are mapped (shared, read
        only) and a partly filled last page is copied into the slot's first page of its own. The
        other pages are fresh; prompts cached longest ago give theirs back first if need be."""
        if positions > self.capacity:
            raise ValueError(f"{positions} positions exceed a slot's capacity of {self.capacity}")
        if not self.can_allocate(positions, prefix, prefix_len):
            raise CacheFullError(f"no free KV-cache slot or not enough free pages for {positions} positions")
        shared, source = self._split_prefix(prefix, prefix_len)
        for page in shared + ([source] if source is not None else []):
            self._map(page)  # pinned: reclaiming pages below must not take these
        pages = shared + self._take_pages(self.pages_for(positions) - len(shared))
        if source is not None:
            self.copy_pages([source], [pages[len(shared)]])
            self._unmap(source)
        slot = self._free_slots.pop(0)
        self._pages_of[slot] = pages
        row = torch.full((self.pages_per_slot,), self.scratch_page, dtype=torch.int32)
        row[:len(pages)] = torch.tensor(pages, dtype=torch.int32)
        self.table[slot].copy_(row)  # between forwards: the next launch sees it
        return slot

    def covers(self, slot: int, positions: int) -> bool:
        """Whether `slot` has pages mapped for `positions` cache positions already."""
        return self.pages_for(positions) <= len(self._pages_of[slot])

    def can_grow(self, slot: int, positions: int) -> bool:
        """Whether `grow(slot, positions)` can succeed now."""
        return self.pages_for(positions) - len(self._pages_of[slot]) <= self._available

    def grow(self, slot: int, positions: int) -> None:
        """Map fresh pages into `slot` until it covers `positions` cache positions (a no-op if it does)."""
        if positions > self.capacity:
            raise ValueError(f"{positions} positions exceed a slot's capacity of {self.capacity}")
        if not self.can_grow(slot, positions):
            raise CacheFullError(f"not enough free KV-cache pages to grow slot {slot} to {positions} positions")
        pages = self._pages_of[slot]
        new = self._take_pages(self.pages_for(positions) - len(pages))
        if new:
            self.table[slot, len(pages):len(pages) + len(new)] = torch.tensor(new, dtype=torch.int32)
            pages.extend(new)

    def _take_pages(self, n: int) -> list[int]:
        """n fresh pages, mapped once; cached prompts give theirs back, least recently used first."""
        while len(self._free_pages) < max(n, 0):
            self._drop_oldest_prompt()
        pages = [self._free_pages.pop() for _ in range(max(n, 0))]
        for page in pages:
            self._map(page)
        return pages

    # ----- preemption: a request's K/V out to host memory and back -----------------------------

    def swap_bytes(self, positions: int) -> int:
        """Host memory `swap_out` takes for `positions` positions (whole pages of K and V)."""
        return 2 * self.pages_for(positions) * self.k[:, 0].numel() * self.k.element_size()

    def swap_out(self, slot: int, positions: int) -> "SwappedKV":
        """Copy the K/V of positions [0, positions) of `slot` to host memory and free the slot. The
        copy is queued on the device's stream before anything that may reuse the pages, and read back
        only by `swap_in`, behind it on the same stream: no host sync."""
        pages = torch.tensor(self._pages_of[slot][:self.pages_for(positions)], device=self.k.device)
        pin = self.k.is_cuda
        host = tuple(torch.empty((pool.shape[0], len(pages), *pool.shape[2:]), dtype=pool.dtype, pin_memory=pin)
                     for pool in (self.k, self.v))
        for dst, pool in zip(host, (self.k, self.v)):
            dst.copy_(pool[:, pages], non_blocking=pin)
        self.release(slot)
        return SwappedKV(*host, positions)

    def swap_in(self, swapped: "SwappedKV", positions: int) -> int:
        """A slot for `positions` cache positions (>= the swapped ones) whose first pages get the K/V
        that `swap_out` saved; the same values, bit for bit."""
        slot = self.allocate(max(positions, swapped.positions))
        pages = torch.tensor(self._pages_of[slot][:swapped.k.shape[1]], device=self.k.device)
        for src, pool in zip((swapped.k, swapped.v), (self.k, self.v)):
            pool[:, pages] = src.to(self.k.device, non_blocking=True)
        return slot

    def _split_prefix(self, prefix: list[int], prefix_len: int) -> tuple[list[int], int | None]:
        """(the full pages of a prefix of prefix_len positions, its partly filled last page or None)."""
        full = prefix_len // self.page_size
        return list(prefix[:full]), (prefix[full] if prefix_len % self.page_size else None)

    def release(self, slot: int) -> None:
        """Free a slot and unmap its pages; pages that hold a prompt stay cached until needed."""
        pages = self._pages_of.pop(slot, None)
        if pages is None:
            raise ValueError(f"slot {slot} is not allocated")
        for page in pages:
            self._unmap(page)
        self._free_slots.append(slot)
        # The row keeps pointing at the released pages; nothing reads it until the slot is handed out again.

    def pages(self, slot: int) -> list[int]:
        return self._pages_of[slot]

    def _map(self, page: int) -> None:
        if self._refs[page] == 0 and page in self._prompt_of:
            self._idle_cached -= 1
        self._refs[page] += 1

    def _unmap(self, page: int) -> None:
        self._refs[page] -= 1
        if self._refs[page] == 0:
            if page in self._prompt_of:
                self._idle_cached += 1
            else:
                self._free_pages.append(page)

    # ----- prefix caching ----------------------------------------------------------------------

    def remember(self, key, slot: int, prompt_len: int) -> None:
        """The first `prompt_len` positions of `slot` hold the prompt K/V of `key` (just prefilled)."""
        if key in self._prompts:
            self._prompts.move_to_end(key)
            return
        pages = self._pages_of[slot][:self.pages_for(prompt_len)]
        if any(p in self._prompt_of for p in pages):
            return  # its full pages were shared from another key's prompt: nothing new to index
        self._prompts[key] = pages
        for page in pages:
            self._prompt_of[page] = key

    def lookup(self, key) -> list[int] | None:
        """The pages holding `key`'s prompt K/V (most recently used from now on), or None."""
        pages = self._prompts.get(key)
        if pages is not None:
            self._prompts.move_to_end(key)
        return pages

    def forget(self, key) -> None:
        """Stop indexing `key`'s prompt; its pages that no slot maps are free again."""
        for page in self._prompts.pop(key, ()):
            del self._prompt_of[page]
            if self._refs[page] == 0:
                self._idle_cached -= 1
                self._free_pages.append(page)

    def _drop_oldest_prompt(self) -> None:
        for key, pages in self._prompts.items():
            if any(self._refs[p] == 0 for p in pages):  # it has something to give back
                return self.forget(key)
        raise CacheFullError("no KV-cache page to reclaim")  # can_allocate rules this out

    def copy_pages(self, source: list[int] | torch.Tensor, target: list[int] | torch.Tensor) -> None:
        """Copy whole pages' K/V, a device copy (indices already on the device cost no host copy)."""
        src, dst = (torch.as_tensor(pages, device=self.k.device) for pages in (source, target))
        for pool in (self.k, self.v):
            pool[:, dst] = pool[:, src]

    # ----- one forward ---------------------------------------------------------------------------

    def view(self, slots: list[int], offsets: list[int], q_lens: list[int], q_pad: int) -> CacheView:
        """A CacheView for one forward; lengths are known on the host, so no device sync is needed."""
        device = self.k.device
        window = max(o + q_pad for o in offsets)
        return CacheView(
            self.k, self.v, self.table,
            slots=torch.tensor(slots, device=device),
            offsets=torch.tensor(offsets, device=device),
            q_lens=torch.tensor(q_lens, device=device),
            window=window,
        )
