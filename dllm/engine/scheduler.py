"""Who runs in the next step, and which requests share a forward.

Continuous batching at step granularity: a waiting request is admitted as soon as a cache slot and
the pages it needs are free (first come, first served), a finished one leaves at once. Each step runs
every running request exactly once; requests whose next forward has the same shape (phase and block
size) share one forward.

Pages (PAGE_ALLOCATIONS): "on_demand" (the default) gives a request the pages of its next forward
only, and more block by block as its answer grows, since a dLLM-Var answer's length is unknown until
its EOS; a request is admitted while a block's pages per running request stay free. When the pool runs
out all the same, the newest running request is preempted: it gives its pages back and waits at the head
of the queue, then resumes where it stopped with the same K/V. PREEMPTION_MODES say how it gets them back:
- "swap" (the default): its committed K/V go to host memory and come back bit for bit, the transfer
  crossing PCIe twice; while they would take more than `swap_space` bytes of host memory together with
  those swapped out already, a request whose K/V can be rebuilt is recomputed instead.
- "recompute": they are dropped, and forwards with the tokens that first wrote them write them again
  (Phase.REBUILD, Request.rebuild_query): the same K/V (bit for bit where the kernels are deterministic),
  no host memory, a forward per committed block. Requests whose K/V cannot be rebuilt from their tokens
  (Request.rebuildable: no commit pass) are swapped all the same, beyond swap_space if need be.
Either way a request that has no K/V worth keeping (its next forward recomputes its whole context) is not
swapped, and its decoding state (block, generator, credit, ...) stays as it was.
"reserve" gives each request at admission the pages of its prompt and max_new_tokens: it never
waits mid-answer, and the pool holds fewer requests at once.

SCHEDULING_POLICIES say who goes first: "fcfs" (the default), by arrival; "priority" (vLLM's), by each
request's priority (lower first), then arrival. Both queues are kept in that order: the waiting queue is
admitted from its head and the running list grows (make_room) from its head, so the preempted request
is always the least urgent, newest one. Under "priority" a request that cannot be admitted (or resumed)
also preempts running requests of a strictly larger priority value until it fits; requests of equal
priority never preempt each other, and a request of low priority may wait as long as more urgent ones come.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque

from .kv_cache import KVCache
from .request import Phase, Request


PAGE_ALLOCATIONS = ("on_demand", "reserve")
PREEMPTION_MODES = ("swap", "recompute")
SCHEDULING_POLICIES = ("fcfs", "priority")


def urgency(req: Request) -> tuple[int, int]:
    """The order requests are served in: priority (0 for every request under fcfs), then arrival."""
    return req.priority, req.arrival


class Scheduler:
    def __init__(self, cache: KVCache, max_prefill_tokens: int, share_prefills: bool = False,
                 prefix_caching: bool = False, page_allocation: str = "on_demand",
                 preemption_mode: str = "swap", swap_space: int | None = None,
                 scheduling_policy: str = "fcfs") -> None:
        if page_allocation not in PAGE_ALLOCATIONS:
            raise ValueError(f"page_allocation must be one of {list(PAGE_ALLOCATIONS)}, got {page_allocation!r}")
        if preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {list(PREEMPTION_MODES)}, got {preemption_mode!r}")
        if scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {list(SCHEDULING_POLICIES)}, got {scheduling_policy!r}")
        if swap_space is not None and swap_space < 0:
            raise ValueError(f"swap_space must be >= 0 bytes (or None: no limit), got {swap_space}")
        self.cache = cache
        self.on_demand = page_allocation == "on_demand"
        self.recompute = preemption_mode == "recompute"
        self.swap_space = swap_space  # host memory the swapped K/V may take at once (None: no limit)
        self.host_bytes = 0  # K/V bytes in host memory now
        self.preemptions = 0  # running requests that gave their pages back, either way
        self.swapped_bytes = 0  # K/V bytes swapped out to host memory, in total
        self.swapped_requests = 0  # waiting now with their K/V in host memory
        self.dropped_preemptions = 0  # preemptions that dropped the K/V (rebuilt on resuming, if need be)
        self.max_prefill_tokens = max_prefill_tokens
        self.share_prefills = share_prefills  # a prefill whose prompt is already in its batch costs no row
        self.prefix_caching = prefix_caching  # a request whose prompt's K/V are cached skips its prefill
        self.by_priority = scheduling_policy == "priority"
        self._arrivals = itertools.count()
        self.waiting: deque[Request] = deque()  # in urgency order
        self.running: list[Request] = []  # in urgency order

    def add(self, request: Request) -> None:
        request.arrival = next(self._arrivals)
        bisect.insort(self.waiting, request, key=urgency)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def reuses_prompt(self, req: Request) -> bool:
        """Prefix caching applies: the request may take, and leaves behind, its prompt's K/V."""
        return self.prefix_caching and req.keeps_prompt_kv

    def admit(self) -> list[Request]:
        """Move waiting requests into the cache, first come first served, while a slot and the pages
        each needs are free (the first that does not fit waits, and those behind it too). A request
        whose prompt's K/V are cached maps them (`cached_prompt_tokens` set: its prefill is skipped);
        one whose prompt an earlier request admitted now will prefill shares that prefill row
        (`prefill_source` set) and, where its prompt K/V stay as written, its prompt's full pages."""
        admitted = []
        if not self.waiting:
            return admitted
        # (prompt key, cache policy) -> the request admitted now that prefills it; requests of another
        # cache policy run in another forward group (schedule), so they cannot share its row
        leaders: dict[tuple, Request] = {}
        # on_demand: every running request keeps a block's pages free to grow into at its next COMMIT.
        spare = sum(self._headroom(r, len(self.cache.pages(r.slot))) for r in self.running)
        while self.waiting:
            req = self.waiting[0]
            if req.resume_phase is not None:  # preempted: it goes on where it stopped
                extent = self._resume_extent(req)
                headroom = self._headroom(req, self.cache.pages_for(extent))
                if not self._resume(req, extent, spare + headroom):
                    victim = self._less_urgent_than(req)
                    if victim is None:
                        break
                    spare -= self._preempt(victim)
                    continue
                spare += headroom
                self.waiting.popleft()
                bisect.insort(self.running, req, key=urgency)
                continue
            key, n = req.prompt_key, len(req.prompt_ids)
            cached = self.cache.lookup(key) if self.reuses_prompt(req) else None
            share_key = (key, req.config.cache_policy)
            source = leaders.get(share_key) if cached is None and self.share_prefills else None
            if cached is not None:
                prefix, prefix_len = cached, n
            elif source is not None and req.keeps_prompt_kv:  # full pages now, the last one copied after
                prefix, prefix_len = self.cache.pages(source.slot), n - n % self.cache.page_size
            else:
                prefix, prefix_len = [], 0
            extent = req.extent(Phase.PREFILL) if self.on_demand else req.cache_extent
            headroom = self._headroom(req, self.cache.pages_for(extent))
            if not self.cache.can_allocate(extent, prefix, prefix_len, spare=spare + headroom):
                # Mapping a cached prompt pins its pages; in a full pool, prefilling it anew may fit where that
                # does not (the prompt's pages are then reclaimed like any cached prompt's).
                if cached is None or not self.cache.can_allocate(extent, spare=spare + headroom):
                    victim = self._less_urgent_than(req)
                    if victim is None:
                        break
                    spare -= self._preempt(victim)
                    continue
                cached, prefix, prefix_len = None, [], 0
            spare += headroom
            self.waiting.popleft()
            req.slot = self.cache.allocate(extent, prefix, prefix_len)
            req.phase = Phase.PREFILL
            if cached is not None:
                req.cached_prompt_tokens = n
            elif source is not None:
                req.prefill_source = source
            else:
                leaders.setdefault(share_key, req)
            bisect.insort(self.running, req, key=urgency)
            admitted.append(req)
        return admitted

    def _less_urgent_than(self, req: Request) -> Request | None:
        """Under "priority": the running request to preempt so that `req` may run, the least urgent one, if its
        priority value is larger than req's (requests of equal priority wait their turn)."""
        if self.by_priority and self.running and self.running[-1].priority > req.priority:
            return self.running[-1]
        return None

    def _resume_extent(self, req: Request) -> int:
        """Cache positions a preempted request takes again: those of the forward it resumes with."""
        extent = req.extent(req.resume_phase) if self.on_demand else req.cache_extent
        return max(extent, req.swapped.positions) if req.swapped is not None else extent

    def _resume(self, req: Request, extent: int, spare: int) -> bool:
        """Give a preempted request a slot of `extent` positions again, leaving `spare` pages free, if it
        fits now: its swapped K/V come back, or it maps its prompt's cached pages and rebuilds what else
        it reads (Phase.REBUILD)."""
        if req.swapped is not None:
            if not self.cache.can_allocate(extent, spare=spare):
                return False
            req.slot = self.cache.swap_in(req.swapped, extent)
            self._forget_swap(req)
        else:
            n = len(req.prompt_ids)
            cached = self.cache.lookup(req.prompt_key) if self.reuses_prompt(req) else None
            if cached is not None and self.cache.can_allocate(extent, cached, n, spare=spare):
                req.slot, req.rebuilt = self.cache.allocate(extent, cached, n), n
            elif self.cache.can_allocate(extent, spare=spare):
                req.slot, req.rebuilt = self.cache.allocate(extent), 0
            else:
                return False
            if req.rebuild_query() is not None:
                req.phase = Phase.REBUILD
                return True
        req.phase, req.resume_phase = req.resume_phase, None
        return True

    def rebuilt(self, req: Request) -> None:
        """A REBUILD forward of `req` has run: go on decoding once nothing is left to rebuild."""
        if req.rebuild_query() is None:
            req.phase, req.resume_phase = req.resume_phase, None

    def _headroom(self, req: Request, pages: int) -> int:
        """on_demand: pages kept free for a request holding `pages` to grow by a block (no more than its
        max_new_tokens can still take: a request alone always fits a pool that can hold it)."""
        if not self.on_demand:
            return 0
        return max(0, min(self.cache.pages_for(req.block_size), self.cache.pages_for(req.cache_extent) - pages))

    def make_room(self) -> list[Request]:
        """on_demand, before a step: map for each running request, most urgent first (oldest first under
        fcfs), the pages its next forward writes. Where the pool has none left, preempt the least urgent
        running request (the newest under fcfs), possibly the one growing, until the more urgent ones fit;
        the first always fits, since no request larger than the pool is accepted. Returns the preempted
        requests."""
        preempted = []
        if not self.on_demand:
            return preempted  # every request holds its pages since admission
        for req in list(self.running):
            if req.phase is Phase.WAITING:
                continue  # preempted for an older one
            need = req.extent()
            if self.cache.covers(req.slot, need):
                continue  # most steps: a DENOISE step writes where the last forward did
            while req.phase is not Phase.WAITING and not self.cache.can_grow(req.slot, need):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
            if req.phase is not Phase.WAITING:
                self.cache.grow(req.slot, need)
        return preempted

    def _preempt(self, req: Request) -> int:
        """Take a running request's pages back and queue it in urgency order: a preempted request resumes
        before any new one of its priority is admitted (it arrived first). Returns the pages admit() kept
        free for it to grow into (its headroom), no longer kept. Its
        committed K/V go to host memory, or are dropped where they can be rebuilt and the mode says so,
        or where nothing of them would be read again; a request rebuilding them starts over. With the
        commit pass they are dropped in swap mode too where host memory would pass swap_space."""
        headroom = self._headroom(req, len(self.cache.pages(req.slot)))
        self.running.remove(req)
        rebuilding = req.phase is Phase.REBUILD  # its K/V are partly written: not worth a swap
        if not rebuilding:
            req.resume_phase = req.phase
        req.rebuilt = 0
        keep = req.rebuild_query() is not None and not rebuilding  # complete K/V that will be read again
        if keep and req.rebuildable:
            keep = not self.recompute and (self.swap_space is None or
                                           self.host_bytes + self.cache.swap_bytes(req.cached_len) <= self.swap_space)
        if keep:
            req.swapped = self.cache.swap_out(req.slot, req.cached_len)
            self.swapped_bytes += req.swapped.bytes
            self.host_bytes += req.swapped.bytes
            self.swapped_requests += 1
        else:
            self.cache.release(req.slot)
            self.dropped_preemptions += 1
        self.preemptions += 1
        req.phase, req.slot = Phase.WAITING, -1
        bisect.insort(self.waiting, req, key=urgency)
        return headroom

    def _forget_swap(self, req: Request) -> None:
        """A swapped request's host copy of its K/V is no longer needed (back on the device, or aborted)."""
        self.host_bytes -= req.swapped.bytes
        self.swapped_requests -= 1
        req.swapped = None

    def schedule(self) -> list[list[Request]]:
        """Forward groups for this step: same phase, block size and cache policy. Groups whose queries
        differ in length (prefills, recomputing cache policies) are split by a padded-token budget.
        Call admit() first: new requests join this step."""
        groups: dict[tuple, list[Request]] = {}
        for req in self.running:
            groups.setdefault((req.phase, req.block_size, req.config.cache_policy), []).append(req)
        batches = []
        for (phase, _, policy), reqs in groups.items():
            if phase in (Phase.DENOISE, Phase.COMMIT) and policy == "dllm-var":
                batches.append(reqs)  # every query is B or 2B tokens: one forward
                continue
            # Similar lengths together (less padding); one prompt's requests side by side, so that a
            # prefill row's sharers (admit's prefill_source) follow it and are never split from it: only
            # a new row starts another batch.
            reqs.sort(key=lambda r: (r.query_len(), r.prompt_key))
            batch: list[Request] = []
            rows: set = set()  # the rows the batch's forward runs
            for req in reqs:  # ascending: the newest request is the longest of its batch
                row = id(req.prefill_source or req)
                if batch and row not in rows and req.query_len() * (len(rows) + 1) > self.max_prefill_tokens:
                    batches.append(batch)
                    batch, rows = [], set()
                batch.append(req)
                rows.add(row)
            batches.append(batch)
        return batches

    def finish(self, request: Request) -> None:
        """Take a request out (finished or aborted) and free its slot at once."""
        if request in self.running:
            self.running.remove(request)
            self.cache.release(request.slot)
        elif request in self.waiting:
            self.waiting.remove(request)
            if request.swapped is not None:  # preempted: drop the host copy of its K/V
                self._forget_swap(request)
        request.phase = Phase.FINISHED
