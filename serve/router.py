"""Prompt-affinity routing between engine replicas (a Ray Serve request router).

Each replica has its own prefix cache, and requests prefilled together with the same prompt share one
prefill row. Both pay off only when the requests of one prompt meet on one replica: the `n` samples of a
completion (separate engine requests), a retry, an evaluation run again. Serve's default router picks
two random replicas and takes the less loaded, which scatters them. This router ranks the replicas by
rendezvous hashing of the prompt's token ids (highest random weight: every ingress replica computes the
same order, and adding or removing a replica moves only the prompts that hashed to it) and offers the
first one before the others, unless its queue is longer than the shortest one by more than
`max_imbalance` requests: then load wins and the least loaded replica is taken.

The replica a request's prompt chose goes to that very request. Serve's base router matches a chosen
replica to its request by `internal_request_id`, which every call made while serving one HTTP request
shares (the n choices of a completion, a list of prompts): it handed the replica to the first of them,
and the others were never routed (their routing tasks spun, starving the ingress).
"""

from __future__ import annotations

import asyncio
import hashlib
import weakref
from array import array

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def prompt_digest(request: PendingRequest | None) -> bytes | None:
    """A digest of the request's prompt ids, or None for calls that carry no prompt (info, health)."""
    payload = request.args[0] if request is not None and request.args else None
    ids = payload.get("prompt_ids") if isinstance(payload, dict) else None
    if not ids:
        return None
    return hashlib.blake2b(array("q", ids).tobytes(), digest_size=16).digest()


def rendezvous_order(digest: bytes, replicas: list[RunningReplica]) -> list[RunningReplica]:
    """Replicas from the most to the least preferred for this prompt digest."""
    def weight(replica: RunningReplica) -> bytes:
        return hashlib.blake2b(digest + replica.replica_id.unique_id.encode(), digest_size=8).digest()

    return sorted(replicas, key=weight, reverse=True)


class PromptAffinityRouter(RequestRouter):
    def initialize_state(self, max_imbalance: int = 16) -> None:
        if max_imbalance < 0:
            raise ValueError(f"max_imbalance must be >= 0, got {max_imbalance}")
        self.max_imbalance = max_imbalance
        # routing task -> the request it is routing (Serve calls choose_replicas from that task)
        self._routing: weakref.WeakKeyDictionary[asyncio.Task, PendingRequest] = weakref.WeakKeyDictionary()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            self._routing[asyncio.current_task()] = pending_request
            # Every call offers every replica: when none takes the request (all full), Serve is to back off
            # before asking again, as its default router does, instead of probing them again at once.
            pending_request.routing_context.should_backoff = True
        digest = prompt_digest(pending_request)
        if digest is None or len(candidate_replicas) < 2:
            return [candidate_replicas]  # the least loaded of them
        ranked = rendezvous_order(digest, candidate_replicas)
        if self._overloaded(ranked[0], candidate_replicas):
            return [candidate_replicas]
        return [ranked[:1], ranked[1:]]

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        """Serve's hook, called in a routing task that found a replica: assign it to that task's request."""
        request = self._routing.get(asyncio.current_task())
        if request is None or request.future.done():
            return super()._fulfill_next_pending_request(replica, request_metadata)
        self._record_queue_wait_time(request)
        request.future.set_result(replica)
        self._remove_pending_request_from_indices(request)

    def _overloaded(self, preferred: RunningReplica, replicas: list[RunningReplica]) -> bool:
        """The preferred replica's known queue exceeds the shortest known one by more than max_imbalance
        (unknown lengths count as not overloaded: the base router probes them)."""
        lengths = {r.replica_id: self.replica_queue_len_cache.get(r.replica_id) for r in replicas}
        known = [n for n in lengths.values() if n is not None]
        mine = lengths[preferred.replica_id]
        return mine is not None and mine - min(known) > self.max_imbalance
