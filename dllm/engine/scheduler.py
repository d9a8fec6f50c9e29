"""Who runs in the next step, and which requests share a forward.

Continuous batching at step granularity: a waiting request is admitted as soon as a cache slot and
the pages its length needs are free (first come, first served), a finished one leaves at once. Each
step runs every running request exactly once; requests whose next forward has the same shape (phase
and block size) share one forward.
"""

from __future__ import annotations

from collections import deque

from .kv_cache import KVCache
from .request import Phase, Request


class Scheduler:
    def __init__(self, cache: KVCache, max_prefill_tokens: int, share_prefills: bool = False,
                 prefix_caching: bool = False) -> None:
        self.cache = cache
        self.max_prefill_tokens = max_prefill_tokens
        self.share_prefills = share_prefills  # a prefill whose prompt is already in its batch costs no row
        self.prefix_caching = prefix_caching  # a request whose prompt's K/V are cached skips its prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

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
        leaders: dict[tuple, Request] = {}  # prompt key -> the request admitted now that prefills it
        while self.waiting:
            req = self.waiting[0]
            key, n = req.prompt_key, len(req.prompt_ids)
            cached = self.cache.lookup(key) if self.reuses_prompt(req) else None
            source = leaders.get(key) if cached is None and self.share_prefills else None
            if cached is not None:
                prefix, prefix_len = cached, n
            elif source is not None and req.keeps_prompt_kv:  # full pages now, the last one copied after
                prefix, prefix_len = self.cache.pages(source.slot), n - n % self.cache.page_size
            else:
                prefix, prefix_len = [], 0
            if not self.cache.can_allocate(req.cache_extent, prefix, prefix_len):
                break
            self.waiting.popleft()
            req.slot = self.cache.allocate(req.cache_extent, prefix, prefix_len)
            req.phase = Phase.PREFILL
            if cached is not None:
                req.cached_prompt_tokens = n
            elif source is not None:
                req.prefill_source = source
            else:
                leaders.setdefault(key, req)
            self.running.append(req)
            admitted.append(req)
        return admitted

    def schedule(self) -> list[list[Request]]:
        """Forward groups for this step: same phase, block size and cache policy. Groups whose queries
        differ in length (prefills, recomputing cache policies) are split by a padded-token budget.
        Call admit() first: new requests join this step."""
        groups: dict[tuple, list[Request]] = {}
        for req in self.running:
            groups.setdefault((req.phase, req.block_size, req.config.cache_policy), []).append(req)
        batches = []
        for (phase, _, policy), reqs in groups.items():
            if phase is not Phase.PREFILL and policy == "dllm-var":
                batches.append(reqs)  # every query is B or 2B tokens: one forward
                continue
            # Similar lengths together (less padding); one prompt's requests side by side, so that a
            # prefill row's sharers are never split from it (only a new row starts another batch).
            reqs.sort(key=lambda r: (r.query_len(), r.prompt_key))
            shared = phase is Phase.PREFILL and self.share_prefills
            batch: list[Request] = []
            rows: set = set()  # the rows the batch's forward runs
            for req in reqs:  # ascending: the newest request is the longest of its batch
                row = req.prompt_key if shared else id(req)
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
        request.phase = Phase.FINISHED
