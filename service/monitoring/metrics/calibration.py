"""Calibration of the served student probabilities: ECE and its companions (labelled).

Top-label: c = max p, a = 1[argmax p = y]. ECE = (1/N) Σ_b |Σ_{i∈b} (a_i - c_i)| over bins
of c, so per-bin (count, Σa, Σc) are sufficient and merge exactly.

Equal-width bins follow torchmetrics bit for bit (Guo et al. 2017): edges are
`torch.linspace(0, 1, 16)` in float32, a row goes to bucket i with edge[i] <= c < edge[i+1]
(`torch.bucketize(right=True)`), and c = 1.0 gets a bucket of its own, the 16th. So there
are 16 cells: 15 equal-width bins and the "exactly 1.0" cell, which float32 softmax fills
with every very confident row. Merging that cell into bin 14 would not match torchmetrics.

Equal-mass bins come from a 1000-bin equal-width fine histogram of c (count, Σa, Σc), each
fine bin given whole to the equal-mass bin holding its median rank: exact up to the
fine-bin resolution (only rows of fine bins that straddle an equal-mass cut can move).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from service.monitoring.metrics.flip import PROB_FLOOR
from service.monitoring.metrics.values import (
    FloatArray,
    IntArray,
    MetricValue,
    binned_sum,
    finite_rows,
    ratio,
    readonly_floats,
    readonly_ints,
)

ECE_BINS = 15
CELLS = ECE_BINS + 1  # + the c = 1.0 cell
FINE_BINS = 1000
DEFAULT_FLOOR = 0.03
# torch.linspace(0, 1, 16, dtype=torch.float32), bit for bit: torch rounds some edges
# differently from float32(k/15), and a row sitting on an edge must land where it does.
_EDGES = np.array(
    [float.fromhex(x) for x in (
        "0x0.0p+0", "0x1.111112p-4", "0x1.111112p-3", "0x1.99999cp-3", "0x1.111112p-2",
        "0x1.555556p-2", "0x1.99999cp-2", "0x1.dddde0p-2", "0x1.111110p-1", "0x1.333332p-1",
        "0x1.555554p-1", "0x1.777778p-1", "0x1.99999ap-1", "0x1.bbbbbcp-1", "0x1.dddddep-1",
        "0x1.0p+0",
    )],
    dtype=np.float32,
)  # fmt: skip


def confidence_bin(confidence: npt.ArrayLike) -> IntArray:
    """Cell 0..15 of each confidence (compared in float32, as torchmetrics does); 15 is c >= 1."""
    c = finite_rows(confidence, "confidences").astype(np.float32)
    cell = np.searchsorted(_EDGES, c, side="right").astype(np.int64) - 1
    out: IntArray = np.clip(cell, 0, CELLS - 1)
    return out


def confidence_fine_bin(confidence: npt.ArrayLike) -> IntArray:
    """Fine bin 0..999 of each confidence: min(⌊1000·c⌋, 999), so c = 1.0 is in 999."""
    # Round to float32 first: the bin must depend only on the float32 value that is stored.
    c = finite_rows(confidence, "confidences").astype(np.float32).astype(np.float64)
    fine = np.floor(np.clip(c, 0.0, 1.0) * FINE_BINS)
    out: IntArray = np.minimum(fine, FINE_BINS - 1).astype(np.int64)
    return out


@dataclass(frozen=True, eq=False)
class LabelColumns:
    """Per-row values the feedback path computes once the label y arrives."""

    correct: npt.NDArray[np.bool_]  # 1[argmax p = y]
    nll: FloatArray  # -ln max(p[y], 1e-12)
    brier: FloatArray  # Σ_k (p_k - 1[k = y])², in [0, 2] (Brier 1950, multiclass)


def label_columns(probs: npt.ArrayLike, labels: npt.ArrayLike) -> LabelColumns:
    """Correctness, NLL and Brier of each row of p [n, K] against labels y [n]."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise ValueError(f"probs must be [n, K] and labels [n]; got {p.shape} and {y.shape}")
    p_y = np.take_along_axis(p, y[:, None], axis=1)[:, 0]
    return LabelColumns(
        correct=p.argmax(axis=1) == y,
        nll=-np.log(np.maximum(p_y, PROB_FLOOR)),
        # Σ(p - e_y)² = Σp² - 2p_y + 1.
        brier=(p * p).sum(axis=1) - 2.0 * p_y + 1.0,
    )


