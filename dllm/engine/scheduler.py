"""Who runs in the next step, and which requests share a forward.

Continuous batching at step granularity: a waiting request is admitted as soon as a cache slot is
free, a finished one leaves at once. Each step runs every running request exactly once; requests
whose next forward has the same shape (phase and block size) share one forward.
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
        self.prefix_caching = prefix_caching  # a request prefers a free slot that holds its prompt's K/V
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def reuses_prompt(self, req: Request) -> bool:
        """Prefix caching applies: the request may take, and leaves behind, prompt K/V in its slot."""
        return self.prefix_caching and req.keeps_prompt_kv

    def admit(self) -> list[Request]:
        """Move waiting requests into free cache slots (first come, first served)."""
        admitted = []
        while self.waiting and self.cache.free_slots:
            req = self.waiting.popleft()
            req.slot = self.cache.allocate(req.prompt_key if self.reuses_prompt(req) else None)
            req.phase = Phase.PREFILL
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
            reqs.sort(key=Request.query_len)  # similar lengths together: less padding
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
