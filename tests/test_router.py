"""Prompt-affinity routing: the requests of one prompt go to one engine replica unless it is overloaded."""

import asyncio
from types import SimpleNamespace

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID

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
    return SimpleNamespace(args=[{"prompt_ids": prompt_ids, "max_tokens": 16}], kwargs={})


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


def test_calls_without_a_prompt_go_to_the_least_loaded_replica():
    replicas = _replicas(2)
    for request in (None, SimpleNamespace(args=[], kwargs={}), _generate([])):
        assert _ranks(_router(), replicas, request) == [replicas]


def test_bad_routing_settings_are_refused():
    from serve.app import build_app

    with pytest.raises(ValueError, match="max_imbalance must be >= 0"):
        _router(max_imbalance=-1)
    with pytest.raises(ValueError, match="routing='random' is not one of prompt_affinity, power_of_two"):
        build_app({"model": "/models/x", "routing": "random"})
