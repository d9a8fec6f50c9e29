"""Baselines our engine's speedups are measured against, on the same model and prompts.

- `llada_generate`: LLaDA's vanilla inference: a fixed canvas of `gen_length` masks, `steps`
  forwards over the whole sequence with no cache, semi-autoregressive blocks of `block_length`,
  low-confidence remasking (the k most confident masked positions per step).
- `fast_dllm_generate`: Fast-dLLM style: the same fixed canvas, decoded block by block with a
  confidence threshold and an approximate cache: "prefix" (prompt + finished blocks cached; each
  step recomputes the block and the masked suffix) or "dual" (the suffix's K/V cached too; each
  step recomputes only the block). Every block starts with one full forward that refreshes the cache.

Both cut the answer at the first EOS/EOT (the canvas beyond is discarded) and count forwards.
Prompts in a batch are left-padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .engine import decoders
from .engine.kv_cache import KVCache
from .model import LLaDAModelLM


@dataclass
class BaselineOutput:
    token_ids: list[list[int]]  # per prompt, cut before the first stop token
    num_forwards: int  # forwards of the whole batch
    stopped: list[bool]  # whether a stop token ended the answer (vs the canvas running out)


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[i, width - len(p):] = True
    return ids.to(device), valid.to(device)


def _cut(model: LLaDAModelLM, canvas: torch.Tensor) -> tuple[list[list[int]], list[bool]]:
    stops = set(model.config.stop_token_ids)
    out, stopped = [], []
    for row in canvas.tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), None)
        out.append(row if cut is None else row[:cut])
        stopped.append(cut is not None)
    return out, stopped


def _schedule(masked_in_block: int, steps: int) -> list[int]:
    """LLaDA's per-step token counts: spread the block's masks evenly over its steps."""
    base, extra = divmod(masked_in_block, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


@torch.inference_mode()
def llada_generate(model: LLaDAModelLM, prompts: list[list[int]], *, gen_length: int = 128, steps: int = 128,
                   block_length: int = 128, temperature: float = 0.0, seed: int | None = None) -> BaselineOutput:
    """LLaDA vanilla generation (no cache, fixed canvas, low-confidence remasking)."""
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps ({steps}) must be a multiple of the number of blocks ({num_blocks})")
    cfg = model.config
    device = next(model.parameters()).device
    prompt_ids, prompt_valid = _left_pad(prompts, cfg.pad_token_id or 0, device)
    n, p = prompt_ids.shape
    x = torch.cat([prompt_ids, torch.full((n, gen_length), cfg.mask_token_id, device=device)], dim=1)
    valid = torch.cat([prompt_valid, torch.ones(n, gen_length, dtype=torch.bool, device=device)], dim=1)
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    canvas_index = torch.arange(p, p + gen_length, device=device).expand(n, -1)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None and temperature > 0 else None
    forwards = 0
    steps_per_block = steps // num_blocks
    for blk in range(num_blocks):
        lo, hi = blk * block_length, (blk + 1) * block_length
        for k in _schedule(block_length, steps_per_block):
            logits = model(x, positions=positions, attention_mask=valid, logits_index=canvas_index)
            forwards += 1
            canvas = x[:, p:]
            masked = canvas == cfg.mask_token_id
            in_block = torch.zeros_like(masked)
            in_block[:, lo:hi] = True
            if temperature > 0:
                cand, conf = decoders.candidates(logits, cfg.mask_token_id, torch.arange(n, device=device),
                                                 torch.full((n,), temperature, device=device),
                                                 torch.rand(logits.shape[:2], generator=gen, device=device))
            else:
                cand, conf = decoders.candidates(logits, cfg.mask_token_id)
            commit = decoders.top_k_commit(conf, masked & in_block, torch.full((n,), k, device=device))
            x[:, p:] = torch.where(commit, cand, canvas)
    tokens, stopped = _cut(model, x[:, p:])
    return BaselineOutput(tokens, forwards, stopped)


@torch.inference_mode()
def fast_dllm_generate(model: LLaDAModelLM, prompts: list[list[int]], *, gen_length: int = 256,
                       block_length: int = 32, threshold: float = 0.9, cache: str = "prefix",
                       early_stop: bool = False) -> BaselineOutput:
    """Fast-dLLM style: fixed canvas, threshold decoding, approximate prefix or dual cache.

    early_stop skips the remaining blocks once every row has an EOS (dInfer's trick; off by
    default so the baseline decodes its whole canvas, as Fast-dLLM does)."""
    if cache not in ("prefix", "dual"):
        raise ValueError(f"cache must be 'prefix' or 'dual', got {cache!r}")
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
    cfg = model.config
    param = next(model.parameters())
    device = param.device
    n = len(prompts)
    # Per-row right-aligned layout is awkward with a cache; instead each row is its own slot with
    # its own prompt length, and the canvas follows its prompt directly.
    total = max(len(pr) for pr in prompts) + gen_length
    pool = KVCache(cfg, n, total, device=device, dtype=param.dtype)
    slots = [pool.allocate(total) for _ in range(n)]
    lens = [len(pr) for pr in prompts]
    canvas = torch.full((n, gen_length), cfg.mask_token_id, device=device, dtype=torch.long)
    tau = torch.full((n,), threshold, device=device)
    forwards = 0
    for lo in range(0, gen_length, block_length):
        hi = lo + block_length
        # Full refresh: every row's prompt + canvas, padded on the right to the longest.
        width = max(lens) + gen_length
        full = torch.full((n, width), cfg.mask_token_id, device=device, dtype=torch.long)
        for i, pr in enumerate(prompts):
            full[i, :lens[i]] = torch.tensor(pr, device=device)
            full[i, lens[i]:lens[i] + gen_length] = canvas[i]
        block_index = torch.tensor([[lens[i] + j for j in range(lo, hi)] for i in range(n)], device=device)
        view = pool.view(slots, [0] * n, [lens[i] + gen_length for i in range(n)], width)
        logits = model(full, cache=view, logits_index=block_index)
        forwards += 1
        _threshold_step(canvas, logits, lo, hi, tau, cfg.mask_token_id)
        while (canvas[:, lo:hi] == cfg.mask_token_id).any():
            offsets = [lens[i] + lo for i in range(n)]
            if cache == "prefix":  # recompute block + suffix against the cached prefix
                q = gen_length - lo
                view = pool.view(slots, offsets, [q] * n, q)
                logits = model(canvas[:, lo:], cache=view, logits_index=torch.arange(block_length, device=device).expand(n, -1))
            else:  # dual: recompute the block only; the suffix's K/V from the refresh stay visible
                view = pool.view(slots, offsets, [block_length] * n, block_length)
                view.kv_lens = torch.tensor([lens[i] + gen_length for i in range(n)], device=device)
                view.window = max(lens) + gen_length
                logits = model(canvas[:, lo:hi], cache=view)
            forwards += 1
            _threshold_step(canvas, logits, lo, hi, tau, cfg.mask_token_id)
        if early_stop and _all_stopped(canvas[:, :hi], cfg.stop_token_ids):
            break  # every row has its EOS: later blocks cannot change the answers
    tokens, stopped = _cut(model, canvas)
    return BaselineOutput(tokens, forwards, stopped)


def _threshold_step(canvas, logits, lo, hi, tau, mask_id) -> None:
    block = canvas[:, lo:hi]
    masked = block == mask_id
    cand, conf = decoders.candidates(logits, mask_id)
    commit = decoders.threshold_commit(conf, masked, tau)
    canvas[:, lo:hi] = torch.where(commit, cand, block)


def _all_stopped(decided: torch.Tensor, stop_ids) -> bool:
    hit = torch.zeros(decided.shape[0], dtype=torch.bool, device=decided.device)
    for t in stop_ids:
        hit |= (decided == t).any(1)
    return bool(hit.all())
