"""Parallel decoders: which masked positions of a block to commit after one forward.

Pure, batched tensor functions over the block (rows = requests, B positions each). None of them
syncs with the host, so a step can run inside a CUDA graph or an unrolled loop (`greedy_step`: the
decode step of greedy rows with every per-row choice in tensors, which the engine replays as a graph).
Every rule commits at least the single most confident masked position, so a block always makes progress.

Shapes: logits [n, B, V]; masked / commit [n, B] bool; per-row parameters [n].
"""

from __future__ import annotations

import torch

NEG = -1.0  # confidence given to positions that are not masked (below any probability)
# Decoders that commit every masked position at or above the request's threshold.
COMMIT_ABOVE_THRESHOLD = ("threshold", "credit", "hierarchical")
# Each decoder's own per-row parameter (a GenerationConfig field), beside the threshold.
OWN_PARAMETER = {"factor": "factor", "hierarchical": "low_threshold", "fixed_k": "tokens_per_step"}
# Decoders that keep no state between steps (credit keeps its credit): `greedy_step` runs them.
STATELESS = ("threshold", "factor", "hierarchical", "fixed_k")


def without_mask(logits: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """fp32 logits with the MASK token impossible (the model never proposes MASK)."""
    mask_col = torch.full((1,), mask_token_id, device=logits.device)  # a fill, not a host->device copy
    return logits.float().index_fill(-1, mask_col, float("-inf"))


def candidates(logits: torch.Tensor, mask_token_id: int, sampled: torch.Tensor | None = None,
               temperature: torch.Tensor | None = None, uniform: torch.Tensor | None = None,
               floor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate token and its confidence at each position.

    Greedy: x = argmax softmax(logits). The rows `sampled` [m] (temperature [m] > 0, draws `uniform`
    [m, B]) instead sample x from softmax(logits / T) (see `sample`), among the tokens whose logit is
    >= `floor` [m, B] (top_k / top_p / min_p, see sampling_floor) where given; only they pay for
    sampling. Confidence = softmax(logits)[x]: the model's probability, neither tempered nor filtered.
    The MASK token is never a candidate.
    """
    logits = without_mask(logits, mask_token_id)
    probs = torch.softmax(logits, dim=-1)
    x = logits.argmax(-1)
    if sampled is not None:
        x = x.index_copy(0, sampled, sample(logits[sampled], temperature, uniform, floor))
    conf = torch.gather(probs, -1, x[..., None]).squeeze(-1)
    return x, conf


def sample(logits: torch.Tensor, temperature: torch.Tensor, uniform: torch.Tensor,
           floor: torch.Tensor | None = None) -> torch.Tensor:
    """One token per position from softmax(logits / T) [n, B, V] (T > 0 per row), restricted to
    logits >= `floor` [n, B] where given, by inverse CDF: the first token whose cumulative
    probability exceeds `uniform` [n, B] in [0, 1). One random number per position (Gumbel-max
    would draw one per vocabulary entry: ~4x the sampling cost on a CPU)."""
    scaled = logits / temperature[:, None, None]
    if floor is not None:
        scaled = scaled.masked_fill(logits < floor[..., None], float("-inf"))
    cdf = torch.softmax(scaled, dim=-1).cumsum(-1)
    # right=True: tokens of probability 0 (a flat stretch of the CDF) are never drawn
    x = torch.searchsorted(cdf, (uniform * cdf[..., -1])[..., None], right=True).squeeze(-1)
    return x.clamp(max=logits.shape[-1] - 1)


# Tokens ranked first for a top_p without a top_k (a confident position's nucleus is far smaller than the
# vocabulary). Positions whose nucleus reaches past them are ranked again over the whole vocabulary.
NUCLEUS_CANDIDATES = 1024
# How far the ranked tokens' mass must clear top_p for the unranked rest to be surely outside the nucleus
# (float32 sums over a vocabulary of ~10^5 differ by far less).
NUCLEUS_SLACK = 1e-4


def sampling_floor(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                   min_p: torch.Tensor, ranked: int, nucleus: bool, open_nucleus: bool = False) -> torch.Tensor:
    """The lowest logit a sampled candidate may have, per position: [n, B] (-inf = no limit).

    logits [n, B, V] (MASK already excluded); per row [n]: temperature > 0, top_k (0 = every token),
    top_p (1 = off), min_p (0 = off). In vLLM's order: the tokens with p >= min_p * p_max, of them the
    top_k most likely, and of those the smallest most-likely-first set whose tempered probabilities
    (renormalised over what is left) reach top_p. Host-known, so no sync: `ranked`, how many tokens to
    rank (at least every row's top_k); `nucleus`, whether a row has top_p < 1; `open_nucleus`, whether a
    row has top_p < 1 and no top_k. Such a row's nucleus is found among the `ranked` most likely tokens
    where their tempered mass reaches top_p (checked against the whole vocabulary's), and by ranking the
    whole vocabulary at the positions where it does not: finding those costs one host sync.
    """
    n, b, v = logits.shape
    lowest = min_p_floor(logits, temperature, min_p)
    if not ranked:
        return lowest
    ranked = min(ranked, v)  # a top_k above the vocabulary keeps every token
    check = checks_wide_nuclei(open_nucleus, ranked, v)
    floor, short = _ranked_floor(logits, temperature, top_k, top_p, lowest, ranked, nucleus, check)
    if short is None:
        return floor
    where = short.nonzero(as_tuple=True)  # the host sync
    if not len(where[0]):
        return floor
    if 2 * len(where[0]) > n * b:  # most positions: rank them all (no larger than that, in memory)
        return _ranked_floor(logits, temperature, top_k, top_p, lowest, v, nucleus, False)[0]
    rows = where[0]
    again, _ = _ranked_floor(logits[where][:, None], temperature[rows], top_k[rows], top_p[rows],
                             lowest[where][:, None], v, nucleus, False)
    return floor.index_put(where, again[:, 0])


def checks_wide_nuclei(open_nucleus: bool, ranked: int, vocab: int) -> bool:
    """Whether sampling_floor looks for positions whose nucleus is wider than the `ranked` tokens (the
    one host sync it may take): a row has top_p without top_k, and fewer tokens than the vocabulary
    are ranked."""
    return open_nucleus and ranked < vocab


def min_p_floor(logits: torch.Tensor, temperature: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """[n, B]: the lowest logit whose tempered probability is at least min_p [n] times the top one's."""
    # p >= min_p * p_max  <=>  logit >= max logit + T log(min_p)  (log 0 = -inf: no limit)
    return logits.amax(-1) + temperature[:, None] * torch.log(min_p)[:, None]


def _ranked_floor(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  lowest: torch.Tensor, ranked: int, nucleus: bool,
                  check: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sampling_floor over the `ranked` most likely tokens, from the min_p floor `lowest` [n, B]. With
    `check`, also the positions [n, B] of rows without a top_k whose nucleus may reach past them (their
    floor here is then wrong)."""
    n, b, _ = logits.shape
    none = torch.full((n, b), float("-inf"), device=logits.device)
    top = logits.topk(ranked, dim=-1).values  # sorted, most likely first
    k = torch.where(top_k > 0, top_k.clamp(max=ranked), ranked)
    kth = top.gather(-1, (k - 1)[:, None, None].expand(n, b, 1)).squeeze(-1)
    floor = torch.maximum(lowest, torch.where((top_k > 0)[:, None], kth, none))
    short = None
    if nucleus:  # over the tokens kept so far
        kept = (torch.arange(ranked, device=logits.device)[None, None, :] < k[:, None, None]) & (top >= floor[..., None])
        scaled = (top / temperature[:, None, None]).masked_fill(~kept, float("-inf"))
        if check:  # rows without a top_k: their tokens' probabilities are over the whole vocabulary kept
            whole = (logits / temperature[:, None, None]).masked_fill(logits < floor[..., None], float("-inf"))
            open_rows = ((top_k == 0) & (top_p < 1))[:, None]
            log_z = torch.where(open_rows, torch.logsumexp(whole, -1), torch.logsumexp(scaled, -1))
            p = torch.exp(scaled - log_z[..., None])
            short = open_rows & (p.sum(-1) < top_p[:, None] + NUCLEUS_SLACK)
        else:
            p = torch.softmax(scaled, dim=-1)
        size = (kept & (torch.cumsum(p, -1) - p < top_p[:, None, None])).sum(-1)  # >= 1: the top token
        nucleus_floor = top.gather(-1, (size - 1)[..., None]).squeeze(-1)
        floor = torch.maximum(floor, torch.where((top_p < 1)[:, None], nucleus_floor, none))
    return floor, short


def _dense(token_ids: torch.Tensor, values: torch.Tensor, width: int) -> torch.Tensor:
    """[n, width] zeros with each row's `values` [n, w] at its `token_ids` [n, w] (padded with -1)."""
    columns = torch.where(token_ids >= 0, token_ids, width)  # padding lands in a spare column, dropped
    out = torch.zeros(token_ids.shape[0], width + 1, dtype=values.dtype, device=values.device)
    return out.scatter_(1, columns, values)[:, :width]


def add_logit_bias(logits: torch.Tensor, token_ids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`logits` [n, B, V] plus each row's `bias` [n, w] on its `token_ids` [n, w] (padded with -1), at
    every position (logit_bias)."""
    return logits + _dense(token_ids, bias.to(logits.dtype), logits.shape[-1])[:, None, :]


def only_allowed(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """`logits` [n, B, V] with every token outside each row's `allowed` [n, V] (bool) at -inf, at every position
    (allowed_token_ids)."""
    return logits.masked_fill(~allowed[:, None, :], float("-inf"))


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """`logits` [n, B, V] with vLLM's penalties, per row [n]: every token seen (`seen` [n, V]: in the prompt
    or the output) has its logit divided by `repetition` where positive, multiplied by it where not
    (1 = off); then each token loses `frequency` x its output count (`counts` [n, V]) and `presence`
    once it occurs in the output at all. The V columns may be any tokens (a token unseen and uncounted
    is left as it is): the engine passes only those of the prompt and the answer so far."""
    rep = repetition[:, None, None]
    logits = torch.where(seen[:, None, :], torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - (frequency[:, None] * counts + presence[:, None] * (counts > 0))[:, None, :]


def forbid_early(logits: torch.Tensor, limit: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """`logits` [n, B, V] with the tokens `token_ids` [n, w] (padded with -1) impossible at block
    positions < `limit` [n] (min_tokens: no stop token among an answer's first positions)."""
    n, b, v = logits.shape
    early = torch.arange(b, device=logits.device)[None, :] < limit[:, None]
    banned = _dense(token_ids, torch.ones_like(token_ids, dtype=torch.bool), v)
    return logits.masked_fill(early[:, :, None] & banned[:, None, :], float("-inf"))


def is_stop(tokens: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """[n, B] bool: `tokens` [n, B] that are among their row's `stop_ids` [n, w] (padded with -1)."""
    return (tokens[..., None] == stop_ids[:, None, :]).any(-1)


def stops_last(x: torch.Tensor, conf: torch.Tensor, masked: torch.Tensor, stop_ids: torch.Tensor,
               sure: torch.Tensor) -> torch.Tensor:
    """The masked positions a decoder may commit when the answer's length is settled last.

    A stop candidate (x in the row's `stop_ids` [n, w], padded with -1) is allowed only where every
    position left of it is decided: committed already, or committed in this step (confidence >= the
    row's `sure`; > 1 = never). So a stop token is never committed before the content it ends. Plain
    confidence order commits a short answer's EOS run first (the most confident part of its block)
    and each committed EOS pulls the next position towards EOS: answers lose their last tokens.
    Content candidates and the leftmost masked position are always allowed.
    """
    stop = is_stop(x, stop_ids)
    pending = (masked & (conf < sure[:, None])).long()  # stays masked after this step
    pending_before = torch.cumsum(pending, -1) - pending > 0
    return masked & ~(stop & pending_before)


def _top1(conf: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """One-hot of the most confident masked position of each row (none if nothing is masked)."""
    c = conf.masked_fill(~masked, NEG)
    idx = c.argmax(-1, keepdim=True)
    return torch.zeros_like(masked).scatter(-1, idx, True) & masked


def threshold_commit(conf: torch.Tensor, masked: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Commit masked positions with confidence >= threshold, plus the top-1 (Fast-dLLM / dLLM-Var)."""
    return (masked & (conf >= threshold[:, None])) | _top1(conf, masked)


def factor_commit(conf: torch.Tensor, masked: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Fast-dLLM's factor rule: with masked confidences sorted c_1 >= c_2 >= ..., commit the largest
    n such that (n + 1) * (1 - c_n) < f (at least one)."""
    c = conf.masked_fill(~masked, NEG)
    sorted_c, order = c.sort(-1, descending=True)
    n = torch.arange(1, c.shape[-1] + 1, device=c.device, dtype=c.dtype)
    ok = ((n + 1) * (1 - sorted_c) < factor[:, None]) & (sorted_c > NEG)
    count = torch.where(ok, n, torch.zeros_like(n)).amax(-1).clamp(min=1)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(c.shape[-1], device=c.device).expand_as(order))
    return masked & (ranks < count[:, None])


def top_k_commit(conf: torch.Tensor, masked: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """LLaDA's low-confidence remasking schedule: commit the k most confident masked positions."""
    c = conf.masked_fill(~masked, NEG)
    order = c.argsort(-1, descending=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(c.shape[-1], device=c.device).expand_as(order))
    return masked & (ranks < k[:, None])


def hierarchical_commit(conf: torch.Tensor, masked: torch.Tensor, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """dInfer's hierarchical decoding: in every contiguous run of masks, the most confident position
    if it passes `low`; plus every position above `high`; plus the global top-1."""
    n, b = masked.shape
    start = masked & ~torch.cat([torch.zeros_like(masked[:, :1]), masked[:, :-1]], dim=1)
    run = torch.cumsum(start.long(), dim=1) * masked  # 1, 2, ... per run; 0 outside masks
    c = conf.masked_fill(~masked, NEG)
    run_best = torch.full((n, b + 1), NEG, device=conf.device, dtype=c.dtype).scatter_reduce(
        1, run, c, reduce="amax", include_self=True)
    is_best = masked & (c >= torch.gather(run_best, 1, run))
    return (is_best & (conf > low[:, None])) | (masked & (conf > high[:, None])) | _top1(conf, masked)


def commit_rule(decoder: str, conf: torch.Tensor, allowed: torch.Tensor, threshold: torch.Tensor,
                param: torch.Tensor | None) -> torch.Tensor:
    """[n, B] bool: the positions `decoder` commits among the `allowed` ones; `param` [n] is its own
    parameter (OWN_PARAMETER; None for threshold and credit, which commit by threshold)."""
    if decoder in ("threshold", "credit"):
        return threshold_commit(conf, allowed, threshold)
    if decoder == "factor":
        return factor_commit(conf, allowed, param)
    if decoder == "hierarchical":
        return hierarchical_commit(conf, allowed, threshold, param)
    if decoder == "fixed_k":
        return top_k_commit(conf, allowed, param)
    raise ValueError(f"unknown decoder {decoder!r}")


def block_finished(blocks: torch.Tensor, mask_token_id: int, stop_ids: torch.Tensor | None,
                   early: torch.Tensor | None) -> torch.Tensor:
    """[n] bool: the block has no mask left, or (rows `early` [n] bool: early_stop) a committed stop
    token (`stop_ids` [n, w], padded with -1) with no mask before it."""
    masked = blocks == mask_token_id
    done = ~masked.any(1)
    if early is None:
        return done
    b = blocks.shape[1]
    pos = torch.arange(b, device=blocks.device)
    first_stop = torch.where(is_stop(blocks, stop_ids), pos, b).amin(1)
    settled = (first_stop < b) & ~(masked & (pos < first_stop[:, None])).any(1)
    return done | (early & settled)


GREEDY_ROW_HEAD = 5  # a greedy_row's values before its stop ids


def greedy_row(config, stop_ids, kinds: tuple[str, ...], width: int) -> list[float]:
    """One row of `greedy_step`'s parameters [GREEDY_ROW_HEAD + width] from a request's GenerationConfig
    and stop ids (every value exact in float32: token ids are below 2**24)."""
    own = OWN_PARAMETER.get(config.decoder)
    ids = sorted(stop_ids)
    return [config.threshold, kinds.index(config.decoder), getattr(config, own) if own else 0.0,
            config.early_stop, config.stops_last, *ids, *[-1] * (width - len(ids))]


def greedy_padding_row(width: int) -> list[float]:
    """The greedy_row of a padding row: threshold 1, the first decoder, no stop rules, no stop ids."""
    return [1.0, 0, 0.0, False, False] + [-1] * width


def greedy_step(logits: torch.Tensor, block: torch.Tensor, mask_token_id: int, rows: torch.Tensor,
                kinds: tuple[str, ...]) -> torch.Tensor:
    """One decode step of greedy rows whose every per-row choice is a tensor, so that a CUDA graph can
    hold it with the forward: the same commits as the engine's decode of those rows (candidates,
    stops_last, the row's decoder, early_stop). `rows` [n, GREEDY_ROW_HEAD + w] float32 (greedy_row): threshold,
    decoder (an index into `kinds`, STATELESS ones), its own parameter, early_stop, stops_last, stop
    ids. Returns [n, B + 2] long: the new block, finished (0/1) and masks left."""
    threshold, kind, param = rows[:, 0], rows[:, 1].long(), rows[:, 2]
    early, last, stop_ids = rows[:, 3] > 0, rows[:, 4] > 0, rows[:, GREEDY_ROW_HEAD:].long()
    x, conf = candidates(logits, mask_token_id)
    masked = block == mask_token_id
    above = torch.zeros_like(early)
    for j, decoder in enumerate(kinds):
        if decoder in COMMIT_ABOVE_THRESHOLD:
            above = above | (kind == j)
    # Positions at or above the threshold are committed in this step (COMMIT_ABOVE_THRESHOLD decoders).
    sure = torch.where(above, threshold, 2.0)
    allowed = torch.where(last[:, None], stops_last(x, conf, masked, stop_ids, sure), masked)
    commit = torch.zeros_like(masked)
    for j, decoder in enumerate(kinds):
        rule = commit_rule(decoder, conf, allowed, threshold, param)
        commit = torch.where((kind == j)[:, None], rule, commit)
    new = torch.where(commit, x, block)
    done = block_finished(new, mask_token_id, stop_ids, early)
    return torch.cat([new, done[:, None].long(), (new == mask_token_id).sum(1, keepdim=True)], 1)


def credit_fuse(logits: torch.Tensor, credit: torch.Tensor, masked: torch.Tensor, alpha: torch.Tensor,
                beta: torch.Tensor, gamma: torch.Tensor, first_step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dInfer's credit decoding: credit decays by beta and grows by p_top1^gamma on each masked
    position's running argmax; returns (logits + alpha * log(1 + credit), new credit).

    credit [n, B, V] fp32; first_step [n] bool (no decay on a block's first step).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    p_top, idx = probs.max(-1)
    decay = torch.where(first_step, torch.ones_like(beta), beta)[:, None, None]
    boost = torch.zeros_like(credit).scatter_(-1, idx[..., None], (p_top ** gamma[:, None])[..., None])
    credit = credit * decay + boost * masked[..., None]
    return logits.float() + alpha[:, None, None] * torch.log1p(credit), credit


def soft_embedding(logits: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """Expected input embedding under softmax(logits): [n, B, V] x [V, d] -> [n, B, d] (smoothing)."""
    return torch.softmax(logits.float(), dim=-1).to(embedding.dtype) @ embedding