def expected_calibration_error(
    counts: npt.ArrayLike, sum_correct: npt.ArrayLike, sum_conf: npt.ArrayLike
) -> float:
    """ECE = (1/N) Σ_b |Σa - Σc|  (= Σ_b (n_b/N)|acc_b - conf_b|); NaN when N = 0."""
    n = float(np.sum(counts))
    gaps = np.abs(np.asarray(sum_correct, np.float64) - np.asarray(sum_conf, np.float64))
    return ratio(float(gaps.sum()), n)


def equal_mass_cells(
    fine_counts: IntArray,
    fine_sum_correct: FloatArray,
    fine_sum_conf: FloatArray,
    bins: int = ECE_BINS,
) -> tuple[IntArray, FloatArray, FloatArray]:
    """Merge fine bins into `bins` equal-mass bins: (count, Σa, Σc) per equal-mass bin.

    A fine bin goes whole to the bin of its median rank r (0-based), min(⌊bins·r/N⌋, bins-1),
    the bin that rank would get in an exact equal-mass split of the sorted rows.
    """
    counts = np.asarray(fine_counts, dtype=np.int64)
    n = int(counts.sum())
    median_rank = np.cumsum(counts) - counts + (counts - 1) / 2.0
    target = np.minimum(np.floor(bins * median_rank / max(n, 1)), bins - 1).astype(np.int64)
    target = np.maximum(target, 0)  # empty fine bins (median rank -1/2) hold nothing anyway
    merged_counts: IntArray = np.bincount(target, weights=counts, minlength=bins).astype(np.int64)
    return (
        merged_counts,
        binned_sum(target, fine_sum_correct, bins),
        binned_sum(target, fine_sum_conf, bins),
    )


def debiased_rms_calibration_error(
    counts: npt.ArrayLike, sum_correct: npt.ArrayLike, sum_conf: npt.ArrayLike
) -> float:
    """Debiased RMS calibration error (Kumar et al. 2019; Roelofs et al. 2022).

    CE² = Σ_b (n_b/N)·[(acc_b - conf_b)² - acc_b(1 - acc_b)/(n_b - 1)], RMS = √max(CE², 0).
    The plug-in (acc_b - conf_b)² overestimates the squared bias by Var(acc_b); since a ∈
    {0, 1}, acc_b(1 - acc_b)/(n_b - 1) is its unbiased estimate. Bins with n_b < 2 keep only
    their plug-in term (as torchmetrics, whose debias=True path this matches).
    """
    n_b = np.asarray(counts, dtype=np.float64)
    total = float(n_b.sum())
    if total == 0:
        return math.nan
    filled = n_b > 0
    acc = np.divide(sum_correct, n_b, out=np.zeros_like(n_b), where=filled)
    conf = np.divide(sum_conf, n_b, out=np.zeros_like(n_b), where=filled)
    correction = np.divide(acc * (1.0 - acc), n_b - 1.0, out=np.zeros_like(n_b), where=n_b > 1)
    squared = float((n_b / total * ((acc - conf) ** 2 - correction)).sum())
    return math.sqrt(max(squared, 0.0))


def _ece_draws(
    counts: IntArray, share: FloatArray, sum_conf: FloatArray, draws: int, seed: int
) -> FloatArray:
    """ECE of `draws` windows whose per-cell Σa is Binomial(n_b, share_b); Σc held fixed."""
    rng = np.random.default_rng(seed)
    sum_a = rng.binomial(counts, np.clip(share, 0.0, 1.0), size=(draws, counts.size))
    out: FloatArray = np.abs(sum_a - sum_conf).sum(axis=1) / counts.sum()
    return out


