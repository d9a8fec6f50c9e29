"""The engine's CUDA-graph path, replayed on CPU.

GraphedForward keeps static inputs per (row bucket, query length, logits window), pads a group's rows
up to its bucket with a scratch slot, copies slots and offsets only when they change, and depends on the
page table read at every replay. None of that needs a GPU to be checked: here a "capture" runs the
forward once on the graph's static buffers and a "replay" runs it again into the same output tensor,
which is what replaying a CUDA graph computes. The attention is the pool kernel (Triton's interpreter),
as under graphs. What only a GPU can check (the capture itself, no host sync, bf16, memory) is in the
@pytest.mark.gpu tests of tests/test_kernels.py and tests/test_engine.py.
"""

import copy

import pytest
import torch

import dllm
from dllm.engine import PREEMPTION_MODES
from dllm.engine import cuda_graphs
from dllm.engine.cuda_graphs import GraphedForward
from dllm.kernels import pool_attention as pa

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the @gpu tests capture real graphs"),
    pytest.mark.skipif(not pa.available("cpu"), reason="needs triton's CPU interpreter"),
]

CFG = dllm.GenerationConfig(block_size=8, threshold=0.9, max_new_tokens=24)


class EagerReplay:
    """A captured CUDA graph's stand-in: replay() runs the forward again on the graph's static inputs and
    writes its logits into the graph's static output."""

    def __init__(self, forward) -> None:
        self.forward = forward
        self.logits = forward()

    def replay(self) -> None:
        self.logits.copy_(self.forward())


@pytest.fixture
def replaying_on_cpu(monkeypatch):
    """Engines made with cuda_graphs=True in this test replay EagerReplay "graphs" on CPU."""
    def capture(fn, pool=None):
        graph = EagerReplay(fn)
        return graph, graph.logits

    monkeypatch.setattr(cuda_graphs, "capture", capture)
    monkeypatch.setattr(GraphedForward, "supported", staticmethod(lambda model, device: model.use_pool_kernel))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)


@pytest.fixture
def model(talkative_model):
    """The talkative model with the pool-attention kernel, which graphs need."""
    model = copy.deepcopy(talkative_model)
    model.use_pool_kernel = True
    return model


def _engine(model, **kw):
    kw.setdefault("max_batch_size", 8)
    kw.setdefault("max_model_len", 128)
    kw.setdefault("page_size", 4)
    return dllm.Engine(model, compile_blocks=False, **kw)


def _prompts(n):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(7, 40, (length,), generator=g).tolist() for length in (3, 9, 5, 12, 7, 4, 10, 6)[:n]]


@pytest.mark.parametrize("n,unroll", [(3, 1), (3, 4)])
def test_replayed_graphs_decode_what_eager_forwards_decode(replaying_on_cpu, model, n, unroll):
    """A group of 3 rows fills a bucket of 4 with a padding row on the scratch slot (smaller buckets once
    requests end); unrolled DENOISE steps replay with the slots and offsets already on the device."""
    settings = ([CFG.replace(ignore_eos=True), CFG.replace(temperature=1.0, seed=3, top_k=5),
                 CFG.replace(decoder="credit", ignore_eos=True)] * 2)[:n]
    eager = _engine(model, cuda_graphs=False, max_unroll=unroll).generate(_prompts(n), settings)
    engine = _engine(model, cuda_graphs=True, max_unroll=unroll)
    graphed = engine.generate(_prompts(n), settings)
    assert engine.graphs.replays > 0
    assert GraphedForward.bucket(n) in {key[0] for key in engine.graphs.graphs}
    assert [g.token_ids for g in graphed] == [g.token_ids for g in eager]
    assert [g.num_forwards for g in graphed] == [g.num_forwards for g in eager]
    assert len(graphed[0].token_ids) == CFG.max_new_tokens  # three blocks: COMMIT forwards replayed too


@pytest.fixture(scope="module")
def unpreempted(talkative_model):
    """The answers to the preemption test's requests in a pool that holds them all (eager forwards, which
    the test above shows decode what graphs decode)."""
    model = copy.deepcopy(talkative_model)
    model.use_pool_kernel = True
    return _engine(model, cuda_graphs=False).generate(_prompts(6), CFG.replace(ignore_eos=True))


@pytest.mark.parametrize("mode", PREEMPTION_MODES)
def test_preempted_requests_resume_under_graphs_with_the_same_answers(replaying_on_cpu, model, unpreempted,
                                                                      rebuild_replays, mode):
    """A resumed request's new slot and pages reach the graphs through the page table. In recompute mode
    the rebuild forwards of committed blocks have a COMMIT forward's shape and replay its graphs."""
    prompts, cfg = _prompts(6), CFG.replace(ignore_eos=True)
    need = max(_engine(model).cache.pages_for(len(p) + cfg.max_new_tokens) for p in prompts)
    engine = _engine(model, kv_cache_tokens=2 * need * 4, cuda_graphs=True, preemption_mode=mode)
    replays_per_rebuild = rebuild_replays(engine)
    gens = engine.generate(prompts, cfg)
    assert engine.stats()["preemptions"] > 0
    assert [g.token_ids for g in gens] == [g.token_ids for g in unpreempted]
    if mode == "recompute":
        assert engine.stats()["rebuilt_tokens"] > 0 and sum(replays_per_rebuild) > 0
    else:
        assert engine.stats()["swapped_bytes"] > 0 and replays_per_rebuild == []


def test_after_a_warm_up_only_its_block_sizes_replay_graphs(replaying_on_cpu, model):
    """Other block sizes decode eagerly (the same tokens), and a new warm-up drops the graphs of the sizes
    it does not name."""
    prompts = _prompts(2)
    engine = _engine(model, max_batch_size=4, cuda_graphs=True)
    assert engine.warmup([8]) == 6  # DENOISE and COMMIT for buckets 1, 2 and 4
    replays = engine.graphs.replays
    other = CFG.replace(block_size=4, max_new_tokens=16)
    eager = _engine(model, max_batch_size=4, cuda_graphs=False).generate(prompts, other)
    assert [g.token_ids for g in engine.generate(prompts, other)] == [g.token_ids for g in eager]
    assert len(engine.graphs.graphs) == 6 and engine.graphs.replays == replays  # no capture, no replay
    engine.generate(prompts, CFG.replace(max_new_tokens=16))
    assert engine.graphs.replays > replays and len(engine.graphs.graphs) == 6
    assert engine.warmup([4]) == 6 and {key[3] for key in engine.graphs.graphs} == {4}
