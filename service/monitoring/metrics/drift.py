"""Entropy drift: has the distribution of the student's normalised entropy H moved?

H ∈ [0, 1] is computed at the frozen reference temperature (METRICS.md). A reference window
is frozen into `EntropyReference`: 20 bins with edges at its quantiles, their shares, and a
fine 1000-bin histogram. A current window is `DriftStats`: counts in the same bins.

Statistic: Jensen-Shannon divergence (base 2) between the add-1/2 smoothed shares, plus the
Wasserstein-1 distance on H from the fine histograms. The JS threshold is the 99th
percentile of JS between the reference and multinomial resamples of it at the current
window's n, so it shrinks as windows grow; an alert also needs W1 >= 0.02, so that a
detectable but tiny shift in a huge window does not page anyone. (A fixed PSI rule would
not do: under no drift PSI ~ (B - 1)(1/n + 1/m), so small windows alarm constantly.)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from service.monitoring.metrics.values import (
    FloatArray,
    IntArray,
    MetricValue,
    finite_rows,
    readonly_floats,
    readonly_ints,
)

ENTROPY_BINS = 20
FINE_BINS = 1000
SMOOTHING = 0.5  # add-1/2 (Jeffreys) to every bin count: JS stays finite on empty bins


def fine_index(h: npt.ArrayLike) -> IntArray:
    """Fine bin of each H: min(⌊1000·H⌋, 999) after clipping to [0, 1], so H = 1 is in 999."""
    x = np.clip(finite_rows(h, "entropies"), 0.0, 1.0)
    out: IntArray = np.minimum(np.floor(x * FINE_BINS), FINE_BINS - 1).astype(np.int64)
    return out


def smoothed_shares(counts: npt.ArrayLike) -> FloatArray:
    """(count + 1/2) / (n + B/2) per bin: add-1/2 smoothed shares, each > 0."""
    c = np.asarray(counts, dtype=np.float64)
    out: FloatArray = (c + SMOOTHING) / (c.sum(axis=-1, keepdims=True) + SMOOTHING * c.shape[-1])
    return out


def js_divergence(p: npt.ArrayLike, q: npt.ArrayLike) -> float:
    """Jensen-Shannon divergence in bits: ½KL(P‖M) + ½KL(Q‖M), M = (P + Q)/2, in [0, 1].

    P and Q are strictly positive shares over the same bins (smooth counts first).
    """
    return float(_js_rows(np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)))


def _js_rows(p: FloatArray, q: FloatArray) -> FloatArray:
    # Row-wise over the last axis, so one call scores every bootstrap draw.
    m = 0.5 * (p + q)
    kl_pm = (p * np.log2(p / m)).sum(axis=-1)
    kl_qm = (q * np.log2(q / m)).sum(axis=-1)
    out: FloatArray = 0.5 * (kl_pm + kl_qm)
    return out


def wasserstein_fine(counts_a: npt.ArrayLike, counts_b: npt.ArrayLike) -> float:
    """W1 between two fine histograms on [0, 1], mass at bin centres: Σ|F_a - F_b|·width.

    Each point moves at most half a bin (0.0005) to its centre, so this is within
    1/1000 of W1 on the raw values (triangle inequality, once per side).
    """
    a = np.asarray(counts_a, dtype=np.float64)
    b = np.asarray(counts_b, dtype=np.float64)
    if a.sum() <= 0 or b.sum() <= 0:
        return math.nan
    gap = np.cumsum(a / a.sum()) - np.cumsum(b / b.sum())
    return float(np.abs(gap[:-1]).sum() / a.size)


@dataclass(frozen=True, eq=False)
class EntropyReference:
    """A frozen reference window of H: bin edges, shares and a fine histogram.

    `edges` has bins + 1 values: the reference quantiles, with the outer two pinned to 0
    and 1 so every H ∈ [0, 1] lands in a bin. Ties in H can repeat an edge; such a bin is
    empty in the reference and the current window alike, and smoothing handles it. Bin i
    is (edges[i], edges[i+1]] (bin 0 also takes H = 0): the Prometheus `le` convention, so
    the edges double as histogram buckets.
    """

    edges: FloatArray
    shares: FloatArray  # reference share per bin (computed with bin_index, not assumed 1/B)
    n: int
    fine_counts: IntArray  # reference H over FINE_BINS equal-width bins (W1, inspection)

    def __post_init__(self) -> None:
        bins = np.asarray(self.shares).size
        object.__setattr__(self, "edges", readonly_floats(self.edges, bins + 1))
        object.__setattr__(self, "shares", readonly_floats(self.shares, bins))
        object.__setattr__(self, "fine_counts", readonly_ints(self.fine_counts, FINE_BINS))
        if self.n <= 0 or np.any(np.diff(self.edges) < 0):
            raise ValueError("a reference needs rows and non-decreasing edges")

    @classmethod
    def fit(cls, h: npt.ArrayLike, bins: int = ENTROPY_BINS) -> EntropyReference:
        """Freeze a reference from the normalised entropies of a reference window."""
        x = np.clip(finite_rows(h, "entropies").ravel(), 0.0, 1.0)
        if x.size == 0:
            raise ValueError("cannot fit a reference on no rows")
        edges = np.quantile(x, np.linspace(0.0, 1.0, bins + 1))
        edges[0], edges[-1] = 0.0, 1.0
        counts = np.bincount(_bin_index(edges, x), minlength=bins)
        fine = np.bincount(fine_index(x), minlength=FINE_BINS)
        return cls(edges=edges, shares=counts / x.size, n=int(x.size), fine_counts=fine)

    @property
    def bins(self) -> int:
        return int(self.shares.size)

    @property
    def counts(self) -> FloatArray:
        """Reference count per bin (shares·n, integral up to rounding)."""
        out: FloatArray = np.rint(self.shares * self.n)
        return out

    def bin_index(self, h: npt.ArrayLike) -> IntArray:
        """Bin of each H (0..bins-1): what the writer stores per row at insert time."""
        return _bin_index(self.edges, finite_rows(h, "entropies"))

    @staticmethod
    def fine_index(h: npt.ArrayLike) -> IntArray:
        """Fine bin of each H (0..999), also stored per row at insert time."""
        return fine_index(h)

    def null_js_quantile(
        self, n: int, quantile: float = 0.99, n_boot: int = 2000, seed: int = 0
    ) -> float:
        """The `quantile` of reference-vs-reference JS for a window of n rows (bootstrap).

        Windows of n rows are drawn as Multinomial(n, reference shares) and compared with the
        reference. This treats the reference as the truth, i.e. ignores its own sampling
        noise: fine while the reference is much larger than a window (JS under no drift
        scales as 1/n + 1/m). n is rounded *down* to a grid of 16 steps per doubling, so the
        cached threshold is at most 2^(1/16) - 1 ≈ 4.4 % conservative, and cheap to repeat.
        """
        key = tuple(float(c) for c in self.counts)
        return _null_js_quantile(key, _grid(n), quantile, n_boot, seed)


def _bin_index(edges: FloatArray, h: npt.NDArray[np.float64]) -> IntArray:
    # side="left" on the inner edges: H equal to an edge goes to the bin it closes (`le`).
    inner = edges[1:-1]
    out: IntArray = np.searchsorted(inner, np.clip(h, 0.0, 1.0), side="left").astype(np.int64)
    return out


def _grid(n: int) -> int:
    """n rounded down to 2^(k/16); exact below 64, where the grid would be coarser than 1."""
    if n <= 64:
        return max(n, 1)
    return int(2.0 ** (math.floor(16.0 * math.log2(n)) / 16.0))


@functools.lru_cache(maxsize=512)
def _null_js_quantile(
    reference_counts: tuple[float, ...], n: int, quantile: float, n_boot: int, seed: int
) -> float:
    counts = np.asarray(reference_counts)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, counts / counts.sum(), size=n_boot)
    js = _js_rows(smoothed_shares(counts)[None, :], smoothed_shares(draws))
    return float(np.quantile(js, quantile))


@dataclass(frozen=True, eq=False)
class DriftStats:
    """Sufficient statistics of one window's H, in a reference's bins.

    SQL: COUNT(*) GROUP BY entropy_bin and COUNT(*) GROUP BY entropy_fine.
    """

    counts: IntArray = field(default_factory=lambda: np.zeros(ENTROPY_BINS, dtype=np.int64))
    fine_counts: IntArray = field(default_factory=lambda: np.zeros(FINE_BINS, dtype=np.int64))
    n: int = 0

    def __post_init__(self) -> None:
        counts = readonly_ints(self.counts, np.asarray(self.counts).size)
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "fine_counts", readonly_ints(self.fine_counts, FINE_BINS))
        if int(counts.sum()) != self.n or int(self.fine_counts.sum()) != self.n:
            raise ValueError("bin counts must add up to n")

    @classmethod
    def from_arrays(cls, h: npt.ArrayLike, reference: EntropyReference) -> DriftStats:
        """Batch path over raw normalised entropies [n] of the current window."""
        x = finite_rows(h, "entropies").ravel()
        return cls(
            counts=np.bincount(reference.bin_index(x), minlength=reference.bins),
            fine_counts=np.bincount(fine_index(x), minlength=FINE_BINS),
            n=int(x.size),
        )

    def merge(self, other: DriftStats) -> DriftStats:
        """Statistics of the union of both windows (same reference bins)."""
        if self.counts.shape != other.counts.shape:
            raise ValueError("windows binned on different references cannot be merged")
        return DriftStats(
            counts=self.counts + other.counts,
            fine_counts=self.fine_counts + other.fine_counts,
            n=self.n + other.n,
        )

    def result(
        self,
        reference: EntropyReference,
        min_n: int = 100,
        quantile: float = 0.99,
        w1_floor: float = 0.02,
        n_boot: int = 2000,
        seed: int = 0,
    ) -> MetricValue:
        """JS against the reference; "alert" when JS > the n-dependent null quantile and W1 ≥ floor.

        No interval (ci_low/ci_high are NaN): the null quantile in `threshold` carries the
        sampling noise. Below `min_n` rows the window is "insufficient".
        """
        if self.counts.size != reference.bins:
            raise ValueError("these counts are not in the reference's bins")
        if self.n == 0:
            return MetricValue.insufficient("entropy_drift")
        js = js_divergence(smoothed_shares(reference.counts), smoothed_shares(self.counts))
        w1 = wasserstein_fine(reference.fine_counts, self.fine_counts)
        details: dict[str, float | list[float]] = {
            "wasserstein1": w1,
            "w1_floor": w1_floor,
            "shares": [float(c) / self.n for c in self.counts],
        }
        if self.n < min_n:
            return MetricValue.insufficient(
                "entropy_drift", n=self.n, n_eff=float(self.n), value=js, details=details
            )
        threshold = reference.null_js_quantile(self.n, quantile, n_boot, seed)
        return MetricValue(
            name="entropy_drift",
            value=js,
            ci_low=math.nan,
            ci_high=math.nan,
            n=self.n,
            n_eff=float(self.n),
            threshold=threshold,
            state="alert" if js > threshold and w1 >= w1_floor else "ok",
            details=details,
        )
