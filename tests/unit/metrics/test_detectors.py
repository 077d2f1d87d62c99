"""Proving the detectors work (METRICS.md): false alarms within design level, shifts caught.

For each detector, under no drift many windows are scored and the alarm count must stay
below the 99.9 % binomial quantile at the detector's design level (computed here, not
tuned); under a known shift the detector must fire in the first window, and a precondition
derived from the statistics shows that a miss would be a rare event, not luck.
All data is synthetic and seeded.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from scipy import special, stats

from service.monitoring.metrics import (
    CalibrationStats,
    DriftStats,
    EntropyReference,
    FlipStats,
    GapStats,
    MetricValue,
    js_divergence,
    miscalibrated,
    smoothed_shares,
)
from service.monitoring.probabilities import softmax

WINDOWS = 400
Z = stats.norm.ppf(0.975)  # every interval here is two-sided 95 %: one-sided level 2.5 %


def alarm_bound(windows: int, level: float) -> int:
    """Most alarms that `windows` independent windows at `level` give with prob. 0.999."""
    return int(stats.binom.ppf(0.999, windows, level))


# --- flip rate: alert when the lower bound of F clears the threshold (level 2.5 % at F = thr)
TAU, SHADOW_RATE, REQUESTS = 0.8, 0.1, 20_000
BETA_A, BETA_B = 5.0, 1.2  # c = 0.4 + 0.6·Beta(5, 1.2): most traffic is confident


def flip_probability(c: npt.NDArray[np.float64], factor: float) -> npt.NDArray[np.float64]:
    return factor * 0.6 * (1.0 - c) ** 1.5  # flips concentrate on hard inputs


def population_flip_rate(factor: float) -> float:
    # E[0.6(1 - c)^1.5] with 1 - c = 0.6·X, X = 1 - B ~ Beta(1.2, 5): E[X^1.5] by beta functions.
    moment = special.beta(BETA_B + 1.5, BETA_A) / special.beta(BETA_B, BETA_A)
    return float(factor * 0.6 * 0.6**1.5 * moment)


def flip_window(rng: np.random.Generator, factor: float) -> FlipStats:
    """One window of cascade traffic: only the rows whose teacher output was observed count."""
    c = 0.4 + 0.6 * rng.beta(BETA_A, BETA_B, REQUESTS)
    pi = np.where(c < TAU, 1.0, SHADOW_RATE)
    seen = rng.random(REQUESTS) < pi
    c, pi = c[seen], pi[seen]
    flips = rng.random(c.size) < flip_probability(c, factor)
    p = np.stack([c, (1 - c) / 2, (1 - c) / 2], axis=1)
    q = np.where(flips[:, None], [0.1, 0.8, 0.1], [0.8, 0.1, 0.1])
    return FlipStats.from_arrays(p, q, pi, c >= TAU)


def test_flip_rate_detector() -> None:
    rng = np.random.default_rng(100)
    threshold = population_flip_rate(1.0)  # the worst case of "no drift": F exactly at it
    alarms = sum(flip_window(rng, 1.0).result(threshold).state == "alert" for _ in range(WINDOWS))
    assert alarms <= alarm_bound(WINDOWS, 0.025)
    # Shift: every flip probability doubles. Expected n_eff = N / E[1/π] (HT: Σw ≈ N,
    # Σw² ≈ N·E[1/π]); the lower bound then clears the threshold by `margin` SEs.
    below = stats.beta.cdf((TAU - 0.4) / 0.6, BETA_A, BETA_B)
    n_eff = REQUESTS / (below + (1 - below) / SHADOW_RATE)
    shifted = population_flip_rate(2.0)
    margin = (shifted - threshold) / math.sqrt(shifted * (1 - shifted) / n_eff) - Z
    assert stats.norm.sf(margin) < 0.001  # P(miss in one window), by the normal limit
    assert flip_window(rng, 2.0).result(threshold).state == "alert"


# --- accuracy gap: alert when the lower bound of Δ exceeds 0.02 (level 2.5 % at Δ = 0.02)
PAIRED_ROWS, GAP = 5000, 0.02


def gap_window(rng: np.random.Generator, cells: list[float], weighted: bool) -> GapStats:
    """Paired labelled rows drawn from (both right, teacher only, student only, both wrong)."""
    cell = rng.choice(4, size=PAIRED_ROWS, p=cells)
    teacher, student = cell <= 1, (cell == 0) | (cell == 2)
    pi = rng.choice([1.0, 0.1], size=PAIRED_ROWS) if weighted else np.full(PAIRED_ROWS, 0.1)
    return GapStats.from_correct(student, teacher, pi)


def test_accuracy_gap_detector() -> None:
    rng = np.random.default_rng(101)
    null = [0.87, 0.05, 0.03, 0.05]  # teacher 92 %, student 90 %: Δ = 0.02, at the threshold
    for weighted in (False, True):  # Newcombe (equal weights) and Wald on n_eff
        alarms = sum(
            gap_window(rng, null, weighted).result(GAP).state == "alert" for _ in range(WINDOWS)
        )
        assert alarms <= alarm_bound(WINDOWS, 0.025)
    # Shift: the student is 5 points worse than the teacher (92 % vs 87 %).
    shifted = [0.85, 0.07, 0.02, 0.06]
    b, c = shifted[1], shifted[2]
    margin = (b - c - GAP) / math.sqrt((b + c - (b - c) ** 2) / PAIRED_ROWS) - Z
    assert stats.norm.sf(margin) < 1e-6
    assert gap_window(rng, shifted, weighted=False).result(GAP).state == "alert"


# --- entropy drift: JS above its 99th null percentile (level 1 %) and W1 ≥ 0.02
DRIFT_ROWS = 500
REFERENCE = stats.beta(2.0, 5.0)


def test_entropy_drift_detector() -> None:
    rng = np.random.default_rng(102)
    # A reference much larger than a window: the bootstrap treats it as the truth.
    reference = EntropyReference.fit(REFERENCE.rvs(50_000, random_state=rng))
    values = [
        DriftStats.from_arrays(REFERENCE.rvs(DRIFT_ROWS, random_state=rng), reference).result(
            reference
        )
        for _ in range(2000)
    ]
    js_exceedances = sum(v.threshold is not None and v.value > v.threshold for v in values)
    # The JS threshold alone is a 1 % test: not more often, and not vacuously never.
    assert stats.binom.ppf(0.001, 2000, 0.01) <= js_exceedances <= alarm_bound(2000, 0.01)
    alarms = sum(v.state == "alert" for v in values[:WINDOWS])
    assert alarms <= alarm_bound(WINDOWS, 0.01)
    # Shift: H ~ Beta(2.6, 5). Near the null, 8·n·ln2·JS is a χ² statistic on 19 degrees
    # of freedom, noncentral with λ = 8·n·ln2·JS(population) under the shift: P(JS ≤ thr).
    current = stats.beta(2.6, 5.0)
    scale = 8 * DRIFT_ROWS * math.log(2)
    js_population = js_divergence(
        smoothed_shares(reference.counts), np.diff(current.cdf(reference.edges))
    )
    threshold = reference.null_js_quantile(DRIFT_ROWS)
    assert stats.ncx2.cdf(scale * threshold, 19, scale * js_population) < 0.001
    # W1 ≥ |mean difference|, whose sample value is ~normal: P(below the 0.02 floor).
    shift = current.mean() - REFERENCE.mean()
    assert stats.norm.cdf((0.02 - shift) / (current.std() / math.sqrt(DRIFT_ROWS))) < 0.001
    first = DriftStats.from_arrays(current.rvs(DRIFT_ROWS, random_state=rng), reference)
    assert first.result(reference).state == "alert"


# --- ECE: above max(null 95th percentile, 0.03) (level ≤ 5 %), twice in a row to act
ECE_ROWS, CLASSES = 500, 10


def ece_window(rng: np.random.Generator, sharpen: float) -> CalibrationStats:
    """Labels drawn from softmax(z); the student serves softmax(sharpen·z)."""
    logits = (rng.standard_normal((ECE_ROWS, CLASSES)) * 2.0).astype(np.float32)
    truth = softmax(logits).astype(np.float64)
    u = rng.random((ECE_ROWS, 1))
    labels = (u > np.cumsum(truth, axis=1)).sum(axis=1).clip(max=CLASSES - 1)
    return CalibrationStats.from_arrays(softmax(logits * np.float32(sharpen)), labels)


def test_ece_detector() -> None:
    rng = np.random.default_rng(103)
    values = [ece_window(rng, 1.0).result() for _ in range(WINDOWS)]
    assert sum(v.state == "alert" for v in values) <= alarm_bound(WINDOWS, 0.05)
    # The rule needs two consecutive windows: over disjoint pairs the level is ≤ 0.05².
    pairs = [miscalibrated(values[i : i + 2]) for i in range(0, WINDOWS, 2)]
    assert sum(pairs) <= alarm_bound(WINDOWS // 2, 0.05**2)
    # Shift: logits tripled, i.e. temperature 1/3: overconfident. The population ECE is more
    # than twice the threshold a calibrated window of this size gets.
    big = CalibrationStats()
    for _ in range(40):
        big = big.merge(ece_window(rng, 3.0))
    threshold = max(v.threshold for v in values if v.threshold is not None)
    assert big.ece() > 2 * threshold
    history: list[MetricValue] = [ece_window(rng, 3.0).result()]
    assert history[0].state == "alert"
    history.append(ece_window(rng, 3.0).result())
    assert miscalibrated(history)
