"""Baselines: LLaDA vanilla and Fast-dLLM style generation on the same model."""

import pytest
import torch

import dllm
from dllm.baselines import fast_dllm_generate, llada_generate


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(7, 40, (n,), generator=g).tolist() for n in (4, 9, 6)]


def test_llada_vanilla_spends_exactly_steps_forwards_and_fills_the_canvas(confident_model):
    out = llada_generate(confident_model, _prompts(), gen_length=16, steps=16, block_length=8)
    assert out.num_forwards == 16
    mask = confident_model.config.mask_token_id
    assert all(mask not in row for row in out.token_ids)
    assert all(len(row) <= 16 for row in out.token_ids)


def test_llada_vanilla_padded_batch_equals_each_prompt_alone(confident_model):
    model = confident_model
    batch = llada_generate(model, _prompts(), gen_length=16, steps=8, block_length=8)
    alone = [llada_generate(model, [p], gen_length=16, steps=8, block_length=8).token_ids[0] for p in _prompts()]
    assert batch.token_ids == alone


def test_llada_vanilla_argument_errors(confident_model):
    with pytest.raises(ValueError, match="multiple of block_length"):
        llada_generate(confident_model, _prompts(), gen_length=10, block_length=4)
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        llada_generate(confident_model, _prompts(), gen_length=16, steps=5, block_length=8)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_fast_dllm_single_block_equals_engine_first_block(confident_model, cache):
    """With one block the approximate caches coincide with dLLM-Var's prefill + denoise."""
    b = 8
    fast = fast_dllm_generate(confident_model, _prompts(), gen_length=b, block_length=b, threshold=0.9, cache=cache)
    for prompt, tokens in zip(_prompts(), fast.token_ids):
        engine = dllm.Engine(confident_model, max_batch_size=1, max_model_len=64)
        gen = engine.generate([prompt], dllm.GenerationConfig(block_size=b, max_new_tokens=b, stops_last=False))[0]
        assert gen.token_ids == tokens


def test_fast_dllm_prefix_and_dual_decode_the_whole_canvas(confident_model):
    for cache in ("prefix", "dual"):
        out = fast_dllm_generate(confident_model, _prompts(), gen_length=24, block_length=8, cache=cache)
        assert out.num_forwards >= 3  # at least one refresh per block
        assert all(confident_model.config.mask_token_id not in row for row in out.token_ids)
    with pytest.raises(ValueError, match="cache"):
        fast_dllm_generate(confident_model, _prompts(), cache="none")
