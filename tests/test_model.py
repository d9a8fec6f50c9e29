"""The network: LLaDA's architecture, its cache semantics and its options."""

import pytest
import torch

import dllm
from dllm.model import CacheView
from reference_llada import ReferenceLLaDA


def _model(cfg, seed=0):
    return dllm.build_model(cfg, seed=seed).eval()


def test_logits_match_independent_reference(tiny_config):
    model = _model(tiny_config)
    ref = ReferenceLLaDA(model.state_dict(), tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (11,))
    with torch.no_grad():
        ours = model(ids[None])[0].double()
    theirs, _ = ref.forward(ids)
    assert ours.shape == (11, tiny_config.embedding_size)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_attention_is_bidirectional(tiny_config):
    model = _model(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % tiny_config.vocab_size
    with torch.no_grad():
        a, b = model(ids), model(changed)
    # Changing the last token changes the first position's logits: no causal mask.
    assert not torch.allclose(a[0, 0], b[0, 0])


def test_gqa_config_runs_and_matches_reference(char_tokenizer):
    from conftest import make_config
    cfg = make_config(char_tokenizer, n_heads=4, n_kv_heads=1)
    model = _model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (7,))
    with torch.no_grad():
        ours = model(ids[None])[0].double()
    theirs, _ = ReferenceLLaDA(model.state_dict(), cfg).forward(ids)
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_a_swapped_in_training_linear_runs_its_own_forward(tiny_config):
    """FP8 training swaps the blocks' nn.Linear for torchao's Float8Linear: the blocks must call the
    module (a plain F.linear on its weight would silently train in bf16)."""

    class CountingLinear(torch.nn.Linear):
        calls = 0

        def forward(self, x):
            CountingLinear.calls += 1
            return super().forward(x)

    model = dllm.build_model(tiny_config, seed=3)
    ids = torch.randint(0, tiny_config.vocab_size - 4, (2, 10))
    with torch.no_grad():
        expected = model(ids)
    names = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
    for block in model.model.transformer["blocks"]:
        for name in names:
            old = getattr(block, name)
            new = CountingLinear(old.in_features, old.out_features, bias=False)
            new.weight = old.weight
            setattr(block, name, new)
    logits = model(ids)  # with gradients, as in training
    assert CountingLinear.calls == len(names) * tiny_config.n_layers
    assert torch.allclose(logits, expected, atol=1e-6)
    logits.sum().backward()
    assert model.model.transformer["blocks"][0].q_proj.weight.grad is not None


def test_fused_projections_compute_the_same_function_and_keep_the_checkpoint_format(char_tokenizer):
    """One Q/K/V and one gate/up matmul per block (GQA shapes too): same logits eager and compiled, the
    same state_dict, loads land in the fused matrices, training still reaches every weight."""
    from conftest import make_config
    cfg = make_config(char_tokenizer, n_heads=4, n_kv_heads=2)
    model, other = _model(cfg, seed=0), _model(cfg, seed=1)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        before, other_logits = model(ids), other(ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.fuse_projections()
    block = model.model.transformer["blocks"][0]
    with torch.no_grad():
        assert [len(w) for w in block._projection_weights()] == [1, 1]  # the fused path runs
        assert torch.allclose(model(ids), before, atol=1e-5)
        model.compile_blocks()
        assert torch.allclose(model(ids), before, atol=1e-5)
        model.block_functions = dllm.model.EAGER
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    model.load_state_dict(other.state_dict())  # in place: the fused matrices see the new weights
    with torch.no_grad():
        assert torch.allclose(model(ids), other_logits, atol=1e-5)
    # With gradients the separate parameters are used, so every projection is trained.
    model(ids).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "proj" in n)
    # Moving the parameters out of the fused storage (dtype or device change) drops the fusion, not correctness.
    model.to(torch.float64)
    with torch.no_grad():
        assert [len(w) for w in block._projection_weights()] == [3, 2]
        assert torch.allclose(model(ids).float(), other_logits, atol=1e-5)


def _pool(cfg, slots, capacity, page_size=4):
    """A paged K/V pool whose slots 0..slots-1 each hold `capacity` positions, their pages interleaved
    (slot i's pages are i, i + slots, ...): rows never sit in contiguous memory."""
    cache = dllm.engine.KVCache(cfg, slots, capacity, page_size=page_size, device="cpu", dtype=torch.float32)
    pages = cache.pages_per_slot
    cache.table.copy_(torch.arange(slots * pages, dtype=torch.int32).view(pages, slots).t())
    return cache


