"""Paired statistics over seeds: every model of a comparison sees the same batches for a given seed, so the
per-seed difference between two models is the measure with power, not the difference of their means ± std.

Perplexities are compared on the log scale: the per-seed difference of mean losses d_s = log ppl_a − log ppl_b
(nats per token) is a log ratio of perplexities, so its mean and interval read as a percentage,
100 · (exp(d) − 1). The interval is Student's t over the seeds (two-sided 95%); a difference is *resolved* when
its interval excludes 0. With one seed nothing is resolved and no interval is given.

Beside the interval: the two-sided p-value of the paired t-test (`p`), the exact two-sided binomial p of the sign
count (`sign_p`: 5 of 5 seeds is p = 0.0625, no evidence on its own), and the seeds that would resolve a 3%
difference with 80% power at the spread these seeds show (`seeds_80`, `seeds_for_power`). A table of many
contrasts adjusts the p-values of all but its pre-declared primary ones by Holm's step-down method (`holm`).
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
    p: float | None = None  # two-sided p of the paired t-test (mean = 0); None with one seed
    sign_p: float = 1.0  # exact two-sided binomial p of the sign count (sign test)

    def seeds_for(self, effect_pct: float) -> int | None:
        """The seeds whose interval would resolve a difference of `effect_pct` percent *if the true difference
        were exactly that large*: about 50% power (the interval straddles 0 half the time); None with one seed."""
        return None if self.sd is None else seeds_to_resolve(self.sd, math.log1p(effect_pct / 100))

    def seeds_for_power(self, effect_pct: float, power: float = 0.8) -> int | None:
        """The seeds a paired t-test (two-sided, 5%) needs to detect a true difference of `effect_pct` percent
        with probability `power` at this spread (the planning figure for the next run); None with one seed."""
        return None if self.sd is None else seeds_for_power(self.sd, math.log1p(effect_pct / 100), power)

    def percent(self, value: float | None) -> float | None:
        """A log ratio as a percentage change (100 · (exp(value) − 1))."""
        return None if value is None else 100 * math.expm1(value)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(mean_pct=self.percent(self.mean), low_pct=self.percent(self.low), high_pct=self.percent(self.high))
        out.update(seeds_for_3pct=self.seeds_for(3.0), seeds_80=self.seeds_for_power(3.0))
        return out


def paired_difference(a: Sequence[float], b: Sequence[float]) -> PairedDifference:
    """The paired difference a_s − b_s over seeds s (same order in both)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired values need the same number of seeds (>= 1), got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b, strict=True)]
    n, mean = len(d), math.fsum(d) / len(d)
    sign_holds = sum(1 for v in d if (v > 0) == (mean > 0) and v != 0)
    signs = sign_test(sum(v > 0 for v in d), sum(v < 0 for v in d))
    if n == 1:
        return PairedDifference(1, mean, None, None, sign_holds, False, sign_p=signs)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in d) / (n - 1))
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    p = 2 * (1 - t_cdf(abs(mean) / (sd / math.sqrt(n)), n - 1)) if sd > 0 else float(mean == 0)
    return PairedDifference(n, mean, low, high, sign_holds, low > 0 or high < 0, sd, p, signs)


def sign_test(positive: int, negative: int) -> float:
    """The exact two-sided binomial p of `positive` and `negative` signs (ties left out) under p = 1/2:
    2 · P(X >= max) for X ~ Binomial(n, 1/2), at most 1. 5 of 5 gives 0.0625."""
    n, k = positive + negative, max(positive, negative)
    if n == 0:
        return 1.0
    tail = math.fsum(math.comb(n, i) for i in range(k, n + 1)) / 2**n
    return min(1.0, 2 * tail)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (in their order): the i-th smallest times (m − i),
    made monotone and capped at 1. Controls the family-wise error at the level the adjusted values are read at."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def t_test_power(n: int, sd: float, effect: float, confidence: float = 0.975) -> float:
    """The power of the two-sided paired t-test (level 2 · (1 − confidence)) over n seeds when the true mean
    difference is `effect` and the per-seed differences spread with standard deviation `sd`: P(|T| > t_c) for T
    noncentral t with n − 1 degrees of freedom and noncentrality effect·√n / sd, integrated over the chi-square
    of the sample variance (Simpson's rule on its density)."""
    if n < 2:
        raise ValueError(f"a paired t-test needs n >= 2 seeds, got {n}")
    if sd == 0:
        return 1.0 if effect != 0 else 0.0
    df, delta, critical = n - 1, abs(effect) * math.sqrt(n) / sd, t_quantile(confidence, n - 1)
    top = df + 12 * math.sqrt(2 * df) + 40  # the chi-square(df) density is negligible beyond
    steps = 2000
    width = top / steps
    log_norm = -(df / 2) * math.log(2) - math.lgamma(df / 2)

    def integrand(v: float) -> float:
        if v <= 0:
            return 0.0
        density = math.exp(log_norm + (df / 2 - 1) * math.log(v) - v / 2)
        c = critical * math.sqrt(v / df)
        return density * (_normal_cdf(delta - c) + _normal_cdf(-delta - c))

    total = integrand(0.0) + integrand(top)
    total += math.fsum((4 if i % 2 else 2) * integrand(i * width) for i in range(1, steps))
    return total * width / 3


def seeds_for_power(sd: float, effect: float, power: float = 0.8, at_least: int = 2) -> int:
    """The fewest seeds (>= `at_least`) whose two-sided 5% paired t-test detects a true difference `effect`
    with probability >= `power` at per-seed spread `sd` (`t_test_power`; bisection, power grows with n)."""
    if sd < 0 or effect <= 0 or not 0 < power < 1:
        raise ValueError(f"need sd >= 0, effect > 0 and 0 < power < 1, got sd={sd}, effect={effect}, power={power}")
    low, high = max(at_least, 2), max(at_least, 2)
    while t_test_power(high, sd, effect) < power:
        low, high = high + 1, high * 2
        if high > 100_000:
            raise ValueError(f"an effect of {effect} needs more than 100,000 seeds at spread {sd}")
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if t_test_power(mid, sd, effect) < power else (low, mid)
    return low


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


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
