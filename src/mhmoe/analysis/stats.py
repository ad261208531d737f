"""Paired statistics over seeds: every model of a comparison sees the same batches for a given seed, so the
per-seed difference between two models is the measure with power, not the difference of their means ± std.

Perplexities are compared on the log scale: the per-seed difference of mean losses d_s = log ppl_a − log ppl_b
(nats per token) is a log ratio of perplexities, so its mean and interval read as a percentage,
100 · (exp(d) − 1). The interval is Student's t over the seeds (two-sided 95%); a difference is *resolved* when
its interval excludes 0. With one seed nothing is resolved and no interval is given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PairedDifference:
    seeds: int  # paired seeds
    mean: float  # mean of d_s (log ratio; for perplexities, nats per token)
    low: float | None  # 95% interval of the mean; None with one seed
    high: float | None
    sign_holds: int  # seeds whose d_s has the sign of the mean
    resolved: bool  # the interval excludes 0
    sd: float | None = None  # standard deviation of d_s over the seeds; None with one seed

    def seeds_for(self, effect_pct: float) -> int | None:
        """The seeds whose interval would resolve a difference of `effect_pct` percent at this spread (the
        planning figure for the next run); None with one seed, where the spread is unknown."""
        return None if self.sd is None else seeds_to_resolve(self.sd, math.log1p(effect_pct / 100))

    def percent(self, value: float | None) -> float | None:
        """A log ratio as a percentage change (100 · (exp(value) − 1))."""
        return None if value is None else 100 * math.expm1(value)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(mean_pct=self.percent(self.mean), low_pct=self.percent(self.low), high_pct=self.percent(self.high))
        out.update(seeds_for_3pct=self.seeds_for(3.0))
        return out


def paired_difference(a: Sequence[float], b: Sequence[float]) -> PairedDifference:
    """The paired difference a_s − b_s over seeds s (same order in both)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired values need the same number of seeds (>= 1), got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b, strict=True)]
    n, mean = len(d), math.fsum(d) / len(d)
    sign_holds = sum(1 for v in d if (v > 0) == (mean > 0) and v != 0)
    if n == 1:
        return PairedDifference(1, mean, None, None, sign_holds, False)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in d) / (n - 1))
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    return PairedDifference(n, mean, low, high, sign_holds, low > 0 or high < 0, sd)


def seeds_to_resolve(sd: float, effect: float, confidence: float = 0.975, at_least: int = 2) -> int:
    """The fewest seeds whose 95% paired interval half-width t·sd/√n is below `effect` (both in the same units,
    e.g. log perplexity): how many seeds a difference of that size needs when the per-seed differences spread
    with standard deviation `sd`."""
    if sd < 0 or effect <= 0:
        raise ValueError(f"need sd >= 0 and effect > 0, got sd={sd}, effect={effect}")
    n = max(at_least, 2)
    while t_quantile(confidence, n - 1) * sd / math.sqrt(n) >= effect:
        n += 1
        if n > 10_000:
            raise ValueError(f"an effect of {effect} is not resolvable at spread {sd} with 10,000 seeds")
    return n


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (bisection on its CDF)."""
    if not 0 < p < 1 or df < 1:
        raise ValueError(f"need 0 < p < 1 and df >= 1, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t: 1 − I_x(df/2, 1/2) / 2 at x = df / (df + t²), for t >= 0 (symmetric below)."""
    tail = 0.5 * _regularized_beta(df / (df + t * t), df / 2, 0.5)
    return 1 - tail if t >= 0 else tail


def _regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), by its continued fraction (Lentz's method; Numerical Recipes §6.4)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast on this side only
        return 1 - _regularized_beta(1 - x, b, a)
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            numerator = 1.0
        elif i % 2 == 0:
            numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            numerator = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 + numerator * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + numerator / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1 - c * d) < 1e-15:
            break
    return front * (f - 1) / a
