"""Small statistics the benchmarks share."""

from __future__ import annotations

import math


def percentile(values: list[float], q: float) -> float:
    """The q-quantile of `values` (nearest rank, no interpolation: p99 of 100 latencies is the 99th); NaN of none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def student_t_sf2(t: float, df: int) -> float:
    """Two-sided tail probability P(|T| >= |t|) of Student's t with `df` degrees of freedom.

    Integrates the density over [0, |t|] by Simpson's rule in the variable u = atan(x / sqrt(df)), on which the
    density is smooth and bounded even where its tails are heavy (df = 1), to ~1e-9; no scipy needed."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if math.isinf(t):
        return 0.0
    # With x = sqrt(df) tan(u), the density f(x) dx becomes c * cos(u)^(df - 1) du, c its normaliser.
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(math.pi)
    upper, n = math.atan(abs(t) / math.sqrt(df)), 2000
    h = upper / n
    total = sum((1 if i in (0, n) else 4 if i % 2 else 2) * math.cos(i * h) ** (df - 1) for i in range(n + 1))
    return max(0.0, 1.0 - 2.0 * c * total * h / 3)


def student_t_quantile(q: float, df: int) -> float:
    """The q-quantile (0.5 < q < 1) of Student's t: t_{0.975, 4} = 2.776, the half-width factor of a 95 % interval
    of a mean of 5 values."""
    if not 0.5 < q < 1:
        raise ValueError(f"q must be in (0.5, 1), got {q}")
    lo, hi = 0.0, 1.0
    while student_t_sf2(hi, df) / 2 > 1 - q:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if student_t_sf2(mid, df) / 2 > 1 - q else (lo, mid)
    return (lo + hi) / 2


def paired_comparison(baseline: dict, other: dict) -> dict:
    """`other` against `baseline`, both {seed: score}, over the seeds they share: a seed draws the same initial
    weights, batches and noise for both, so its difference is free of the seed-to-seed spread that the two means
    carry. Returns the differences (other - baseline), their mean, a 95 % t-interval of it, the t-test's two-sided
    p and the exact sign-flip (permutation) test's p, which assumes nothing of their distribution but cannot go
    below 2 / 2^n (0.0625 for 5 seeds). `resolved`: the interval excludes 0."""
    seeds = sorted(set(baseline) & set(other))
    if len(seeds) < 2:
        raise ValueError(f"a paired comparison needs 2 or more shared seeds; got {seeds}")
    diffs = [other[s] - baseline[s] for s in seeds]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = student_t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    p_t = student_t_sf2(mean / (sd / math.sqrt(n)), n - 1) if sd > 0 else float(mean == 0)
    # Under "no difference" each difference's sign is a coin flip: how often is |mean| at least this large?
    flips = 1 << n if n <= 16 else 0
    extreme = sum(abs(sum(d if (mask >> i) & 1 else -d for i, d in enumerate(diffs))) >= abs(sum(diffs)) - 1e-12
                  for mask in range(flips))
    return {"seeds": seeds, "differences": diffs, "mean": mean, "ci95": [mean - half, mean + half], "p_t": p_t,
            "p_sign_flip": extreme / flips if flips else None, "resolved": mean - half > 0 or mean + half < 0}
