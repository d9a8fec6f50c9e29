"""The dLLM-Var training objective: noising of packed rows and the masked cross-entropy.

Per row one t ~ U[t_min, t_max]; each response token is replaced by MASK with probability t;
every terminal token (EOS/EOT) in a response is always masked; prompt tokens and padding are
never masked. The loss is the mean cross-entropy over masked positions (optionally LLaDA's 1/t
weighting, or each packed sample weighing the same); EOS padding (terminal tokens after an answer's
first) can weigh less than the other positions.

Tail masking (our remedy, off by default): with the paper's packing the token after each
always-masked EOS is the next sample's clean prompt, a shortcut a small model learns instead of
"answer done -> EOS". In a fraction of rows we pick a sample boundary and replace everything after
it with MASK, excluded from the loss: exactly what the model sees at inference.

Answer cuts (also ours, off by default): at inference a block of B masks ends the sequence, so an
answer longer than what is decoded so far runs past the last position the model sees. Under the
document mask a trained sample never ends before its answer does, and the model learns to read
the answer's length off its run of masks (measured: a refusal of 20 tokens garbled in a 16-token
block, right in 24 or more masks). In a fraction of rows each answer is cut at a random point: its
prompt and its tokens up to the cut see nothing past it; the positions past it see the whole
sample and keep their loss.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_WEIGHTINGS = ("mean", "inverse_t", "per_sample")


@dataclass
class NoisedBatch:
    input_ids: torch.Tensor  # [b, L] with MASK at noised positions
    targets: torch.Tensor  # [b, L] clean ids
    loss_mask: torch.Tensor  # [b, L] bool: positions that count in the loss
    t: torch.Tensor  # [b] noise level per row
    # [b, L] the documents for a block-diagonal attention mask (document_attention_mask): the packed
    # samples, where a tail-masked row's tail joins the sample it follows (that sample's answer and
    # the masks past it see each other, as at inference); None where the rows carry no segments.
    segment_ids: torch.Tensor | None = None
    # [b, L] float: each position's weight in the loss (pad_eos_weight on EOS padding, else 1);
    # None where every position weighs the same.
    weights: torch.Tensor | None = None
    # [b, L] long: the last position each position may attend to (the cut of an answer cut by
    # cut_answer_prob, for its prompt and the part before the cut); None where nothing is cut.
    view_ends: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "NoisedBatch":
        """The batch with every tensor on `device` (the attention mask is then built there: the [b, L]
        tensors cross, not the [b, L, L] mask)."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if getattr(self, f.name) is not None})

    def attention_mask(self, documents: bool = True) -> torch.Tensor | None:
        """The training forward's mask [b, L, L] (True = may attend): the documents' block-diagonal
        mask (documents=False: full attention over the row), limited by the answers' cuts; None
        where neither limits anything (full attention)."""
        mask = document_attention_mask(self.segment_ids) if documents and self.segment_ids is not None else None
        if self.view_ends is None:
            return mask
        length = self.view_ends.shape[1]
        seen = torch.arange(length, device=self.view_ends.device)[None, None, :] <= self.view_ends[:, :, None]
        return seen if mask is None else mask & seen


