"""Prompt-affinity routing: the requests of one prompt go to one engine replica unless it is overloaded."""

import asyncio
from types import SimpleNamespace

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
from ray.serve._private.request_router.common import PendingRequest, RequestRoutingContext

from serve.router import PromptAffinityRouter

DEPLOYMENT = DeploymentID(name="EngineServer", app_name="dllm")


def _router(max_imbalance=4) -> PromptAffinityRouter:
    router = PromptAffinityRouter(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN,
                                  use_replica_queue_len_cache=True)
    router.initialize_state(max_imbalance=max_imbalance)
    return router


def _replicas(n):
    return [SimpleNamespace(replica_id=ReplicaID(unique_id=f"replica-{i}", deployment_id=DEPLOYMENT),
                            max_ongoing_requests=32) for i in range(n)]


def _generate(prompt_ids):
    return SimpleNamespace(args=[{"prompt_ids": prompt_ids, "max_tokens": 16}], kwargs={},
                           routing_context=RequestRoutingContext())


def _ranks(router, replicas, request):
    return asyncio.run(router.choose_replicas(replicas, request))


def test_a_prompt_prefers_the_same_replica_from_every_ingress_and_then_the_others():
    replicas = _replicas(4)
    first, then = _ranks(_router(), replicas, _generate([5, 6, 7]))
    assert len(first) == 1 and sorted(r.replica_id.unique_id for r in first + then) == sorted(
        r.replica_id.unique_id for r in replicas)
    for router in (_router(), _router()):  # another call, another ingress replica's router
        assert _ranks(router, list(reversed(replicas)), _generate([5, 6, 7]))[0] == first


def test_prompts_spread_over_the_replicas_and_stay_put_when_another_replica_goes():
    replicas = _replicas(4)
    preferred = {tuple(p): _ranks(_router(), replicas, _generate(p))[0][0] for p in ([i, i + 1] for i in range(64))}
    assert {r.replica_id for r in preferred.values()} == {r.replica_id for r in replicas}
    gone = replicas[0]
    for prompt, replica in preferred.items():
        now = _ranks(_router(), replicas[1:], _generate(list(prompt)))[0][0]
        assert now is replica or replica is gone


def test_an_overloaded_replica_gives_way_to_the_least_loaded():
    replicas = _replicas(3)
    router = _router(max_imbalance=4)
    request = _generate([9, 9, 9])
    preferred = _ranks(router, replicas, request)[0][0]
    for r in replicas:
        router.replica_queue_len_cache.update(r.replica_id, 1)
    router.replica_queue_len_cache.update(preferred.replica_id, 5)
    assert _ranks(router, replicas, request)[0] == [preferred]  # 4 more than the shortest: still its turn
    router.replica_queue_len_cache.update(preferred.replica_id, 6)
    assert _ranks(router, replicas, request) == [replicas]  # the base router takes the shortest queue


class _ReplicaWithRoom:
    """What Serve's routing loop asks of a replica: its id, its capacity and its queue length."""

    def __init__(self, i, queue_len=0, max_ongoing_requests=32):
        self.replica_id = ReplicaID(unique_id=f"replica-{i}", deployment_id=DEPLOYMENT)
        self.max_ongoing_requests = max_ongoing_requests
        self.queue_len = queue_len
        self.probes = 0

    async def get_queue_len(self, *, deadline_s):
        self.probes += 1
        return self.queue_len


def _route_one_http_request(replicas, prompts, n, timeout=10.0):
    """Route the ingress's engine calls for one completion (n per prompt, all carrying the HTTP request's
    ids) at once, through Serve's own routing loop and a new router; the replica each call got."""
    meta = RequestMetadata(request_id="req", internal_request_id="one-http-request", call_method="generate",
                           is_streaming=True)

    async def run():
        router = _router()
        router.update_replicas(replicas)
        calls = [PendingRequest(args=[{"prompt_ids": p, "max_tokens": 16}], kwargs={}, metadata=meta)
                 for p in prompts for _ in range(n)]
        return await asyncio.wait_for(asyncio.gather(*(router._choose_replica_for_request(c) for c in calls)),
                                      timeout)

    return asyncio.run(run())


@pytest.mark.parametrize("num_replicas", [1, 3])
def test_every_call_of_one_http_request_is_routed_to_its_prompts_replica(num_replicas):
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    replicas = [_ReplicaWithRoom(i) for i in range(num_replicas)]
    routed = _route_one_http_request(replicas, prompts, n=3)
    preferred = [_ranks(_router(), replicas, _generate(p))[0][0] for p in prompts]
    assert routed == [preferred[k] for k in range(len(prompts)) for _ in range(3)]


def test_a_full_preferred_replica_sends_its_prompt_to_another_and_none_free_backs_off():
    replicas = [_ReplicaWithRoom(i) for i in range(2)]
    preferred = _ranks(_router(), replicas, _generate([5, 6, 7]))[0][0]
    other = next(r for r in replicas if r is not preferred)
    preferred.queue_len = preferred.max_ongoing_requests
    assert _route_one_http_request(replicas, [[5, 6, 7]], n=1) == [other]
    other.queue_len = other.max_ongoing_requests  # both full: Serve retries, sleeping between rounds
    with pytest.raises(asyncio.TimeoutError):
        _route_one_http_request(replicas, [[5, 6, 7]], n=1, timeout=1.0)
    assert preferred.probes < 40  # with no backoff it probes them again at once, thousands of times a second


def test_calls_without_a_prompt_go_to_the_least_loaded_replica():
    replicas = _replicas(2)
    for request in (None, SimpleNamespace(args=[], kwargs={}, routing_context=RequestRoutingContext()), _generate([])):
        assert _ranks(_router(), replicas, request) == [replicas]


def test_bad_routing_settings_are_refused():
    from serve.app import build_app

    with pytest.raises(ValueError, match="max_imbalance must be >= 0"):
        _router(max_imbalance=-1)
    with pytest.raises(ValueError, match="routing='random' is not one of prompt_affinity, power_of_two"):
        build_app({"model": "/models/x", "routing": "random"})
