"""Confidence intervals and exact tests for proportions, weighted or not.

Weighted (Horvitz-Thompson / Hájek) proportions are handed to these as a share `p` and a
Kish effective sample size n_eff = (Σw)²/Σw²: the interval is then that of an unweighted
sample of n_eff rows with k = p·n_eff successes. That is the usual design-effect
approximation; it is exact when all weights are equal.

Every interval is two-sided at level 1 - alpha and clipped to the parameter's range. An
empty sample (n = 0) gets the uninformative interval, never NaN, so callers can store it.
"""

from __future__ import annotations

import math

from scipy import stats


def z_quantile(alpha: float) -> float:
    """The standard normal quantile z_{1-alpha/2} (1.95996… at alpha = 0.05)."""
    return float(stats.norm.ppf(1.0 - alpha / 2.0))


def effective_sample_size(sum_w: float, sum_w2: float) -> float:
    """Kish's effective sample size (Σw)² / Σw²; 0 for an empty window."""
    return sum_w * sum_w / sum_w2 if sum_w2 > 0 else 0.0


def wilson(successes: float, n: float, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval for a proportion (Wilson 1927; Brown, Cai & DasGupta 2001).

    centre = (p + z²/2n) / (1 + z²/n),  half = z·√(p(1-p)/n + z²/4n²) / (1 + z²/n).
    `successes` and `n` may be fractional (a weighted share times n_eff).
    """
    if n <= 0:
        return 0.0, 1.0
    p = min(max(successes / n, 0.0), 1.0)
    z = z_quantile(alpha)
    z2 = z * z
    denominator = 1.0 + z2 / n
    centre = (p + z2 / (2.0 * n)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def clopper_pearson(successes: float, n: float, alpha: float = 0.05) -> tuple[float, float]:
    """Clopper-Pearson 'exact' interval from beta quantiles (Clopper & Pearson 1934).

    lower = B(alpha/2; k, n-k+1), upper = B(1-alpha/2; k+1, n-k), with 0 and 1 at the edges.
    The beta form extends to fractional k and n (weighted data).
    """
    if n <= 0:
        return 0.0, 1.0
    k = min(max(successes, 0.0), n)
    lower = 0.0 if k <= 0 else float(stats.beta.ppf(alpha / 2.0, k, n - k + 1.0))
    upper = 1.0 if k >= n else float(stats.beta.ppf(1.0 - alpha / 2.0, k + 1.0, n - k))
    return lower, upper


def proportion_interval(p: float, n_eff: float, alpha: float = 0.05) -> tuple[float, float]:
    """Interval for a (weighted) share p on n_eff rows, as METRICS.md prescribes.

    Clopper-Pearson when k = n_eff·p < 10 (few events: Wilson's coverage dips there),
    Wilson otherwise. The rule is one-sided as written in METRICS.md; the shares it is
    used for (flip rates) sit near 0, where it matters.
    """
    k = p * n_eff
    return clopper_pearson(k, n_eff, alpha) if k < 10 else wilson(k, n_eff, alpha)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: 2·P(Bin(b+c, ½) ≤ min(b, c)), capped at 1.

    Under H0 (equal marginal accuracies) each discordant pair falls either way with
    probability ½; concordant pairs carry no information (McNemar 1947).
    """
    if b + c == 0:
        return 1.0
    return min(1.0, 2.0 * float(stats.binom.cdf(min(b, c), b + c, 0.5)))


def newcombe_paired_difference(
    both: float, first_only: float, second_only: float, neither: float, alpha: float = 0.05
) -> tuple[float, float]:
    """Newcombe (1998) method 10 interval for p1 - p2 of paired proportions.

    The 2x2 table is (both, first_only; second_only, neither), so p1 = (both + first_only)/N,
    p2 = (both + second_only)/N and p1 - p2 = (first_only - second_only)/N. With Wilson
    intervals (l1, u1) for p1 and (l2, u2) for p2 ("square and add"):
      lower = Δ - √((p1-l1)² - 2φ(p1-l1)(u2-p2) + (u2-p2)²)
      upper = Δ + √((u1-p1)² - 2φ(u1-p1)(p2-l2) + (p2-l2)²)
    where φ is the correlation estimate with Newcombe's correction (see `_newcombe_phi`).
    Checked against Fagerland, Lydersen & Laake (2017), ch. 8.
    """
    n = both + first_only + second_only + neither
    if n <= 0:
        return -1.0, 1.0
    p1 = (both + first_only) / n
    p2 = (both + second_only) / n
    l1, u1 = wilson(both + first_only, n, alpha)
    l2, u2 = wilson(both + second_only, n, alpha)
    phi = _newcombe_phi(both, first_only, second_only, neither)
    delta = p1 - p2
    down = (p1 - l1) ** 2 - 2.0 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    up = (u1 - p1) ** 2 - 2.0 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    # |φ| ≤ 1 keeps both radicands ≥ 0 up to rounding.
    return max(-1.0, delta - math.sqrt(max(down, 0.0))), min(1.0, delta + math.sqrt(max(up, 0.0)))


def _newcombe_phi(a: float, b: float, c: float, d: float) -> float:
    """φ = C / √((a+b)(c+d)(a+c)(b+d)), C = AD-BC-N/2 if that is > 0, AD-BC if < 0, else 0.

    Newcombe's correction to the phi coefficient (his method 10): it shrinks a positive
    correlation by N/2, which keeps the interval from being too narrow at small N.
    """
    product = (a + b) * (c + d) * (a + c) * (b + d)
    if product <= 0:
        return 0.0
    cross = a * d - b * c
    half_n = (a + b + c + d) / 2.0
    if cross > half_n:
        corrected = cross - half_n
    elif cross >= 0:
        corrected = 0.0
    else:
        corrected = cross
    return corrected / math.sqrt(product)


def wald_paired_difference(
    b_share: float, c_share: float, n_eff: float, alpha: float = 0.05
) -> tuple[float, float]:
    """Wald interval for Δ = b - c, the weighted shares of the two discordant cells.

    Per row d = +1 (first only right), -1 (second only right), 0 otherwise, so
    Var(d) = (b + c) - (b - c)² and SE(Δ) = √(Var(d) / n_eff) (Hájek mean, Kish n_eff).
    """
    if n_eff <= 0:
        return -1.0, 1.0
    delta = b_share - c_share
    variance = max(b_share + c_share - delta * delta, 0.0)
    half = z_quantile(alpha) * math.sqrt(variance / n_eff)
    return max(-1.0, delta - half), min(1.0, delta + half)
