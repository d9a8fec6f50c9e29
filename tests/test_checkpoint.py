"""Checkpoint directories in LLaDA's real layout: loading, sharding, round trips, clear errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

import dllm
from reference_llada import ReferenceLLaDA


def _write_llada_layout(path, cfg, seed=1):
    """Write a checkpoint the way LLaDA-8B ships one, by hand (not through save_pretrained)."""
    g = torch.Generator().manual_seed(seed)
    d, f, v, kv = cfg.d_model, cfg.mlp_hidden_size, cfg.embedding_size, cfg.n_kv_heads * cfg.head_dim
    w = {"model.transformer.wte.weight": torch.randn(v, d, generator=g) * 0.1,
         "model.transformer.ln_f.weight": 1 + 0.1 * torch.randn(d, generator=g),
         "model.transformer.ff_out.weight": torch.randn(v, d, generator=g) * 0.1}
    shapes = {"attn_norm": (d,), "q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "attn_out": (d, d),
              "ff_norm": (d,), "ff_proj": (f, d), "up_proj": (f, d), "ff_out": (d, f)}
    for i in range(cfg.n_layers):
        for name, shape in shapes.items():
            t = torch.randn(*shape, generator=g) * 0.1
            w[f"model.transformer.blocks.{i}.{name}.weight"] = t + 1 if len(shape) == 1 else t
    raw = {  # LLaDA's own config.json keys, including ones we only accept
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type": "silu", "alibi": False,
        "block_type": "llama", "d_model": d, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads, "mlp_hidden_size": f, "mlp_ratio": 4, "vocab_size": cfg.vocab_size,
        "embedding_size": v, "rope": True, "rope_theta": cfg.rope_theta, "rope_full_precision": True,
        "rms_norm_eps": 1e-5, "layer_norm_type": "rms", "include_bias": False, "weight_tying": False,
        "mask_token_id": cfg.mask_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.eos_token_id,
        "max_sequence_length": 4096, "init_fn": "mitchell", "precision": "amp_bf16", "use_cache": False,
        "flash_attention": False, "auto_map": {"AutoModel": "modeling_llada.LLaDAModelLM"},
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    return w


def test_loads_llada_layout_and_matches_reference(tmp_path, tiny_config):
    weights = _write_llada_layout(tmp_path, tiny_config)
    save_file(weights, str(tmp_path / "model.safetensors"))
    model = dllm.load_model(tmp_path)
    ids = torch.randint(0, tiny_config.vocab_size, (9,))
    with torch.no_grad():
        ours = model(ids[None])[0].double()
    theirs, _ = ReferenceLLaDA(weights, model.config).forward(ids)
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert model.config.mask_token_id == tiny_config.mask_token_id


def test_sharded_and_single_file_loads_agree(tmp_path, tiny_config):
    weights = _write_llada_layout(tmp_path / "single", tiny_config)
    save_file(weights, str(tmp_path / "single" / "model.safetensors"))
    _write_llada_layout(tmp_path / "sharded", tiny_config)
    names = sorted(weights)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves, start=1):
        fname = f"model-0000{i}-of-00002.safetensors"
        save_file({n: weights[n] for n in part}, str(tmp_path / "sharded" / fname))
        weight_map.update({n: fname for n in part})
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    a, b = dllm.load_model(tmp_path / "single"), dllm.load_model(tmp_path / "sharded")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_save_load_round_trip_is_exact_and_shards_when_large(tmp_path, tiny_config, char_tokenizer):
    model = dllm.build_model(tiny_config, seed=3)
    dllm.save_pretrained(model, char_tokenizer, tmp_path / "one")
    dllm.save_pretrained(model, char_tokenizer, tmp_path / "many", max_shard_bytes=50_000)
    assert (tmp_path / "many" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "many").glob("model-*.safetensors"))) > 1
    for d in ("one", "many"):
        loaded = dllm.load_model(tmp_path / d)
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
        assert loaded.config == model.config
        tok = dllm.load_tokenizer(tmp_path / d)
        assert tok.mask_token_id == tiny_config.mask_token_id


def test_load_in_bfloat16(tiny_checkpoint):
    model = dllm.load_model(tiny_checkpoint, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_missing_tensor_is_named(tmp_path, tiny_config):
    weights = _write_llada_layout(tmp_path, tiny_config)
    del weights["model.transformer.blocks.1.up_proj.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(dllm.CheckpointError, match="blocks.1.up_proj.weight"):
        dllm.load_model(tmp_path)


def test_wrong_shape_is_named(tmp_path, tiny_config):
    weights = _write_llada_layout(tmp_path, tiny_config)
    weights["model.transformer.blocks.0.q_proj.weight"] = torch.zeros(3, 3)
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(dllm.CheckpointError, match=r"blocks.0.q_proj.weight .*shape \[3, 3\]"):
        dllm.load_model(tmp_path)


def test_unknown_tensor_is_named(tmp_path, tiny_config):
    weights = _write_llada_layout(tmp_path, tiny_config)
    weights["model.transformer.blocks.7.q_proj.weight"] = torch.zeros(2)
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(dllm.CheckpointError, match="blocks.7.q_proj.weight"):
        dllm.load_model(tmp_path)


def test_unsupported_architecture_value_is_named(tmp_path, tiny_config):
    weights = _write_llada_layout(tmp_path, tiny_config)
    save_file(weights, str(tmp_path / "model.safetensors"))
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "alibi": True}))
    with pytest.raises(ValueError, match="alibi"):
        dllm.load_model(tmp_path)


def test_missing_files_are_named(tmp_path, tiny_config):
    with pytest.raises(dllm.CheckpointError, match="does not exist"):
        dllm.load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        dllm.load_model(tmp_path)
    _write_llada_layout(tmp_path, tiny_config)
    with pytest.raises(dllm.CheckpointError, match="model.safetensors"):
        dllm.load_model(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(dllm.CheckpointError, match="pickle"):
        dllm.load_model(tmp_path)


def test_index_pointing_at_missing_shard(tmp_path, tiny_config):
    _write_llada_layout(tmp_path, tiny_config)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.transformer.wte.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(dllm.CheckpointError, match="model-00001-of-00002"):
        dllm.load_model(tmp_path)


def test_models_decode_in_bf16_on_a_gpu_and_in_fp32_elsewhere():
    expected = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    device, dtype = dllm.inference_placement()
    assert (device.type, dtype) == expected
    assert dllm.inference_placement("cuda:1") == (torch.device("cuda:1"), torch.bfloat16)  # no GPU needed to name one
    assert dllm.inference_placement("cpu") == (torch.device("cpu"), torch.float32)
