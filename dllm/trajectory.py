"""Trajectory compression (dInfer's trajectory distillation): data and objective.

1. Record: the engine decodes prompts with `record_trajectory=True`; each block comes back as a
   BlockTrajectory (final tokens + the step that committed each position), which encodes every
   intermediate state s_0 (all masks) ... s_T (the finished block).
2. Keep: a pluggable verifier (exact match for the synthetic tasks) keeps the trajectories whose final
   answer is right ("gold").
3. Learn to jump: sample a block and two of its states s_i (earlier) and s_j (later); the model sees
   the context and s_i and is trained to predict the tokens revealed between i and j
   (loss = -sum over those positions of log p(x_k | s_i)). A model that learns several steps' worth
   of reveals per forward commits more tokens per step: higher TPF.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .engine import Engine, GenerationConfig
from .engine.request import BlockTrajectory
from .objective import NoisedBatch

Verifier = Callable[[dict, str], bool]  # (sample, generated text) -> is the answer right?
ROW_COLUMNS = ("prompt_ids", "tokens", "reveal_step", "block_size")  # a stored trajectory (parquet row)


def exact_match(sample: dict, text: str) -> bool:
    """The synthetic tasks' verifier: the answer equals the reference output."""
    return text == sample["output"]


@dataclass
class Trajectory:
    prompt_ids: list[int]
    blocks: list[BlockTrajectory]
    text: str

    def to_row(self) -> dict:
        """The stored form (ROW_COLUMNS): the blocks' tokens and reveal steps laid end to end."""
        return {"prompt_ids": list(self.prompt_ids), "tokens": [t for b in self.blocks for t in b.tokens],
                "reveal_step": [r for b in self.blocks for r in b.reveal_step],
                "block_size": len(self.blocks[0].tokens)}

    @classmethod
    def from_row(cls, row) -> "Trajectory":
        """Inverse of to_row (values may be numpy arrays, as Ray Data hands them out)."""
        b = int(row["block_size"])
        tokens, reveal = [int(t) for t in row["tokens"]], [int(r) for r in row["reveal_step"]]
        blocks = [BlockTrajectory(tokens[k:k + b], reveal[k:k + b]) for k in range(0, len(tokens), b)]
        return cls([int(t) for t in row["prompt_ids"]], blocks, "")


def record_gold(engine: Engine, samples: Sequence[dict], config: GenerationConfig,
                verifier: Verifier = exact_match) -> tuple[list[Trajectory], dict]:
    """Decode Alpaca-style samples (instruction + input) and keep the trajectories the verifier passes.
    Returns (gold trajectories, {"decoded", "kept", "tpf"})."""
    prompts = [s["instruction"] + s.get("input", "") for s in samples]
    gens = engine.generate(prompts, config.replace(record_trajectory=True))
    gold = []
    for sample, prompt, gen in zip(samples, prompts, gens):
        if gen.trajectory and verifier(sample, gen.text):
            gold.append(Trajectory(engine.encode(prompt), gen.trajectory, gen.text))
    tokens = sum(len(g.token_ids) for g in gens)
    return gold, {"decoded": len(gens), "kept": len(gold), "tpf": tokens / max(1, sum(g.num_forwards for g in gens))}


def transition_batch(trajectories: Sequence[Trajectory], *, mask_token_id: int, pad_token_id: int,
                     generator: torch.Generator | None = None) -> NoisedBatch:
    """One compressed transition per trajectory: a random block, states i < j of it.

    Row = prompt + the blocks before (committed tokens) + s_i of the block (MASK where not yet
    revealed at step i), right-padded. loss_mask marks the positions revealed in steps [i, j).
    Positions a block never committed (after an early-stopped EOS) stay masked and carry no loss.
    """
    if not trajectories:
        raise ValueError("no trajectories: nothing passed the verifier")
    rows, targets, losses, fractions = [], [], [], []
    for traj in trajectories:
        k = int(torch.randint(len(traj.blocks), (1,), generator=generator))
        block = traj.blocks[k]
        steps = block.steps
        i = int(torch.randint(steps, (1,), generator=generator))  # 0 .. T-1
        j = int(torch.randint(i + 1, steps + 1, (1,), generator=generator))  # i+1 .. T
        context = list(traj.prompt_ids) + [t for b in traj.blocks[:k] for t in b.tokens]
        state = [t if 0 <= r < i else mask_token_id for t, r in zip(block.tokens, block.reveal_step)]
        delta = [i <= r < j for r in block.reveal_step]
        rows.append(context + state)
        targets.append(context + list(block.tokens))
        losses.append([False] * len(context) + delta)
        fractions.append(sum(delta) / len(delta))
    width = max(len(r) for r in rows)

    def pad(seqs, value):
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs])

    return NoisedBatch(input_ids=pad(rows, pad_token_id), targets=pad(targets, pad_token_id),
                       loss_mask=pad(losses, False).bool(), t=torch.tensor(fractions),
                       segment_ids=pad([[1] * len(r) for r in rows], 0))  # one sample per row
