"""Choosing τ, the cascade threshold, from logged shadow pairs (METRICS.md "Choosing τ").

Pure numpy. Rows with c ≥ τ are served by the student, the rest by the teacher. Two
samples go in: the *traffic* (every request's confidence c at the current serving
temperature; weight 1 when every request is there) fixes the teacher share of each τ,
and the *pairs* (teacher-observed requests: fallbacks and shadow) carry the flips
ŷs ≠ ŷt, each weighted by w = 1/π so that weighted sums estimate sums over all traffic.

- budget: τ = the confidence quantile that sends a target share of traffic to the teacher.
- guarantee: the smallest teacher share whose risk R(τ) = P(ŷs ≠ ŷt | c ≥ τ) is ≤ ε with
  probability ≥ 1 - δ, by Learn-then-Test (Angelopoulos et al. 2021) with fixed-sequence
  testing: candidate thresholds are tested from the most conservative (highest τ) down,
  each H0: R(τ) > ε rejected when the one-sided Clopper-Pearson upper bound at level
  1 - δ is ≤ ε, and the scan stops at the first τ it cannot reject. Fixed-sequence testing
  controls the family-wise error at δ with no multiplicity correction, so every τ passed
  (the last one included) has R(τ) ≤ ε with probability ≥ 1 - δ. The highest τ serve
  too few pairs to pass (with zero flips, not below n_eff = ln δ / ln(1 - ε)), and a scan
  starting where one flip already fails would hinge on luck, so candidates enter the
  sequence only once their served pairs could pass while flipping at half the allowed
  rate (`min_served`). That depends on confidences and π only, never on flips, so the
  order is still fixed before any flip is looked at.
  Weighted rows enter as a share on Kish's n_eff (the design-effect approximation of
  `monitoring.metrics.intervals`); where all served pairs share one π it is exact.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from service.monitoring.metrics import clopper_pearson, effective_sample_size

FloatArray = npt.NDArray[np.float64]
DEFAULT_STEP = 0.001  # teacher-share resolution of the guarantee scan
CURVE_SHARES = tuple(i / 20 for i in range(21))  # 0%, 5%, ..., 100% of traffic


class NoThresholdError(ValueError):
    """No candidate τ meets the guarantee on this calibration set."""


@dataclass(frozen=True, eq=False)
class Sample:
    """Confidences with weights (w = 1/π for teacher-observed rows, 1 for all traffic)."""

    confidence: FloatArray
    weight: FloatArray

    @classmethod
    def of(cls, confidence: npt.ArrayLike, weights: npt.ArrayLike | None = None) -> Sample:
        c = np.asarray(confidence, dtype=np.float64).ravel()
        w = np.ones_like(c) if weights is None else np.asarray(weights, np.float64).ravel()
        if c.shape != w.shape:
            raise ValueError(f"{c.size} confidences but {w.size} weights")
        if not (np.isfinite(c).all() and np.isfinite(w).all() and (w > 0).all()):
            raise ValueError("confidences must be finite and weights finite and positive")
        return cls(c, w)

    def teacher_share(self, threshold: float) -> float:
        """Weighted share of rows with c < τ: the traffic the teacher answers."""
        total = float(self.weight.sum())
        return float(self.weight[self.confidence < threshold].sum()) / total if total else 0.0

    def thresholds(self, shares: npt.ArrayLike) -> FloatArray:
        """For each share s, the largest τ whose teacher share does not exceed s.

        That is the smallest confidence v with weighted CDF F(v) > s (c ≥ τ is served, so
        everything below v goes to the teacher, a share F(v⁻) ≤ s). s ≤ 0 gives 0 (serve
        everything); a share no confidence value reaches gives 1.
        """
        s = np.asarray(shares, dtype=np.float64)
        if self.confidence.size == 0:
            raise ValueError("no confidences to take a quantile of")
        values, inverse = np.unique(self.confidence, return_inverse=True)
        cdf = np.cumsum(np.bincount(inverse, weights=self.weight)) / self.weight.sum()
        # A 1e-12 slack: a CDF that equals s up to round-off must not count as above it.
        index = np.searchsorted(cdf, s + 1e-12, side="right")
        tau = np.where(index < values.size, values[np.minimum(index, values.size - 1)], 1.0)
        out: FloatArray = np.where(s <= 0, 0.0, np.minimum(tau, 1.0))
        return out


class Risk(NamedTuple):
    """P(flip | c ≥ τ) on the pairs: weighted share, its bound, and its sample size."""

    rate: float  # NaN when nothing is served
    upper: float  # one-sided (1 - δ) Clopper-Pearson upper bound on n_eff
    n: int  # pairs with c ≥ τ
    n_eff: float


class ThresholdChoice(NamedTuple):
    threshold: float
    teacher_share: float  # expected share of traffic sent to the teacher
    bound: float  # (1 - δ) upper bound on P(ŷs ≠ ŷt | c ≥ τ)
    flip_rate: float  # its point estimate
    n_served: int  # calibration pairs with c ≥ τ
    n_eff: float


class _Suffix:
    """Sums over pairs with c ≥ τ for any τ, from suffix sums over sorted confidences."""

    def __init__(self, pairs: Sample, flips: npt.ArrayLike) -> None:
        f = np.asarray(flips, dtype=np.float64).ravel()
        if f.shape != pairs.confidence.shape:
            raise ValueError(f"{pairs.confidence.size} pairs but {f.size} flips")
        order = np.argsort(pairs.confidence, kind="stable")
        self.sorted = pairs.confidence[order]
        w = pairs.weight[order]

        def suffix(values: FloatArray) -> FloatArray:
            out: FloatArray = np.concatenate([np.cumsum(values[::-1])[::-1], [0.0]])
            return out

        self.w, self.w2, self.wf = suffix(w), suffix(w * w), suffix(w * f[order])

    def n_eff(self, threshold: float) -> float:
        i = int(np.searchsorted(self.sorted, threshold, side="left"))
        return effective_sample_size(float(self.w[i]), float(self.w2[i]))

    def risk(self, threshold: float, delta: float) -> Risk:
        i = int(np.searchsorted(self.sorted, threshold, side="left"))
        n_eff = effective_sample_size(float(self.w[i]), float(self.w2[i]))
        rate = float(self.wf[i] / self.w[i]) if self.w[i] > 0 else math.nan
        k = 0.0 if math.isnan(rate) else rate * n_eff
        # Two-sided CP at 2δ has the one-sided (1 - δ) upper bound as its upper end.
        upper = clopper_pearson(k, n_eff, alpha=2.0 * delta)[1]
        return Risk(rate, upper, int(self.sorted.size - i), n_eff)


def budget_threshold(
    confidence: npt.ArrayLike, weights: npt.ArrayLike | None, share: float
) -> float:
    """The τ that sends at most `share` of the (weighted) traffic to the teacher."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    return float(Sample.of(confidence, weights).thresholds([share])[0])