def _view(cache, slots, offsets):
    return CacheView(cache.k, cache.v, cache.table, slots=torch.tensor(slots), offsets=torch.tensor(offsets))


def test_cached_forward_equals_uncached_for_same_context(tiny_config):
    """Prompt K/V written once, then a block against the cache == the reference with the same past."""
    model = _model(tiny_config)
    ref = ReferenceLLaDA(model.state_dict(), tiny_config)
    prompt = torch.randint(0, tiny_config.vocab_size, (9,))
    block = torch.randint(0, tiny_config.vocab_size, (4,))
    pool = _pool(tiny_config, 2, 32)
    with torch.no_grad():
        model(prompt[None], cache=_view(pool, [1], [0]))
        cached = model(block[None], cache=_view(pool, [1], [9]))[0]
    _, past = ref.forward(prompt)
    expected, _ = ref.forward(block, past=past)
    assert torch.allclose(cached.double(), expected, atol=1e-4)
    # With no cached context at all, the cached path equals the plain forward.
    with torch.no_grad():
        plain = model(block[None])[0]
        fresh = model(block[None], cache=_view(pool, [0], [0]))[0]
    assert torch.allclose(plain, fresh, atol=1e-5)


def test_cache_rows_with_different_lengths_are_independent(tiny_config):
    model = _model(tiny_config)
    pool = _pool(tiny_config, 3, 40)
    prompts = [torch.randint(0, tiny_config.vocab_size, (n,)) for n in (5, 12)]
    block = torch.randint(0, tiny_config.vocab_size, (2, 4))
    with torch.no_grad():
        for slot, p in zip((0, 2), prompts):
            model(p[None], cache=_view(pool, [slot], [0]))
        batched = model(block, cache=_view(pool, [0, 2], [5, 12]))
        alone = [model(block[i:i + 1], cache=_view(pool, [s], [n]))[0] for i, (s, n) in enumerate(((0, 5), (2, 12)))]
    for i in range(2):
        assert torch.allclose(batched[i], alone[i], atol=1e-5)


def test_padded_batch_with_attention_mask_matches_unpadded(tiny_config):
    model = _model(tiny_config)
    short = torch.randint(0, tiny_config.vocab_size, (5,))
    long = torch.randint(0, tiny_config.vocab_size, (8,))
    pad = tiny_config.pad_token_id
    ids = torch.stack([torch.cat([torch.full((3,), pad), short]), long])  # left padding
    mask = torch.stack([torch.cat([torch.zeros(3), torch.ones(5)]), torch.ones(8)])
    positions = torch.stack([torch.cat([torch.zeros(3, dtype=torch.long), torch.arange(5)]), torch.arange(8)])
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, positions=positions)
        alone = model(short[None])[0]
    assert torch.allclose(batched[0, 3:], alone, atol=1e-5)


def test_logits_index_selects_positions(tiny_config):
    model = _model(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 10))
    index = torch.tensor([[7, 8, 9], [0, 1, 2]])
    with torch.no_grad():
        full = model(ids)
        part = model(ids, logits_index=index)
    assert part.shape == (2, 3, tiny_config.embedding_size)
    assert torch.allclose(part, torch.stack([full[0, 7:10], full[1, 0:3]]), atol=1e-6)


def test_inputs_embeds_path_equals_ids_path(tiny_config):
    model = _model(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (1, 6))
    with torch.no_grad():
        assert torch.allclose(model(ids), model(inputs_embeds=model.embed(ids)), atol=1e-6)


def test_config_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="n_kv_heads"):
        dllm.LLaDAConfig(d_model=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="mask_token_id"):
        dllm.tiny_config(32, mask_token_id=99)


@pytest.mark.gpu
def test_cuda_bf16_matches_cpu_fp32(tiny_config):
    model = _model(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 16))
    with torch.no_grad():
        cpu = model(ids)
        gpu = model.to("cuda", torch.bfloat16)(ids.cuda()).float().cpu()
    assert (gpu - cpu).norm() / cpu.norm() < 2e-2


@pytest.mark.gpu
def test_flash_attn_path_matches_sdpa(tiny_config):
    pytest.importorskip("flash_attn")
    model = _model(tiny_config).to("cuda", torch.bfloat16)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 32), device="cuda")
    with torch.no_grad():
        sdpa = model(ids).float()
        assert model.enable_flash_attn()
        flash = model(ids).float()
    assert (flash - sdpa).norm() / sdpa.norm() < 2e-2
