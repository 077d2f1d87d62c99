"""Temperature scaling (Guo et al., 2017) in pure numpy, so it runs without torch.

Fits one scalar T so that softmax(z / T) is calibrated: either by minimising the
negative log-likelihood of observed labels, or (with no labels) the cross-entropy to
target probabilities such as the teacher's on shadow traffic. Both objectives are convex
in 1/T, hence unimodal in log T, so a golden-section search on log T finds the optimum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

DEFAULT_BOUNDS = (0.05, 20.0)
_INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0  # 1/φ ≈ 0.618


def log_softmax(logits: npt.NDArray[Any], temperature: float = 1.0) -> npt.NDArray[np.float64]:
    """Row-wise log softmax(z / T) in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)  # shift by the row max: exp never overflows
    result: npt.NDArray[np.float64] = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return result


def nll(logits: npt.NDArray[Any], labels: npt.NDArray[Any], temperature: float) -> float:
    """Mean negative log-likelihood of integer `labels` under softmax(logits / T)."""
    z, y = _check_logits(logits), _check_labels(labels, logits)
    return float(-log_softmax(z, temperature)[np.arange(len(y)), y].mean())


def soft_cross_entropy(
    logits: npt.NDArray[Any], target_probs: npt.NDArray[Any], temperature: float
) -> float:
    """Mean cross-entropy H(target, softmax(logits / T)) over rows."""
    z, q = _check_logits(logits), _check_probs(target_probs, logits)
    return float(-(q * log_softmax(z, temperature)).sum(axis=1).mean())


def fit_temperature(
    logits: npt.NDArray[Any],
    labels: npt.NDArray[Any] | None = None,
    *,
    target_probs: npt.NDArray[Any] | None = None,
    bounds: tuple[float, float] = DEFAULT_BOUNDS,
    tol: float = 1e-6,
) -> float:
    """The T in `bounds` minimising NLL on `labels`, or cross-entropy to `target_probs`.

    Give exactly one of `labels` and `target_probs`. `tol` is the search tolerance on
    log T (so a relative tolerance on T).
    """
    if labels is not None and target_probs is not None:
        raise ValueError("give labels or target_probs, not both")
    low, high = bounds
    if not 0.0 < low < high or not math.isfinite(high):
        raise ValueError(f"bounds must satisfy 0 < low < high < inf, got {bounds}")
    z = _check_logits(logits)
    if labels is not None:
        objective = _nll_objective(z, _check_labels(labels, z))
    elif target_probs is not None:
        objective = _soft_objective(z, _check_probs(target_probs, z))
    else:
        raise ValueError("give labels or target_probs")
    log_t = golden_section(objective, math.log(low), math.log(high), tol=tol)
    return float(min(max(math.exp(log_t), low), high))  # exp/log round-off stays in bounds


def golden_section(f: Callable[[float], float], low: float, high: float, *, tol: float) -> float:
    """Minimiser of a unimodal `f` on [low, high], to within `tol`."""
    if not low < high or tol <= 0:
        raise ValueError("need low < high and tol > 0")
    a, b = low, high
    c, d = b - _INV_PHI * (b - a), a + _INV_PHI * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        # Each step keeps the bracket that holds the smaller value and reuses one point,
        # so it costs one evaluation and shrinks the bracket by 1/φ.
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _INV_PHI * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _INV_PHI * (b - a)
            fd = f(d)
    return (a + b) / 2.0


def _nll_objective(
    z: npt.NDArray[np.float64], y: npt.NDArray[np.int64]
) -> Callable[[float], float]:
    rows = np.arange(len(y))

    def objective(log_t: float) -> float:
        return float(-log_softmax(z, math.exp(log_t))[rows, y].mean())

    return objective


def _soft_objective(
    z: npt.NDArray[np.float64], q: npt.NDArray[np.float64]
) -> Callable[[float], float]:
    def objective(log_t: float) -> float:
        return float(-(q * log_softmax(z, math.exp(log_t))).sum(axis=1).mean())

    return objective


def _check_logits(logits: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] < 2:
        raise ValueError(f"logits must be a non-empty [n, K ≥ 2] matrix, got shape {z.shape}")
    if not np.isfinite(z).all():
        raise ValueError("logits must be finite")
    return z


def _check_labels(labels: npt.NDArray[Any], logits: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    y = np.asarray(labels)
    n, k = np.shape(logits)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be {n} integers, got shape {y.shape} dtype {y.dtype}")
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"labels must lie in [0, {k})")
    return y.astype(np.int64)


def _check_probs(probs: npt.NDArray[Any], logits: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    q = np.asarray(probs, dtype=np.float64)
    if q.shape != np.shape(logits):
        raise ValueError(f"target_probs must have the logits' shape {np.shape(logits)}")
    if not np.isfinite(q).all() or (q < 0).any():
        raise ValueError("target_probs must be finite and non-negative")
    sums = q.sum(axis=1, keepdims=True)
    if not np.allclose(sums, 1.0, atol=1e-3):
        raise ValueError("each row of target_probs must sum to 1")
    # Renormalise away float32 round-off so the objective is an exact cross-entropy.
    normalised: npt.NDArray[np.float64] = q / sums
    return normalised
