"""The autoregressive twin: our LLaDA network with causal attention, run by Hugging Face Llama.

LLaDA's block is Llama's (pre-norm RMSNorm, NeoX rotary, SwiGLU, no biases, untied head), so a
network trained with `model(..., causal=True)` and next-token loss *is* a LlamaForCausalLM once its
weights are renamed. The comparison benchmarks then decode it with transformers' own fastest
generate (static cache + torch.compile), not with a loop of ours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import dllm

# our key (per block) -> Llama key (per layer)
_BLOCK_KEYS = {
    "attn_norm.weight": "input_layernorm.weight",
    "q_proj.weight": "self_attn.q_proj.weight",
    "k_proj.weight": "self_attn.k_proj.weight",
    "v_proj.weight": "self_attn.v_proj.weight",
    "attn_out.weight": "self_attn.o_proj.weight",
    "ff_norm.weight": "post_attention_layernorm.weight",
    "ff_proj.weight": "mlp.gate_proj.weight",
    "up_proj.weight": "mlp.up_proj.weight",
    "ff_out.weight": "mlp.down_proj.weight",
}


def llama_config(cfg: dllm.LLaDAConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.embedding_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden_size,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_sequence_length, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
    )


def llama_state_dict(model: dllm.LLaDAModelLM) -> dict[str, torch.Tensor]:
    """Our weights under Llama's names (tensors shared, not copied)."""
    out = {}
    prefix = "model.transformer."
    for name, tensor in model.state_dict().items():
        key = name[len(prefix):]
        if key == "wte.weight":
            out["model.embed_tokens.weight"] = tensor
        elif key == "ln_f.weight":
            out["model.norm.weight"] = tensor
        elif key == "ff_out.weight":
            out["lm_head.weight"] = tensor
        else:
            _, layer, rest = key.split(".", 2)
            out[f"model.layers.{layer}.{_BLOCK_KEYS[rest]}"] = tensor
    return out


def to_hf_llama(model: dllm.LLaDAModelLM):
    """A LlamaForCausalLM with this network's weights, on the same device and dtype."""
    from transformers import LlamaForCausalLM

    weight = model.embedding_weight
    with torch.device("meta"):
        llama = LlamaForCausalLM(llama_config(model.config))
    llama.load_state_dict(llama_state_dict(model), strict=True, assign=True)
    # Buffers (rotary inv_freq) were created on meta: rebuild them where the weights are.
    llama.model.rotary_emb = type(llama.model.rotary_emb)(llama.config)
    return llama.to(device=weight.device, dtype=weight.dtype).eval()


def random_llama(cfg: dllm.LLaDAConfig, device, dtype, seed: int = 0):
    """A randomly initialised LlamaForCausalLM of the given shape, built directly on `device`."""
    return to_hf_llama(dllm.build_model(cfg, device=device, dtype=dtype, seed=seed))


def causal_lm_loss(model: dllm.LLaDAModelLM, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over positions whose *target* is in loss_mask (answers and EOS)."""
    hidden = model(input_ids, causal=True, return_hidden=True)[:, :-1]
    targets = input_ids[:, 1:]
    keep = loss_mask[:, 1:]
    logits = model.model.transformer["ff_out"](hidden[keep])
    return F.cross_entropy(logits.float(), targets[keep])