def noise_batch(input_ids: torch.Tensor, prompt_mask: torch.Tensor, segment_ids: torch.Tensor | None, *,
                mask_token_id: int, terminal_token_ids: tuple[int, ...], t_min: float = 0.1, t_max: float = 0.9,
                tail_mask_prob: float = 0.0, tail_target_id: int | None = None, complementary: bool = False,
                clean_prefix_prob: float = 0.0, pad_eos_weight: float = 1.0, cut_answer_prob: float = 0.0,
                generator: torch.Generator | None = None) -> NoisedBatch:
    """Noise packed rows [b, L] for one training step (deterministic for a seeded generator).

    tail_mask_prob: fraction of rows whose positions after a random sample end are all masked (the
    inference condition; see DESIGN.md). Those positions carry no loss, or with `tail_target_id`
    (EOS) they are trained to predict it: every position past an answer learns to say "ended".
    complementary: return 2b rows, each row once with its mask and once with the complement (noise
    level 1 - t; terminals and tails masked in both): every response token is in the loss once per
    pair, where one independent mask covers a t fraction of them.
    clean_prefix_prob: fraction of rows in which every response keeps a clean prefix (a uniform
    random cut; only tokens from the cut on are noised), the state that decoding a block mostly
    left to right produces.
    pad_eos_weight: the loss weight of EOS padding, a terminal token right after another one of the
    same sample (dllm.eos_padded). With up to 8 per answer about half of a short answer's masked
    positions are padding; measured, weighing them less loses what the padding teaches (README).
    """
    if not 0.0 <= t_min <= t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max}")
    if not 0.0 <= tail_mask_prob <= 1.0:
        raise ValueError(f"tail_mask_prob must be in [0, 1], got {tail_mask_prob}")
    if not 0.0 <= clean_prefix_prob <= 1.0:
        raise ValueError(f"clean_prefix_prob must be in [0, 1], got {clean_prefix_prob}")
    if not 0.0 <= pad_eos_weight <= 1.0:
        raise ValueError(f"pad_eos_weight must be in [0, 1], got {pad_eos_weight}")
    if not 0.0 <= cut_answer_prob <= 1.0:
        raise ValueError(f"cut_answer_prob must be in [0, 1], got {cut_answer_prob}")
    b, length = input_ids.shape
    device = input_ids.device
    real = segment_ids > 0 if segment_ids is not None else torch.ones_like(prompt_mask, dtype=torch.bool)
    response = real & ~prompt_mask.bool()

    t = t_min + (t_max - t_min) * torch.rand(b, generator=generator, device="cpu").to(device)
    u = torch.rand(b, length, generator=generator, device="cpu").to(device)
    terminal = torch.zeros_like(response)  # the responses' terminal tokens, always masked
    for tok in terminal_token_ids:
        terminal |= input_ids == tok
    terminal &= response
    padding = torch.zeros_like(terminal)  # a terminal right after a terminal of the same sample
    padding[:, 1:] = terminal[:, 1:] & terminal[:, :-1]
    if segment_ids is not None:
        padding[:, 1:] &= segment_ids[:, 1:] == segment_ids[:, :-1]
    drawn = u < t[:, None]
    noised = response  # response tokens that may be masked
    if clean_prefix_prob > 0:
        noised = response & ~_clean_prefixes(response, segment_ids, clean_prefix_prob, generator)
    if complementary:
        input_ids, noised, terminal = input_ids.repeat(2, 1), noised.repeat(2, 1), terminal.repeat(2, 1)
        padding = padding.repeat(2, 1)
        drawn, t = torch.cat([drawn, ~drawn]), torch.cat([t, 1.0 - t])
    masked = (noised & drawn) | terminal
    loss_mask = masked.clone()

    targets, documents = input_ids, segment_ids
    if tail_mask_prob > 0 and segment_ids is not None:
        tail, documents = _tail_positions(segment_ids, tail_mask_prob, generator)
        tail = tail.repeat(2, 1) if complementary else tail
        masked |= tail
        if tail_target_id is None:
            loss_mask &= ~tail
        else:  # "past the end of the answer": every tail position is trained to say EOS
            targets = torch.where(tail, torch.full_like(input_ids, tail_target_id), input_ids)
            loss_mask |= tail
        padding &= ~tail  # a tail position is "past the end", whatever it held
    if complementary and documents is not None:
        documents = documents.repeat(2, 1)
    view_ends = None
    if cut_answer_prob > 0:
        view_ends = _answer_cuts(response, segment_ids, cut_answer_prob, generator)
        if tail_mask_prob > 0 and segment_ids is not None:
            view_ends = torch.where(tail[:b], length - 1, view_ends)  # a tail is past every cut
        view_ends = view_ends.repeat(2, 1) if complementary else view_ends
    noisy = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    weights = None
    if pad_eos_weight != 1.0:
        weights = torch.where(padding, pad_eos_weight, 1.0).to(torch.float32)
    return NoisedBatch(noisy, targets, loss_mask, t, documents, weights, view_ends)


