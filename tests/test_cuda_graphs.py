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
from torch.utils._python_dispatch import TorchDispatchMode

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
    """A captured CUDA graph's stand-in: replay() runs the captured function (a forward, or a decode step)
    again on the graph's static inputs and writes its result into the graph's static output."""

    def __init__(self, forward) -> None:
        self.forward = forward
        self.logits = forward()

    def replay(self) -> None:
        self.logits.copy_(self.forward())


class OpsOutsideGraphs(TorchDispatchMode):
    """Counts the tensor ops run outside EagerReplay.replay, views aside: on a GPU, the kernels a step
    launches besides its graph replays."""

    NO_KERNEL = (torch.ops.aten.resolve_conj.default, torch.ops.aten.resolve_neg.default)

    def __init__(self, monkeypatch) -> None:
        super().__init__()
        self.count, self.in_replay = 0, False
        replay = EagerReplay.replay

        def counted_replay(graph):
            self.in_replay = True
            try:
                replay(graph)
            finally:
                self.in_replay = False

        monkeypatch.setattr(EagerReplay, "replay", counted_replay)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (self.in_replay or func.is_view or func in self.NO_KERNEL):
            self.count += 1
        return func(*args, **(kwargs or {}))


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


# Greedy rows of every stateless decoder, stop rules on and off, and one with more stop ids than the
# narrowest decode graph holds (STOP_WIDTHS): one group, each row choosing its rule in the graph.
GREEDY = [CFG, CFG.replace(decoder="factor", factor=2.0, early_stop=True),
          CFG.replace(decoder="hierarchical", threshold=0.95, low_threshold=0.5),
          CFG.replace(decoder="fixed_k", tokens_per_step=2, stops_last=False),
          CFG.replace(threshold=0.7, stops_last=False, early_stop=True, stop_token_ids=[20, 21, 22, 23, 24])]


@pytest.mark.parametrize("n,unroll", [(5, 1), (2, 4)])
def test_decode_graphs_commit_what_the_eager_decoders_commit(replaying_on_cpu, model, n, unroll):
    """Greedy groups replay their decode step after the forward (decoders.greedy_step, per-row choices in
    tensors): the tokens and forwards of eager decoding, with rows padded to the bucket (5 -> 8) and
    unrolled DENOISE steps that feed each new block to the next forward on the device."""
    prompts, settings = _prompts(n), GREEDY[:n] if n > 2 else [GREEDY[2], GREEDY[4]]
    eager = _engine(model, cuda_graphs=False, max_unroll=unroll, expected_tpf=1.0).generate(prompts, settings)
    engine = _engine(model, cuda_graphs=True, max_unroll=unroll, expected_tpf=1.0)
    graphed = engine.generate(prompts, settings)
    assert engine.graphs.step_replays == engine.graphs.replays > 0  # every replayed forward decoded in a graph
    assert [g.token_ids for g in graphed] == [g.token_ids for g in eager]
    assert [g.num_forwards for g in graphed] == [g.num_forwards for g in eager]
    assert [g.finish_reason for g in graphed] == [g.finish_reason for g in eager]
    assert any(g.finish_reason == "stop" for g in graphed) and any(g.token_ids for g in graphed)


def _ops_per_denoise_step(engine, requests: int, monkeypatch) -> float:
    """Ops launched outside graph replays per step, in DENOISE steps of `requests` greedy answers that never
    end (threshold 1: one position per step), after their prefill and first steps."""
    for prompt in _prompts(requests):
        engine.add_request(prompt, CFG.replace(threshold=1.0, ignore_eos=True, max_new_tokens=64))
    for _ in range(3):
        engine.step()
    counter = OpsOutsideGraphs(monkeypatch)
    with counter:
        for _ in range(4):
            engine.step()
    return counter.count / 4


def test_an_fp8_models_replayed_graphs_decode_what_its_eager_forwards_decode(replaying_on_cpu, model):
    """quantization="fp8": the graphs capture the FP8 projections (per-token input scales computed on
    the device), greedy groups with their decode step, a sampling row without; padded rows too (3 -> 4)."""
    settings = [GREEDY[0], GREEDY[2], CFG.replace(temperature=1.0, seed=3, top_k=5)]
    eager = _engine(copy.deepcopy(model), cuda_graphs=False, quantization="fp8").generate(_prompts(3), settings)
    engine = _engine(copy.deepcopy(model), cuda_graphs=True, quantization="fp8")
    graphed = engine.generate(_prompts(3), settings)
    assert engine.quantization == "fp8" and engine.graphs.step_replays > 0
    assert [g.token_ids for g in graphed] == [g.token_ids for g in eager]
    assert [g.num_forwards for g in graphed] == [g.num_forwards for g in eager]


def test_a_group_larger_than_the_largest_bucket_replays_graphs_in_chunks(replaying_on_cpu, model, monkeypatch):
    """With buckets up to 4, a group of 6 rows is a chunk of 4 and a chunk of 2, each a graph replay: only
    the PREFILL forward runs eagerly. The chunk with the sampling row decodes eagerly, the other in its
    decode graph; the tokens are those of eager forwards."""
    monkeypatch.setattr(cuda_graphs, "ROW_BUCKETS", (1, 2, 4))
    prompts = _prompts(6)
    settings = [CFG.replace(ignore_eos=True)] * 4 + [CFG.replace(temperature=1.0, seed=2, top_k=5, ignore_eos=True),
                                                     GREEDY[1].replace(ignore_eos=True)]
    eager = _engine(model, cuda_graphs=False).generate(prompts, settings)
    engine = _engine(model, cuda_graphs=True)
    eager_forwards = []
    eager_logits = engine._eager_logits
    monkeypatch.setattr(engine, "_eager_logits", lambda reqs, *a: eager_forwards.append(len(reqs)) or
                        eager_logits(reqs, *a))
    graphed = engine.generate(prompts, settings)
    assert [g.token_ids for g in graphed] == [g.token_ids for g in eager]
    assert [g.num_forwards for g in graphed] == [g.num_forwards for g in eager]
    assert eager_forwards == [6]  # the prompts' prefill; every group of 6 after it ran as 4 + 2
    assert max(key[0] for key in engine.graphs.graphs) == 4
    assert 0 < engine.graphs.step_replays < engine.graphs.replays