def served_flip_risk(
    confidence: npt.ArrayLike,
    flips: npt.ArrayLike,
    weights: npt.ArrayLike | None,
    threshold: float,
    delta: float = 0.05,
) -> Risk:
    """P(ŷs ≠ ŷt | c ≥ τ) estimated on the pairs, with its one-sided (1 - δ) upper bound."""
    _check_level("delta", delta)
    return _Suffix(Sample.of(confidence, weights), flips).risk(threshold, delta)


@functools.lru_cache(maxsize=64)
def min_served(epsilon: float, delta: float) -> float:
    """Fewest served pairs (n_eff) whose upper bound at a flip rate of ε/2 is still ≤ ε.

    Candidates with fewer are never tested: the scan starts where a few unlucky flips
    cannot end it. Found by bisection on n (the bound falls as n grows at a fixed rate).
    """
    _check_level("epsilon", epsilon)
    _check_level("delta", delta)

    def passes(n: float) -> bool:
        return clopper_pearson(0.5 * epsilon * n, n, alpha=2.0 * delta)[1] <= epsilon

    # With no flips the bound is 1 - δ^(1/n); no fewer pairs can ever pass.
    low = math.log(delta) / math.log1p(-epsilon)
    high = 2.0 * low
    while not passes(high):
        low, high = high, 2.0 * high
    while high - low > 1e-3:
        mid = (low + high) / 2.0
        low, high = (low, mid) if passes(mid) else (mid, high)
    return high