def _response_ranks(response: torch.Tensor, segment_ids: torch.Tensor | None):
    """On the CPU: (each response token's index within its sample's response, the segment ids as
    longs, the responses' lengths [b, segments])."""
    b, length = response.shape
    resp = response.cpu()
    seg = segment_ids.cpu().long() if segment_ids is not None else torch.ones(b, length, dtype=torch.long)
    # A running count that restarts at every segment change (segments are contiguous runs of one id).
    count = resp.long().cumsum(1)
    starts = torch.ones_like(resp)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    before = torch.where(starts, count - resp.long(), torch.zeros_like(count))
    rank = count - torch.cummax(before, dim=1).values - 1
    lengths = torch.zeros(b, int(seg.max()) + 1, dtype=torch.long).scatter_add_(1, seg, resp.long())
    return rank, seg, lengths


def _clean_prefixes(response: torch.Tensor, segment_ids: torch.Tensor | None, prob: float,
                    generator: torch.Generator | None) -> torch.Tensor:
    """For a `prob` fraction of rows: each sample's response tokens before a cut drawn uniformly
    from 0 .. its response length - 1 (so at least its last token stays noisable)."""
    rank, seg, lengths = _response_ranks(response, segment_ids)
    pick = torch.rand(response.shape[0], generator=generator) < prob
    cuts = (torch.rand(lengths.shape, generator=generator) * lengths).long()
    clean = response.cpu() & (rank < cuts.gather(1, seg)) & pick[:, None]
    return clean.to(response.device)