def test_a_chunked_group_launches_a_few_ops_per_chunk_where_one_eager_forward_launches_hundreds(
        replaying_on_cpu, model, monkeypatch):
    """What a DENOISE step of 6 greedy rows costs the host besides its replays with buckets up to 4: per
    chunk the block stack, its copy in and the clone out. One eager forward and decode of the whole group
    (as before chunking) launches every layer's kernels: >10x as many with this two-layer model."""
    monkeypatch.setattr(cuda_graphs, "ROW_BUCKETS", (1, 2, 4))

    def ops_per_step(chunked: bool) -> float:
        engine = _engine(model, cuda_graphs=True)
        if not chunked:
            monkeypatch.setattr(engine, "_graph_sized", lambda group: [group])
        return _ops_per_denoise_step(engine, 6, monkeypatch)

    chunked, whole = ops_per_step(True), ops_per_step(False)
    assert chunked <= 2 * 3 and whole >= 10 * chunked, (chunked, whole)  # measured: 6 and 266


def test_a_group_with_a_row_that_samples_decodes_eagerly_after_its_graphed_forward(replaying_on_cpu, model):
    engine = _engine(model, cuda_graphs=True)
    engine.generate(_prompts(2), [CFG.replace(ignore_eos=True), CFG.replace(temperature=1.0, seed=1, ignore_eos=True)])
    assert engine.graphs.replays > 0 and engine.graphs.step_replays == 0


def test_a_row_with_allowed_token_ids_decodes_eagerly_after_its_graphed_forward(replaying_on_cpu, model):
    """The greedy decode graph knows nothing of allowed_token_ids: such a row's group takes the eager decode, with
    the tokens of eager forwards, all of them allowed; beside a free row, the steps it shares too."""
    prompts = _prompts(2)
    free = _engine(model, cuda_graphs=False).generate(prompts, CFG.replace(ignore_eos=True))
    allowed = sorted({t for g in free for t in g.token_ids})[1::2]
    only = CFG.replace(ignore_eos=True, allowed_token_ids=allowed)
    engine = _engine(model, cuda_graphs=True)
    alone = engine.generate(prompts[1:], only)[0]
    assert engine.graphs.replays > 0 and engine.graphs.step_replays == 0
    assert set(alone.token_ids) <= set(allowed) and alone.token_ids != free[1].token_ids
    settings = [CFG.replace(ignore_eos=True), only]
    eager = _engine(model, cuda_graphs=False).generate(prompts, settings)
    graphed = _engine(model, cuda_graphs=True).generate(prompts, settings)
    assert [g.token_ids for g in graphed] == [g.token_ids for g in eager] and graphed[1].token_ids == alone.token_ids


def test_json_rows_decode_after_their_graphed_forwards_what_they_decode_eagerly(replaying_on_cpu, json_tokenizer):
    """JSON mode reads its candidates on the host: its rows (greedy or sampled) take the eager decode after a
    replayed forward, beside a free row, with the tokens of eager forwards."""
    from conftest import make_config

    net = dllm.build_model(make_config(json_tokenizer), seed=0)
    net.use_pool_kernel = True
    settings = [CFG.replace(response_format="json_object"), CFG,
                CFG.replace(response_format="json_object", temperature=1.0, seed=2)]
    eager = _engine(net, tokenizer=json_tokenizer, cuda_graphs=False).generate(_prompts(3), settings)
    engine = _engine(net, tokenizer=json_tokenizer, cuda_graphs=True)
    graphed = engine.generate(_prompts(3), settings)
    assert engine.graphs.replays > engine.graphs.step_replays  # eager decodes after replayed forwards
    assert [g.token_ids for g in graphed] == [g.token_ids for g in eager]
    assert graphed[0].text.startswith("{") and graphed[2].text.startswith("{")


def test_a_graphed_greedy_step_launches_a_few_ops_besides_its_two_replays(replaying_on_cpu, model, monkeypatch):
    """What a DENOISE step costs the host besides the replays: the group's inputs in, the new blocks and
    their status out (one read). Decoding eagerly after the graphed forward launches >10x as many."""
    graphed, eager = (_ops_per_denoise_step(_engine(model, cuda_graphs=True, decode_graphs=decode), 1, monkeypatch)
                      for decode in (True, False))
    assert graphed <= 3 and eager >= 10 * graphed, (graphed, eager)  # the block's stack, its copy in, its clone out


def test_warm_up_captures_the_decode_steps_of_its_decoders(replaying_on_cpu, model):
    engine = _engine(model, max_batch_size=4, cuda_graphs=True)
    assert engine.warmup([8], ["hierarchical", "credit"]) == 6  # credit has no decode graph (its state is eager)
    assert engine.stats()["decode_graphs"] == 6
    assert {key[1] for key in engine.graphs.steps} == {("hierarchical",)}
    engine.generate(_prompts(3), CFG.replace(decoder="hierarchical", max_new_tokens=16))
    assert engine.graphs.step_replays > 0 and engine.stats()["decode_graphs"] == 6  # nothing captured while serving
    with pytest.raises(ValueError, match="decode_graphs=True needs cuda_graphs"):
        _engine(model, cuda_graphs=False, decode_graphs=True)


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
