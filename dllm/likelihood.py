"""Conditional log-likelihood of a continuation under a masked diffusion model (LLaDA's estimator).

A masked diffusion model has no left-to-right factorisation; what it bounds is
    log p(r | p) >= E_l E_S [ (L / l) * sum_{i in S} log p(r_i | p, r with S masked) ],
l uniform in 1..L (L = len(r)), S a uniform subset of l positions of r (LLaDA, eq. 6 / Algorithm 3:
the lower-variance form of the training ELBO). `log_likelihood` averages it over Monte Carlo draws;
the bound is what multiple-choice evaluations rank continuations by (the same objective the model
was trained on: cross-entropy over the whole vocabulary, the prompt clean, full attention).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .model import LLaDAModelLM


@dataclass
class LogLikelihood:
    """Monte Carlo estimate of the ELBO on log p(continuation | prompt)."""

    value: float  # mean over draws (nats)
    std_error: float  # standard error of the mean (0 where every draw gives the same value)
    mc_samples: int
    tokens: int  # continuation length L
    forwards: int = 0  # model forwards it took (mc_samples / batch_size, rounded up)


@torch.inference_mode()
def log_likelihood(model: LLaDAModelLM, prompt_ids: Sequence[int], continuation_ids: Sequence[int], *,
                   mc_samples: int = 64, batch_size: int = 32, seed: int = 0) -> LogLikelihood:
    """ELBO estimate of log p(continuation | prompt) from `mc_samples` masked copies of the sequence.

    Each draw masks l ~ U{1..L} continuation positions chosen uniformly; the draws depend only on
    `seed` (not on `batch_size`, which only sets how many run per forward). With L = 1 every draw
    is the same: the exact log p(r | p) of one masked position.
    """
    cfg = model.config
    prompt = cfg.check_token_ids(prompt_ids, "prompt")
    answer = cfg.check_token_ids(continuation_ids, "continuation")
    if not answer:
        raise ValueError("the continuation is empty: there is nothing to score")
    if mc_samples < 1 or batch_size < 1:
        raise ValueError(f"need mc_samples >= 1 and batch_size >= 1, got {mc_samples}, {batch_size}")
    total = len(prompt) + len(answer)
    if total > cfg.max_sequence_length:
        raise ValueError(f"prompt + continuation is {total} tokens; the model takes at most {cfg.max_sequence_length}")
    device = next(model.parameters()).device
    n, p = len(answer), len(prompt)
    g = torch.Generator().manual_seed(seed)
    # Draws on the host, from one generator, so batching cannot change them.
    counts = torch.randint(1, n + 1, (mc_samples,), generator=g)
    ranks = torch.rand(mc_samples, n, generator=g).argsort(-1).argsort(-1)  # a uniform permutation per draw
    masked = ranks < counts[:, None]  # [mc, L]: the l positions of each draw
    sequence = torch.tensor(prompt + answer)
    target = torch.tensor(answer)
    estimates = []
    for start in range(0, mc_samples, batch_size):
        m = masked[start:start + batch_size]
        ids = sequence.repeat(len(m), 1)
        ids[:, p:] = torch.where(m, cfg.mask_token_id, target)
        logits = model(ids.to(device), logits_index=torch.arange(p, total, device=device).expand(len(m), n))
        logp = torch.log_softmax(logits.float(), -1).gather(-1, target.to(device).expand(len(m), n)[..., None])
        logp = logp.squeeze(-1).cpu() * m
        estimates.append(logp.sum(-1) * n / counts[start:start + batch_size])
    draws = torch.cat(estimates).double()
    std = draws.std().item() / mc_samples ** 0.5 if mc_samples > 1 else 0.0
    return LogLikelihood(draws.mean().item(), std, mc_samples, n, forwards=len(estimates))
