"""The pool-attention kernel and the CUDA-graph decode path.

Without a GPU the Triton kernel runs in Triton's CPU interpreter (conftest sets TRITON_INTERPRET),
so its indexing, split-merging and masking are checked here on every CI run; the GPU tests check
bf16 accuracy and that graph replay decodes exactly what eager decoding does.
"""

import math

import pytest
import torch

import dllm
from dllm.kernels import pool_attention as pa
from dllm.model import CacheView

needs_triton = pytest.mark.skipif(not pa.available("cuda" if torch.cuda.is_available() else "cpu"),
                                  reason="needs triton (CUDA, or its CPU interpreter)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(q, k_pool, v_pool, table, slots, kv_lens):
    """float64 attention of each row against its slot's keys [0, kv_len), read page by page."""
    out = []
    for i in range(q.shape[0]):
        k = k_pool[table[slots[i]].long()].flatten(0, 1)[: kv_lens[i]].double()
        v = v_pool[table[slots[i]].long()].flatten(0, 1)[: kv_lens[i]].double()
        group = q.shape[2] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", q[i].double(), k) / math.sqrt(q.shape[-1])
        out.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), v))
    return torch.stack(out)


def paged_pool(n_slots, capacity, kv_heads, head_dim, page_size, generator, dtype=torch.float32, device="cpu"):
    """Random K/V pages [n_pages, page_size, kv_heads, head_dim] and a page table [n_slots, pages]
    that scatters each slot's pages over the pool (in no order, some pages unused)."""
    pages = -(-capacity // page_size)
    n_pages = n_slots * pages + 3
    k = torch.randn(n_pages, page_size, kv_heads, head_dim, generator=generator).to(device, dtype)
    v = torch.randn(n_pages, page_size, kv_heads, head_dim, generator=generator).to(device, dtype)
    table = torch.randperm(n_pages, generator=generator)[:n_slots * pages].view(n_slots, pages).int().to(device)
    return k, v, table


@needs_triton
@pytest.mark.parametrize("rows,q_len,heads,kv_heads,head_dim,splits,block_m,block_n,in_kernel,page_size", [
    (2, 16, 4, 4, 32, None, None, 64, False, 16),  # launch chosen to fill the device
    (3, 20, 4, 2, 16, 3, None, 64, False, 8),  # grouped-query heads, q_len not a power of two, 3 key chunks
    (1, 64, 2, 2, 32, 1, None, 64, False, 200),  # one chunk: written directly, no merge; one page per slot
    (2, 8, 2, 1, 16, 7, None, 64, False, 32),  # more chunks than some rows have key blocks: empty chunks weigh nothing
    (1, 40, 2, 2, 32, 2, 16, 128, False, 64),  # several query blocks per head (the last one partial), wide key steps
    (2, 64, 2, 2, 16, 1, 32, 32, False, 7),  # query blocks without key chunks, narrow key steps, odd pages
    (3, 20, 4, 2, 16, 3, 16, 64, True, 16),  # chunks merged by the last one to finish, in the same kernel
    (2, 8, 2, 1, 16, 7, None, 64, True, 1),  # ... with empty chunks; a page per key
])
def test_pool_attention_matches_reference(rows, q_len, heads, kv_heads, head_dim, splits, block_m, block_n,
                                          in_kernel, page_size):
    g = torch.Generator().manual_seed(rows * 100 + q_len)
    n_slots, capacity = 4, 200
    q = torch.randn(rows, q_len, heads, head_dim, generator=g)
    k_pool, v_pool, table = paged_pool(n_slots, capacity, kv_heads, head_dim, page_size, g)
    slots = torch.randperm(n_slots, generator=g)[:rows]
    kv_lens = torch.randint(q_len, capacity, (rows,), generator=g)
    ref = reference(q, k_pool, v_pool, table, slots, kv_lens)
    tolerance = 5e-3 if DEVICE == "cuda" else 1e-5  # the GPU's fp32 dots run in tf32
    for _ in range(2):  # twice: an in-kernel merge leaves its chunk counters zero for the next launch
        out = pa.pool_attention(q.to(DEVICE), k_pool.to(DEVICE), v_pool.to(DEVICE), table.to(DEVICE),
                                slots.to(DEVICE), kv_lens.to(DEVICE), splits=splits, block_m=block_m,
                                block_n=block_n, merge_in_kernel=in_kernel)
        assert out.shape == q.shape
        assert ((out.double().cpu() - ref).norm() / ref.norm()).item() < tolerance


@needs_triton
def test_pool_attention_ignores_keys_past_kv_len():
    q = torch.randn(1, 8, 2, 16, device=DEVICE)
    k_pool, v_pool = torch.randn(4, 16, 2, 16, device=DEVICE), torch.randn(4, 16, 2, 16, device=DEVICE)
    table = torch.tensor([[2, 0, 3, 1]], dtype=torch.int32, device=DEVICE)
    kv, slots = torch.tensor([20], device=DEVICE), torch.tensor([0], device=DEVICE)
    a = pa.pool_attention(q, k_pool, v_pool, table, slots, kv, splits=2)
    k_pool[0, 4:], v_pool[0, 4:] = 1e4, float("nan")  # garbage beyond kv_len (keys 20.. of the slot's 2nd page)
    k_pool[[3, 1]], v_pool[[3, 1]] = 1e4, float("nan")  # and in the pages past it
    b = pa.pool_attention(q, k_pool, v_pool, table, slots, kv, splits=2)
    assert torch.equal(a, b)


def test_pool_attention_rejects_unsupported_head_dim():
    if pa.triton is None:
        pytest.skip("triton not installed")
    with pytest.raises(ValueError, match="head_dim"):
        pa.pool_attention(torch.randn(1, 4, 2, 24), torch.randn(1, 8, 2, 24), torch.randn(1, 8, 2, 24),
                          torch.zeros(1, 1, dtype=torch.int32), torch.tensor([0]), torch.tensor([8]))


@needs_triton
def test_engine_with_pool_kernel_decodes_like_sdpa(talkative_model):
    """The engine's tokens and forward counts are the same whether the cache is read by the
    kernel or by gather + SDPA (staggered prompts, several blocks, a COMMIT pass)."""
    if torch.cuda.is_available():
        pytest.skip("CPU model; on CUDA the graph test below runs the kernel in both engines")
    prompts = [list(range(7, 7 + n)) for n in (3, 9, 14)]
    cfg = dllm.GenerationConfig(block_size=8, max_new_tokens=24)
    model = talkative_model
    sdpa = dllm.Engine(model, max_batch_size=4, max_model_len=128).generate(prompts, cfg)
    assert all(g.token_ids for g in sdpa)
    model.use_pool_kernel = True
    try:
        kernel = dllm.Engine(model, max_batch_size=4, max_model_len=128).generate(prompts, cfg)
    finally:
        model.use_pool_kernel = False
    assert [g.token_ids for g in kernel] == [g.token_ids for g in sdpa]
    assert [g.num_forwards for g in kernel] == [g.num_forwards for g in sdpa]


def test_cuda_graphs_refused_without_cuda(tiny_config):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    model = dllm.build_model(tiny_config)
    with pytest.raises(ValueError, match="cuda_graphs=True needs"):
        dllm.Engine(model, max_batch_size=2, max_model_len=64, cuda_graphs=True)


@pytest.mark.gpu
def test_pool_attention_bf16_on_gpu():
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 64, 8, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    k_pool, v_pool, table = paged_pool(3, 1024, 8, 128, 16, torch.Generator().manual_seed(0), torch.bfloat16, "cuda")
    slots, kv = torch.tensor([2, 0], device="cuda"), torch.tensor([1000, 300], device="cuda")
    out = pa.pool_attention(q, k_pool, v_pool, table, slots, kv)
    ref = reference(q.cpu(), k_pool.cpu(), v_pool.cpu(), table.cpu(), slots.cpu(), kv.cpu())
    assert torch.isfinite(out).all()
    assert ((out.double().cpu() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.gpu
def test_cuda_graph_engine_decodes_like_eager(tiny_config):
    """Graph replay gives the same tokens as eager decoding (batch sizes that fill their bucket)."""
    model = dllm.build_model(tiny_config, seed=0).to("cuda", torch.bfloat16)
    with torch.no_grad():  # stop tokens get logit 0, below the best of 40 random logits: never chosen,
        for t in tiny_config.stop_token_ids:  # so every request runs 3 blocks of DENOISE and COMMIT steps
            model.model.transformer["ff_out"].weight[t] = 0.0
    cfg = dllm.GenerationConfig(block_size=8, max_new_tokens=24)
    for n in (1, 2, 4):
        prompts = [list(range(7, 7 + 3 + 2 * i)) for i in range(n)]
        # both with the compiled block functions: the same kernels, eager launches vs graph replay
        eager = dllm.Engine(model, max_batch_size=4, max_model_len=128, cuda_graphs=False,
                            compile_blocks=True).generate(prompts, cfg)
        engine = dllm.Engine(model, max_batch_size=4, max_model_len=128, cuda_graphs=True, compile_blocks=True)
        assert engine.warmup([8]) == 6  # DENOISE + COMMIT for buckets 1, 2, 4
        graphed = engine.generate(prompts, cfg)
        assert engine.stats()["cuda_graphs"] == engine.stats()["decode_graphs"] == 6  # nothing captured while serving
        assert engine.graphs.replays == engine.graphs.step_replays > 0  # greedy rows: decode steps replayed too
        assert [g.token_ids for g in graphed] == [g.token_ids for g in eager]
        assert [g.num_forwards for g in graphed] == [g.num_forwards for g in eager]


@pytest.mark.gpu
def test_after_a_warm_up_only_its_block_sizes_replay_graphs(tiny_config):
    """Graph memory stays what the warm-up took: other block sizes decode eagerly (same tokens), and a
    new warm-up drops the graphs of sizes it does not name."""
    model = dllm.build_model(tiny_config, seed=0).to("cuda", torch.bfloat16)
    prompts = [list(range(7, 12)), list(range(9, 16))]
    engine = dllm.Engine(model, max_batch_size=4, max_model_len=128, cuda_graphs=True)
    assert engine.warmup([8]) == 6
    replays = engine.graphs.replays
    other = dllm.GenerationConfig(block_size=4, max_new_tokens=16)
    eager = dllm.Engine(model, max_batch_size=4, max_model_len=128, cuda_graphs=False,
                        compile_blocks=True).generate(prompts, other)
    assert [g.token_ids for g in engine.generate(prompts, other)] == [g.token_ids for g in eager]
    assert len(engine.graphs.graphs) == 6 and engine.graphs.replays == replays  # no capture, no replay
    engine.generate(prompts, dllm.GenerationConfig(block_size=8, max_new_tokens=16))
    assert engine.graphs.replays > replays
    assert engine.warmup([4]) == 6 and {key[3] for key in engine.graphs.graphs} == {4}


def test_compiled_blocks_compute_the_same_function(tiny_config):
    """torch.compile'd block functions (fused norms, rotary, residuals; with a cache, the K/V stored
    into the pool by the same kernels) give the eager logits and the eager pool, for plain, cached and
    differently-shaped forwards (one dynamic-shape compile serves them all)."""
    model = dllm.build_model(tiny_config, seed=1)
    ids = torch.randint(0, tiny_config.vocab_size - 4, (2, 12))
    longer = torch.randint(0, tiny_config.vocab_size - 4, (3, 20))
    cfg = tiny_config

    def forwards():
        cache = dllm.engine.KVCache(cfg, 4, 64, page_size=8, device="cpu", dtype=torch.float32)
        rows = [cache.allocate(64) for _ in range(4)]
        slots = torch.tensor([rows[3], rows[1]])
        prefill = model(ids, cache=CacheView(cache.k, cache.v, cache.table, slots, torch.tensor([0, 0])))
        block = model(ids[:, :5], cache=CacheView(cache.k, cache.v, cache.table, slots, torch.tensor([12, 12])))
        return [model(ids), model(longer), prefill, block, cache.k, cache.v]

    with torch.no_grad():
        eager = forwards()
        model.compile_blocks()
        try:
            compiled = forwards()
        finally:
            model.block_functions = dllm.model.EAGER
    written = eager[-2].abs().sum(dim=(0, 2, 3, 4)).nonzero().flatten().tolist()
    assert written == [8, 9, 10, 24, 25, 26]  # positions 0-16 of the rows' slots (pages 8-15 and 24-31), no other
    for a, b in zip(eager, compiled):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