def ece_null_quantile(
    counts: npt.ArrayLike,
    sum_conf: npt.ArrayLike,
    quantile: float = 0.95,
    n_sim: int = 1000,
    seed: int = 0,
) -> float:
    """The `quantile` of ECE at these bin counts when labels are Bernoulli(c): calibrated.

    Simulated per cell as Σa ~ Binomial(n_b, mean c in the bin). The exact null is a
    Poisson-binomial with the same mean and a variance no larger, so this quantile is, if
    anything, conservative (a slightly higher threshold).
    """
    n_b = np.asarray(counts, dtype=np.int64)
    conf = np.asarray(sum_conf, dtype=np.float64)
    share = np.divide(conf, n_b, out=np.zeros_like(conf), where=n_b > 0)
    return float(np.quantile(_ece_draws(n_b, share, conf, n_sim, seed), quantile))


def ece_bootstrap_interval(
    counts: npt.ArrayLike,
    sum_correct: npt.ArrayLike,
    sum_conf: npt.ArrayLike,
    alpha: float = 0.05,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of a parametric bootstrap of ECE from the per-bin statistics.

    Per cell Σa* ~ Binomial(n_b, Σa/n_b) with n_b and Σc held fixed: label noise only,
    conditional on the confidences. ECE is biased upwards at small n_b and so is this
    interval; compare ECE with the null quantile, not the interval with 0.
    """
    n_b = np.asarray(counts, dtype=np.int64)
    acc = np.divide(sum_correct, n_b, out=np.zeros(n_b.size), where=n_b > 0)
    draws = _ece_draws(n_b, acc, np.asarray(sum_conf, dtype=np.float64), n_boot, seed)
    low, high = np.quantile(draws, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


@dataclass(frozen=True, eq=False)
class CalibrationStats:
    """Sufficient statistics of calibration over served, labelled rows.

    SQL: COUNT(*), SUM(correct), SUM(confidence) GROUP BY conf_bin (16 cells) and the same
    GROUP BY conf_fine (1000 bins); SUM(nll) and SUM(brier) over all rows.
    """

    counts: IntArray = field(default_factory=lambda: np.zeros(CELLS, dtype=np.int64))
    sum_correct: FloatArray = field(default_factory=lambda: np.zeros(CELLS))  # Σa per cell
    sum_conf: FloatArray = field(default_factory=lambda: np.zeros(CELLS))  # Σc per cell
    fine_counts: IntArray = field(default_factory=lambda: np.zeros(FINE_BINS, dtype=np.int64))
    fine_sum_correct: FloatArray = field(default_factory=lambda: np.zeros(FINE_BINS))
    fine_sum_conf: FloatArray = field(default_factory=lambda: np.zeros(FINE_BINS))
    sum_nll: float = 0.0  # Σ -ln p[y]
    sum_brier: float = 0.0  # Σ Σ_k (p_k - 1[k = y])²

    def __post_init__(self) -> None:
        for name, length, freeze in (
            ("counts", CELLS, readonly_ints),
            ("sum_correct", CELLS, readonly_floats),
            ("sum_conf", CELLS, readonly_floats),
            ("fine_counts", FINE_BINS, readonly_ints),
            ("fine_sum_correct", FINE_BINS, readonly_floats),
            ("fine_sum_conf", FINE_BINS, readonly_floats),
        ):
            object.__setattr__(self, name, freeze(getattr(self, name), length))
        if int(self.counts.sum()) != int(self.fine_counts.sum()):
            raise ValueError("the cells and the fine bins must count the same rows")

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    @classmethod
    def from_arrays(cls, probs: npt.ArrayLike, labels: npt.ArrayLike) -> CalibrationStats:
        """Batch path over raw rows: served student probabilities p [n, K] and labels y [n]."""
        p = np.asarray(probs)
        cols = label_columns(p, labels)
        return cls.from_columns(p.max(axis=1), cols.correct, cols.nll, cols.brier)

    @classmethod
    def from_columns(
        cls,
        confidence: npt.ArrayLike,
        correct: npt.ArrayLike,
        nll: npt.ArrayLike,
        brier: npt.ArrayLike,
    ) -> CalibrationStats:
        """From stored per-row columns: c (insert time), a, nll, brier (feedback time)."""
        c = finite_rows(confidence, "confidences").astype(np.float32).ravel()
        a = np.asarray(correct, dtype=np.float64).ravel()
        cell, fine = confidence_bin(c), confidence_fine_bin(c)
        c64 = c.astype(np.float64)  # Σc of the float32 values themselves, summed in float64
        return cls(
            counts=np.bincount(cell, minlength=CELLS),
            sum_correct=binned_sum(cell, a, CELLS),
            sum_conf=binned_sum(cell, c64, CELLS),
            fine_counts=np.bincount(fine, minlength=FINE_BINS),
            fine_sum_correct=binned_sum(fine, a, FINE_BINS),
            fine_sum_conf=binned_sum(fine, c64, FINE_BINS),
            sum_nll=float(np.sum(nll)),
            sum_brier=float(np.sum(brier)),
        )

    def merge(self, other: CalibrationStats) -> CalibrationStats:
        """Statistics of the union of both windows: every field is a sum."""
        return CalibrationStats(
            counts=self.counts + other.counts,
            sum_correct=self.sum_correct + other.sum_correct,
            sum_conf=self.sum_conf + other.sum_conf,
            fine_counts=self.fine_counts + other.fine_counts,
            fine_sum_correct=self.fine_sum_correct + other.fine_sum_correct,
            fine_sum_conf=self.fine_sum_conf + other.fine_sum_conf,
            sum_nll=self.sum_nll + other.sum_nll,
            sum_brier=self.sum_brier + other.sum_brier,
        )

    def ece(self) -> float:
        """15 equal-width bins (+ the c = 1.0 cell): torchmetrics' calibration_error, l1."""
        return expected_calibration_error(self.counts, self.sum_correct, self.sum_conf)

    def ece_equal_mass(self, bins: int = ECE_BINS) -> float:
        """`bins` equal-mass bins, exact up to the fine-bin resolution."""
        return expected_calibration_error(
            *equal_mass_cells(self.fine_counts, self.fine_sum_correct, self.fine_sum_conf, bins)
        )

    def result(
        self,
        floor: float = DEFAULT_FLOOR,
        alpha: float = 0.05,
        n_sim: int = 1000,
        seed: int = 0,
        min_n: int = 1,
    ) -> MetricValue:
        """ECE with a bootstrap interval; "alert" (a miscalibrated candidate) when
        ECE > max(null 95th percentile at this n, floor). Two such matured windows in a row
        make it miscalibrated: see `miscalibrated`.
        """
        n = self.n
        if n < max(min_n, 1):
            return MetricValue.insufficient("ece", n=n, n_eff=float(n), value=self.ece())
        ece = self.ece()
        null_95 = ece_null_quantile(self.counts, self.sum_conf, 0.95, n_sim, seed)
        low, high = ece_bootstrap_interval(
            self.counts, self.sum_correct, self.sum_conf, alpha, n_sim, seed
        )
        threshold = max(null_95, floor)
        return MetricValue(
            name="ece",
            value=ece,
            ci_low=low,
            ci_high=high,
            n=n,
            n_eff=float(n),
            threshold=threshold,
            state="alert" if ece > threshold else "ok",
            details={
                "ece_equal_mass": self.ece_equal_mass(),
                "rms_debiased": debiased_rms_calibration_error(
                    self.counts, self.sum_correct, self.sum_conf
                ),
                "rms_debiased_equal_mass": debiased_rms_calibration_error(
                    *equal_mass_cells(self.fine_counts, self.fine_sum_correct, self.fine_sum_conf)
                ),
                "nll": self.sum_nll / n,
                "brier": self.sum_brier / n,
                "null_95": null_95,
                "floor": floor,
                "accuracy": float(self.sum_correct.sum()) / n,
                "mean_confidence": float(self.sum_conf.sum()) / n,
            },
        )


def miscalibrated(history: Sequence[MetricValue], consecutive: int = 2) -> bool:
    """True when the last `consecutive` values (matured windows, oldest first) all alert."""
    recent = history[-consecutive:]
    return len(recent) == consecutive and all(v.state == "alert" for v in recent)