def _answer_cuts(response: torch.Tensor, segment_ids: torch.Tensor | None, prob: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """view_ends [b, L]: for a `prob` fraction of rows, each sample with a response of n >= 2 tokens
    keeps its first 1 .. n - 1 (uniform) in view, and its positions up to the last of them see up to
    there; every other position sees the whole row (its document mask still applies)."""
    b, length = response.shape
    rank, seg, lengths = _response_ranks(response, segment_ids)
    pick = torch.rand(b, generator=generator) < prob
    kept = 1 + (torch.rand(lengths.shape, generator=generator) * (lengths - 1).clamp(min=0)).long()
    positions = torch.arange(length).expand(b, length)
    last_seen = response.cpu() & pick[:, None] & (lengths.gather(1, seg) >= 2) & (rank == kept.gather(1, seg) - 1)
    ends = torch.full(lengths.shape, -1, dtype=torch.long).scatter_reduce_(
        1, seg, torch.where(last_seen, positions, -1), reduce="amax")
    end = ends.gather(1, seg)
    view_ends = torch.where((end >= 0) & (positions <= end), end, length - 1)
    return view_ends.to(response.device)


def _tail_positions(segment_ids: torch.Tensor, prob: float,
                    generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """For a `prob` fraction of rows: every position after a randomly chosen sample end; and the
    segment ids with each such tail joined to the sample that ends there."""
    b, length = segment_ids.shape
    out = torch.zeros(b, length, dtype=torch.bool, device=segment_ids.device)
    joined = segment_ids.clone()
    seg = segment_ids.cpu()
    pick = torch.rand(b, generator=generator) < prob
    cut_u = torch.rand(b, generator=generator)
    positions = torch.arange(length)
    for row in torch.nonzero(pick).flatten().tolist():
        s = seg[row]
        # A boundary = the last position of a segment that is followed by more of the row.
        ends = torch.nonzero((s[:-1] > 0) & (s[1:] != s[:-1])).flatten()
        if len(ends) == 0:
            continue
        end = int(ends[int(cut_u[row] * len(ends))])
        out[row] = (positions > end).to(out.device)
        joined[row, end + 1:] = int(s[end])
    return out, joined


def diffusion_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor,
                   t: torch.Tensor | None = None, weighting: str = "mean",
                   segment_ids: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over masked positions.

    weighting="mean": plain mean over masked tokens (dLLM-Var).
    weighting="inverse_t": each token weighted by 1/t of its row, summed and divided by the
    number of real positions, LLaDA's unbiased ELBO estimate.
    weighting="per_sample": the mean over each sample's masked tokens, averaged over the samples
    (`segment_ids`: the NoisedBatch's documents, a tail counted with the sample it follows, as
    LLaDA's SFT counts an answer's EOS padding), so a 2-token answer weighs what a 30-token one does.
    weights [b, L] (NoisedBatch.weights): per-position weights; the means above become weighted
    means (each position counts its weight instead of 1), the 1/t sum is weighted.
    """
    _check_weighting(weighting, t, segment_ids)
    n = loss_mask.sum()
    if n == 0:
        return logits.sum() * 0.0  # keeps the graph (and DeepSpeed's hooks) intact
    ce = F.cross_entropy(logits[loss_mask].float(), targets[loss_mask], reduction="none")
    return _weighted(ce, loss_mask, t, weighting, segment_ids, weights)


def _check_weighting(weighting: str, t: torch.Tensor | None, segment_ids: torch.Tensor | None) -> None:
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {LOSS_WEIGHTINGS}")
    if weighting == "inverse_t" and t is None:
        raise ValueError("weighting='inverse_t' needs the per-row noise levels t")
    if weighting == "per_sample" and segment_ids is None:
        raise ValueError("weighting='per_sample' needs the samples' segment ids (NoisedBatch.segment_ids)")


def _weighted(ce: torch.Tensor, loss_mask: torch.Tensor, t: torch.Tensor | None, weighting: str,
              segment_ids: torch.Tensor | None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce per-token cross-entropies (at the masked positions, in order) to the loss."""
    w = torch.ones_like(ce) if weights is None else weights[loss_mask].to(ce.dtype)
    if weighting == "mean":
        return ce.mean() if weights is None else (ce * w).sum() / w.sum().clamp(min=1e-12)
    if weighting == "inverse_t":
        w = w * (1.0 / t)[:, None].expand_as(loss_mask)[loss_mask]
        return (ce * w).sum() / loss_mask.numel()
    # per_sample: a (row, segment) key per masked token; sums and counts by key, no host sync.
    b, length = loss_mask.shape
    per_row = length + 1  # segment ids run 0 .. at most length
    rows = torch.arange(b, device=loss_mask.device)[:, None].expand(b, length)
    key = (rows * per_row + segment_ids.long())[loss_mask]
    sums = torch.zeros(b * per_row, dtype=ce.dtype, device=ce.device).scatter_add_(0, key, ce * w)
    counts = torch.zeros_like(sums).scatter_add_(0, key, w)
    present = torch.zeros_like(sums).scatter_add_(0, key, torch.ones_like(ce)) > 0
    return (sums / counts.clamp(min=1e-12)).sum() / present.sum()


def document_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal mask [b, L, L] (True = may attend) so packed samples do not see each other;
    pass a NoisedBatch's segment_ids, where each tail belongs to the sample it follows.

    dLLM-Var trains with full attention over the whole row; a small model learns the synthetic
    tasks far faster under this mask (README, objective study). Padding attends only to padding.
    """
    return segment_ids[:, :, None] == segment_ids[:, None, :]


def diffusion_loss_from_hidden(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                               loss_mask: torch.Tensor, t: torch.Tensor | None = None,
                               weighting: str = "mean", segment_ids: torch.Tensor | None = None,
                               weights: torch.Tensor | None = None) -> torch.Tensor:
    """`diffusion_loss` computed from final hidden states [b, L, d]: the LM head runs only on the
    masked positions (a 126k-vocabulary head over a whole 8192-token row would not fit)."""
    _check_weighting(weighting, t, segment_ids)
    if loss_mask.sum() == 0:
        return hidden.sum() * 0.0 + sum(p.sum() for p in head.parameters()) * 0.0
    logits = head(hidden[loss_mask]).float()
    return _weighted(F.cross_entropy(logits, targets[loss_mask], reduction="none"), loss_mask, t, weighting, segment_ids,
                     weights)
