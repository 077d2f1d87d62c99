"""What every statistic returns: one frozen value with its interval, threshold and state.

Also the small array conventions the stats classes share: sufficient statistics are plain
float64 / int64 numpy arrays, made read-only so a frozen stats object stays frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
State = Literal["ok", "alert", "insufficient"]
Details = dict[str, float | list[float]]


@dataclass(frozen=True)
class MetricValue:
    """One statistic on one window.

    `value` is NaN when the statistic is undefined (no rows); the state is then
    "insufficient". `ci_low`/`ci_high` are NaN for statistics that carry no interval
    (their uncertainty lives in `threshold`, e.g. the bootstrap threshold of entropy drift).
    `n` counts rows; `n_eff` is the Kish effective sample size (Σw)²/Σw² (= n unweighted).
    """

    name: str
    value: float
    ci_low: float
    ci_high: float
    n: int
    n_eff: float
    threshold: float | None
    state: State
    details: Details = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n == 0 and (self.state != "insufficient" or not math.isnan(self.value)):
            raise ValueError(f"{self.name}: an empty window must be NaN and 'insufficient'")

    @classmethod
    def insufficient(
        cls,
        name: str,
        *,
        n: int = 0,
        n_eff: float = 0.0,
        threshold: float | None = None,
        value: float = math.nan,
        details: Details | None = None,
    ) -> MetricValue:
        """A window with too few rows to judge; `value` stays NaN when n == 0."""
        return cls(
            name=name,
            value=value if n > 0 else math.nan,
            ci_low=math.nan,
            ci_high=math.nan,
            n=n,
            n_eff=n_eff,
            threshold=threshold,
            state="insufficient",
            details={} if details is None else details,
        )


def readonly_floats(values: npt.ArrayLike, length: int) -> FloatArray:
    """A read-only float64 copy of `values`, checked to be 1-D of `length` (else ValueError)."""
    arr: FloatArray = np.array(values, dtype=np.float64)
    _freeze(arr, length)
    return arr


def readonly_ints(values: npt.ArrayLike, length: int) -> IntArray:
    """A read-only int64 copy of `values`, checked to be 1-D of `length` (else ValueError)."""
    arr: IntArray = np.array(values, dtype=np.int64)
    _freeze(arr, length)
    return arr


def _freeze(arr: npt.NDArray[np.generic], length: int) -> None:
    if arr.shape != (length,):
        raise ValueError(f"expected shape ({length},), got {arr.shape}")
    # Frozen stats objects hold these: a writeable array would let a caller mutate one.
    arr.flags.writeable = False


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when the denominator is 0 (an undefined share)."""
    return numerator / denominator if denominator > 0 else math.nan


def binned_sum(index: IntArray, weights: npt.ArrayLike, length: int) -> FloatArray:
    """Σ weights per bin: the batch twin of SQL's SUM(x) GROUP BY bin, as float64 [length]."""
    out: FloatArray = np.bincount(index, weights=weights, minlength=length).astype(np.float64)
    if out.shape != (length,):
        raise ValueError(f"bin index outside 0..{length - 1}")
    return out


def finite_rows(values: npt.ArrayLike, what: str) -> FloatArray:
    """`values` as float64, refusing NaN/inf: a missing output must be filtered, not binned."""
    arr: FloatArray = np.asarray(values, dtype=np.float64)
    if not bool(np.isfinite(arr).all()):
        raise ValueError(f"{what} must be finite (pass only rows where it was observed)")
    return arr