def guarantee_threshold(
    confidence: npt.ArrayLike,
    flips: npt.ArrayLike,
    weights: npt.ArrayLike | None,
    epsilon: float,
    delta: float,
    *,
    traffic: Sample | None = None,
    step: float = DEFAULT_STEP,
) -> ThresholdChoice:
    """The smallest teacher share with P(ŷs ≠ ŷt | c ≥ τ) ≤ ε at confidence 1 - δ.

    Candidates are the `traffic` quantiles (the pairs themselves when not given) at teacher
    shares 0, step, 2·step, ..., 1: the scan resolves the share to `step`. Raises
    `NoThresholdError` when even the most conservative testable τ fails.
    """
    _check_level("epsilon", epsilon)
    _check_level("delta", delta)
    if not 0.0 < step <= 0.5:
        raise ValueError(f"step must be in (0, 0.5], got {step}")
    pairs = Sample.of(confidence, weights)
    shares_of = traffic if traffic is not None else pairs
    suffix = _Suffix(pairs, flips)
    grid = np.linspace(0.0, 1.0, round(1.0 / step) + 1)
    candidates = np.unique(shares_of.thresholds(grid))[::-1]  # most conservative first
    n_min = min_served(epsilon, delta)
    chosen: tuple[float, Risk] | None = None
    for tau in candidates:
        if suffix.n_eff(float(tau)) < n_min:
            continue
        risk = suffix.risk(float(tau), delta)
        if risk.upper > epsilon:
            break
        chosen = (float(tau), risk)
    if chosen is None:
        raise NoThresholdError(
            f"no threshold keeps P(flip | served) ≤ {epsilon} at confidence {1 - delta}: "
            f"{pairs.confidence.size} pairs (the scan starts at n_eff ≥ {math.ceil(n_min)} "
            "served pairs); collect more shadow pairs or relax epsilon/delta"
        )
    tau, risk = chosen
    return ThresholdChoice(
        tau, shares_of.teacher_share(tau), risk.upper, risk.rate, risk.n, risk.n_eff
    )


class CurvePoint(NamedTuple):
    """Quality of the cascade at one τ, all estimated over all traffic.

    `agreement` = P(served answer = teacher's answer); `flips_recovered` = the share of the
    student's flips that τ sends to the teacher; `accuracy` and `gap_recovered` (share of
    the teacher-student accuracy gap recovered) need labelled pairs and are None without.
    """

    threshold: float
    teacher_share: float
    agreement: float
    served_flip_rate: float | None
    flips_recovered: float | None
    accuracy: float | None
    gap_recovered: float | None


def cost_quality_curve(
    confidence: npt.ArrayLike,
    student_label: npt.ArrayLike,
    teacher_label: npt.ArrayLike,
    weights: npt.ArrayLike | None,
    *,
    labels: npt.ArrayLike | None = None,
    traffic: Sample | None = None,
    shares: npt.ArrayLike = CURVE_SHARES,
    thresholds: npt.ArrayLike = (),
) -> list[CurvePoint]:
    """Cost (teacher share) against quality at the τ of each share, and at `thresholds`.

    `labels` holds the ground truth per pair, negative where there is none.
    """
    pairs = Sample.of(confidence, weights)
    if pairs.confidence.size == 0:
        raise ValueError("no teacher-observed pairs to draw the curve from")
    ys, yt = np.asarray(student_label).ravel(), np.asarray(teacher_label).ravel()
    y = np.full(ys.shape, -1) if labels is None else np.asarray(labels).ravel()
    if not (ys.shape == yt.shape == y.shape == pairs.confidence.shape):
        raise ValueError("confidence, labels and weights need one value per pair")
    shares_of = traffic if traffic is not None else pairs
    taus = np.unique(np.concatenate([shares_of.thresholds(shares), np.ravel(thresholds)]))
    c, w = pairs.confidence, pairs.weight
    flip = ys != yt
    labelled = y >= 0
    gain = np.where(labelled, (yt == y).astype(float) - (ys == y), 0.0)  # teacher - student
    total_flips, total_w = float((w * flip).sum()), float(w.sum())
    w_labelled = float(w[labelled].sum())
    acc_student = float((w * (labelled & (ys == y))).sum()) / w_labelled if w_labelled else None
    gap = float((w * gain).sum()) / w_labelled if w_labelled else None
    points = []
    for tau in taus:
        served = c >= tau
        served_flips = float((w * flip)[served].sum())
        served_w = float(w[served].sum())
        recovered_gain = float((w * gain)[~served].sum()) / w_labelled if w_labelled else None
        points.append(
            CurvePoint(
                threshold=float(tau),
                teacher_share=shares_of.teacher_share(float(tau)),
                agreement=1.0 - served_flips / total_w,
                served_flip_rate=served_flips / served_w if served_w else None,
                flips_recovered=1.0 - served_flips / total_flips if total_flips else None,
                accuracy=None
                if acc_student is None or recovered_gain is None
                else acc_student + recovered_gain,
                gap_recovered=None
                if gap is None or recovered_gain is None or gap <= 0
                else recovered_gain / gap,
            )
        )
    return points


def _check_level(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value}")
