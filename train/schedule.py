"""The learning rate of an SFT run: linear warm-up, then constant or a cosine decay over the run's budget.

The budget is whatever ends the run first: `max_steps` (or the steps `epochs` amount to) and
`time_limit_s`. A time-limited run therefore still anneals to its floor when the clock, not the
step count, ends it. The rate is a pure function of (step, elapsed time), both part of a
checkpoint's state, so a resumed run continues the same curve.
"""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine")


def run_progress(step: int, elapsed_s: float, total_steps: int | None, time_limit_s: float | None) -> float:
    """Fraction [0, 1] of the run's budget used: the larger of the step and the time fraction."""
    fractions = [0.0]
    if total_steps:
        fractions.append(step / total_steps)
    if time_limit_s:
        fractions.append(elapsed_s / time_limit_s)
    return min(1.0, max(fractions))


def learning_rate(*, lr: float, schedule: str, warmup_steps: int, min_lr_ratio: float, step: int,
                  progress: float) -> float:
    """Rate for optimizer step `step` (1-based) at `progress` through the run."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {LR_SCHEDULES}")
    warm = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    if schedule == "constant":
        return lr * warm
    floor = lr * min_lr_ratio
    return warm * (floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def epoch_steps(rows: int, rows_per_micro: int, grad_accum: int, epochs: int) -> int:
    """Optimizer steps `epochs` passes over `rows` packed rows amount to (the last partial batch is dropped)."""
    return max(1, epochs * (rows // rows_per_micro) // grad_accum)
