"""FP8 weights for inference (dllm.quantization): what an FP8 projection computes, what quantising a
model changes and keeps, and the engine on an FP8 model. The GPU test (graphs, compiled blocks, FP8
matmuls on the tensor cores) is in tests/test_engine.py."""

import copy

import pytest
import torch
from torch import nn

import dllm
from dllm.quantization import FP8, FP8_MAX, Fp8Linear, quantize_rows

CFG = dllm.GenerationConfig(block_size=8, max_new_tokens=32, early_stop=True, stops_last=True)


def test_rows_quantise_to_e4m3_with_their_largest_magnitude_at_448():
    x = torch.randn(4, 64) * torch.tensor([[1e-3], [1.0], [1e3], [0.0]])
    q, scale = quantize_rows(x)
    assert q.dtype == FP8 and scale.shape == (4, 1)
    back = q.float() * scale
    assert back[:3].abs().amax(1).tolist() == pytest.approx(x[:3].abs().amax(1).tolist(), rel=1e-6)
    assert q[:3].float().abs().amax(1).tolist() == [FP8_MAX] * 3
    # E4M3 keeps 3 mantissa bits: each value within 2^-4 of itself relative to its magnitude (normal range)
    normal = x[:3].abs() > scale[:3] * 2.0 ** -6
    assert ((back[:3] - x[:3]).abs() <= 2.0 ** -4 * x[:3].abs())[normal].all()
    assert torch.equal(back[3], torch.zeros(64))  # an all-zero row: zeros, no NaN


def test_an_fp8_projection_multiplies_the_quantised_input_by_the_quantised_weight_row_by_row():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=False)
    fp8 = Fp8Linear(linear)
    assert fp8.weight.dtype == FP8 and fp8.scale.shape == (1, 48)
    x = torch.randn(2, 3, 64)
    x[1, 2] *= 1000.0  # one token far larger than the others
    out = fp8(x)
    q, s = quantize_rows(x.reshape(-1, 64))
    expected = (q.float() * s) @ fp8.dequantized().t()
    assert out.shape == (2, 3, 48) and torch.allclose(out.reshape(-1, 48), expected, rtol=1e-5, atol=1e-5)
    # Per-token scales: the large token does not coarsen the others (one scale for all would)
    assert torch.allclose(fp8(x[:1]), out[:1], rtol=1e-5, atol=1e-5)
    exact = linear(x)
    assert ((out - exact).norm() / exact.norm()).item() < 0.08
    with pytest.raises(ValueError, match="bias-free"):
        Fp8Linear(nn.Linear(64, 48, bias=True))


def test_quantising_a_model_stores_its_block_projections_in_one_byte_and_keeps_its_logits(tiny_config):
    model = dllm.build_model(tiny_config, seed=0, dtype=torch.bfloat16)
    quantized = copy.deepcopy(model)
    saved = dllm.quantize_fp8(quantized)
    blocks = quantized.model.transformer["blocks"]
    projections = [m for b in blocks for m in b.modules() if isinstance(m, Fp8Linear)]
    assert len(projections) == 7 * tiny_config.n_layers
    weights = sum(m.weight.numel() for m in projections)
    assert saved == weights - sum(m.scale.numel() * 4 for m in projections)  # 2 bytes -> 1, plus fp32 scales
    head, emb = quantized.model.transformer["ff_out"], quantized.model.transformer["wte"]
    assert type(head) is nn.Linear and head.weight.dtype == emb.weight.dtype == torch.bfloat16
    ids = torch.randint(0, tiny_config.vocab_size, (2, 12))
    with torch.no_grad():
        before, after = model(ids).float(), quantized(ids).float()
    assert torch.nn.functional.cosine_similarity(before.flatten(), after.flatten(), dim=0) > 0.999
    assert (before.argmax(-1) == after.argmax(-1)).float().mean() >= 0.9
    assert dllm.quantize_fp8(quantized) == 0  # already quantised: nothing more to do
    quantized.to(torch.float32)  # a dtype change leaves the FP8 weights and their scales as they are
    assert all(m.weight.dtype == FP8 and m.scale.dtype == torch.float32 for m in projections)
    with torch.no_grad():
        assert torch.allclose(quantized(ids).float(), after, rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="fuse_projections needs"):
        quantized.fuse_projections()
    with pytest.raises(dllm.CheckpointError, match="unquantized weights"):
        dllm.save_pretrained(quantized, None, "/tmp/never-written")


def test_fused_projections_are_quantised_matrix_by_matrix(tiny_config):
    fused = dllm.build_model(tiny_config, seed=0)
    fused.fuse_projections()
    plain = dllm.build_model(tiny_config, seed=0)
    dllm.quantize_fp8(fused), dllm.quantize_fp8(plain)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(fused(ids), plain(ids))


def test_the_engine_decodes_an_fp8_request_as_it_would_alone(talkative_model, char_tokenizer):
    """Each token's input gets its own scale, so a request's answer does not depend on what it is
    batched with (a scale shared by the batch would make it)."""
    engine = dllm.Engine(copy.deepcopy(talkative_model), char_tokenizer, max_model_len=256, quantization="fp8")
    assert engine.quantization == "fp8"
    prompts = ["reverse: abc =>", "sort: dcba =>", "add 12+7 =>", "spell 42 =>", "repeat ab 3 =>"]
    together = engine.generate(prompts, CFG)
    alone = [engine.generate([p], CFG)[0] for p in prompts]
    assert [g.text for g in together] == [g.text for g in alone]
    assert [g.num_forwards for g in together] == [g.num_forwards for g in alone]
    assert all(g.finish_reason in ("stop", "length") for g in together) and any(g.text for g in together)


def test_the_quantization_option_is_checked(talkative_model):
    with pytest.raises(ValueError, match=r"quantization must be one of \['fp8'\] or None, got 'int4'"):
        dllm.Engine(copy.deepcopy(talkative_model), quantization="int4")
    with pytest.raises(ValueError, match="fuse_projections does not apply"):
        dllm.Engine(copy.deepcopy(talkative_model), quantization="fp8", fuse_projections=True)
    assert dllm.Engine(copy.deepcopy(talkative_model)).quantization is None
