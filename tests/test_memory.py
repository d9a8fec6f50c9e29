"""Sizing the K/V pool from GPU memory (gpu_memory_utilization): the budget, the probe, the refusals."""

import pytest
import torch

import dllm
from dllm.engine import Phase, memory

GiB = 1 << 30


def test_a_token_of_llada_8b_cache_is_512_kib_in_bf16():
    assert memory.kv_bytes_per_token(dllm.LLaDAConfig(), torch.bfloat16) == 512 * 1024
    assert memory.kv_bytes_per_token(dllm.LLaDAConfig(), torch.float32) == 1024 * 1024


def test_the_pool_gets_what_is_left_of_the_share_in_whole_pages():
    plan = memory.plan_pool(total=80 * GiB, utilization=0.9, other=1 * GiB, weights=16 * GiB, activations=5 * GiB,
                            bytes_per_token=512 * 1024, page_size=16, min_tokens=4096)
    budget = int(0.9 * 80 * GiB) - 22 * GiB
    assert plan.pool_tokens % 16 == 0
    assert plan.pool_bytes <= budget < plan.pool_bytes + 16 * 512 * 1024  # the largest whole number of pages
    assert plan.pool_tokens == 102_400  # 72 - 22 = 50 GiB at 0.5 MiB a token
    assert plan.as_dict()["pool_bytes"] == plan.pool_bytes
    assert "K/V pool 102400 tokens (50.00 GiB) = 0.9 x 80.00 GiB - other 1.00 GiB - weights 16.00 GiB" in str(plan)


def test_a_share_too_small_for_one_full_length_request_is_refused_with_the_breakdown():
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0.25 leaves room for 0 K/V cache tokens .*"
                                         r"weights 16.00 GiB.* one request of max_model_len needs 4096"):
        memory.plan_pool(total=80 * GiB, utilization=0.25, other=1 * GiB, weights=16 * GiB, activations=5 * GiB,
                         bytes_per_token=512 * 1024, page_size=16, min_tokens=4096)
    with pytest.raises(ValueError, match="leaves room for 2048 K/V cache tokens"):
        memory.plan_pool(total=80 * GiB, utilization=0.9, other=1 * GiB, weights=16 * GiB, activations=54 * GiB,
                         bytes_per_token=512 * 1024, page_size=16, min_tokens=4096)


def test_the_probe_fills_one_prefill_forward_then_decodes_a_full_batch_through_a_commit(tiny_config):
    model = dllm.build_model(tiny_config, seed=0)
    load = memory.probe_load(block_size=8, max_batch_size=6, max_model_len=64, max_prefill_tokens=128)
    assert (load.long_prompts, load.long_prompt_len, load.batch, load.blocks) == (2, 56, 6, 2)
    engine = dllm.Engine(model, max_batch_size=6, max_model_len=64, max_prefill_tokens=128, page_size=4,
                         share_prefills=False, prefix_caching=False, kv_cache_tokens=load.pool_tokens(4))
    forwards = []
    run_group = engine._run_group

    def record(reqs):
        forwards.append((reqs[0].phase, len(reqs), reqs[0].query_len(), reqs[0].config.top_p))
        run_group(reqs)

    engine._run_group = record
    memory.run_probe(engine, load)
    assert not engine.has_unfinished() and engine.stats()["preemptions"] == 0
    # Two prompts of max_model_len - B fill the 128-token prefill budget in one forward...
    assert (Phase.PREFILL, 2, 64, 0.9) in forwards
    # ...then every slot decodes at once: the prefill's block, and a COMMIT forward of [finished block + B masks].
    assert (Phase.PREFILL, 6, 1 + 8, 0.9) in forwards
    assert (Phase.COMMIT, 6, 16, 0.9) in forwards
    assert max(rows for _, rows, _, _ in forwards) == 6


def test_a_probe_block_that_leaves_no_room_for_a_prompt_is_refused():
    with pytest.raises(ValueError, match="block size 64 does not fit max_model_len=64"):
        memory.probe_load(block_size=64, max_batch_size=4, max_model_len=64, max_prefill_tokens=8192)
    assert memory.probe_load(block_size=40, max_batch_size=4, max_model_len=64, max_prefill_tokens=8192).blocks == 1


def test_an_engine_refuses_blocks_larger_than_its_max_block_size(tiny_config):
    model = dllm.build_model(tiny_config, seed=0)
    engine = dllm.Engine(model, max_model_len=64, max_block_size=8)
    with pytest.raises(ValueError, match="block_size 16 is larger than this engine's max_block_size 8"):
        engine.add_request([5, 6, 7], dllm.GenerationConfig(block_size=16))
    assert not engine.has_unfinished()
    engine.add_request([5, 6, 7], dllm.GenerationConfig(block_size=8, max_new_tokens=8))
    with pytest.raises(ValueError, match=r"max_block_size must be in \[1, max_model_len - 1\]"):
        dllm.Engine(model, max_model_len=64, max_block_size=64)


def test_gpu_memory_utilization_is_checked_before_anything_runs(tiny_config):
    model = dllm.build_model(tiny_config, seed=0)
    with pytest.raises(ValueError, match="give kv_cache_tokens or gpu_memory_utilization, not both"):
        dllm.Engine(model, max_model_len=64, kv_cache_tokens=256, gpu_memory_utilization=0.9)
    with pytest.raises(ValueError, match=r"gpu_memory_utilization must be in \(0, 1\], got 1.5"):
        dllm.Engine(model, max_model_len=64, gpu_memory_utilization=1.5)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="the model is on cpu: set kv_cache_tokens instead"):
            dllm.Engine(model, max_model_len=64, gpu_memory_utilization=0.9)


@pytest.mark.gpu
def test_a_pool_sized_by_gpu_memory_keeps_the_device_within_the_share():
    """The pool takes the budget, and full batches at max_block_size (graphs of every bucket, top-p
    sampling, logprobs) and at a smaller, eager block size then run without the device's memory in use
    passing the share."""
    config = dllm.LLaDAConfig(d_model=1024, n_layers=8, n_heads=16, n_kv_heads=16, mlp_hidden_size=2816,
                              vocab_size=32000, embedding_size=32000, max_sequence_length=2048,
                              mask_token_id=31999, eos_token_id=31998, eot_token_id=31997, bos_token_id=1,
                              pad_token_id=31998)
    model = dllm.build_model(config, device="cuda", dtype=torch.bfloat16, seed=0)
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    share = (total - free + 6 * GiB) / total  # ~6 GiB for this engine's pool and activations
    engine = dllm.Engine(model, max_batch_size=16, max_model_len=2048, max_prefill_tokens=4096,
                         gpu_memory_utilization=share, max_block_size=32)
    plan = engine.memory_plan
    assert plan.pool_tokens == engine.cache.num_pages * engine.cache.page_size > 2048
    assert engine.cache.bytes >= plan.pool_bytes  # plus the scratch page
    assert plan.activations > 0 and plan.weights > 0 and engine.max_block_size == 32
    engine.warmup([32])
    memory.run_probe(engine, memory.probe_load(32, 16, 2048, 4096), seed=1)  # through the graphs
    memory.run_probe(engine, memory.probe_load(16, 16, 2048, 4096), seed=2)  # a block size without graphs: eager
    torch.cuda.synchronize()
    free, _ = torch.cuda.mem_get_info()
    assert total - free <= share * total + 256 * 1024 * 1024  # allocator rounding of the new graph pool
