"""The autoregressive twin used by the GPU comparison: our network with causal attention is, weight
for weight, a Hugging Face LlamaForCausalLM."""

import torch

import dllm
from benchmarks.ar_twin import causal_lm_loss, to_hf_llama


def _config(char_tokenizer):
    ids = dllm.special_ids(char_tokenizer)
    # rope_theta and grouped-query heads unlike HF's defaults, so a dropped setting would show
    return dllm.tiny_config(len(char_tokenizer), **ids, rope_theta=500000.0, n_heads=4, n_kv_heads=2)


def test_llama_twin_computes_our_causal_logits(char_tokenizer):
    model = dllm.build_model(_config(char_tokenizer), seed=3)
    ids = torch.randint(0, len(char_tokenizer) - 4, (2, 12))
    with torch.no_grad():
        ours = model(ids, causal=True)
        theirs = to_hf_llama(model)(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_causal_attention_ignores_the_future(char_tokenizer):
    model = dllm.build_model(_config(char_tokenizer), seed=3)
    ids = torch.randint(0, len(char_tokenizer) - 4, (1, 10))
    changed = ids.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % (len(char_tokenizer) - 4)
    with torch.no_grad():
        assert torch.allclose(model(ids, causal=True)[0, :7], model(changed, causal=True)[0, :7], atol=1e-6)
        assert not torch.allclose(model(ids)[0, :7], model(changed)[0, :7], atol=1e-6)  # bidirectional sees it


def test_causal_lm_loss_trains_the_twin(char_tokenizer):
    torch.manual_seed(0)
    model = dllm.build_model(_config(char_tokenizer), seed=0)
    ids = torch.randint(0, len(char_tokenizer) - 4, (4, 16))
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, 8:] = True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = causal_lm_loss(model, ids, keep)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
