"""The re-distillation recipe's data side, in numpy: teacher targets, the time split and
the optional knobs (temperature annealing, confidence-weighted hard/soft balancing,
teacher-version averaging, class balancing). All off by default; the default recipe is
KL at T = 2 scaled by T², soft targets alone on unlabelled rows and alpha = 0.5 on labelled.

Teacher "logits" here are log-probabilities: log q = z/T_t - logsumexp(z/T_t) differs from
the teacher's scaled logits by a per-row constant, and the KD loss is invariant to that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.training.temperature import log_softmax

FloatArray = npt.NDArray[np.float64]
PROB_FLOOR = 2.0**-24
"""float16's smallest step: a stored probability of 0 was anything below it."""


def logits_from_probs(probs: npt.ArrayLike) -> FloatArray:
    """log q with q floored at `PROB_FLOOR` (stored float16 probabilities round to 0)."""
    q = np.asarray(probs, dtype=np.float64)
    if q.ndim != 2 or not np.isfinite(q).all() or (q < 0).any():
        raise ValueError("probabilities must be a finite, non-negative [n, K] matrix")
    out: FloatArray = np.log(np.maximum(q, PROB_FLOOR))
    return out


def logits_from_teacher(logits: npt.ArrayLike, temperature: float) -> FloatArray:
    """log softmax(z / T_t): what the teacher served at its temperature, as log q."""
    return log_softmax(np.asarray(logits), temperature)


def average_teacher_logits(per_version: Sequence[npt.ArrayLike]) -> FloatArray:
    """log of the mean of several teachers' probabilities (an ensemble teacher).

    Each entry is one version's log q for the same rows, in the same order.
    """
    if not per_version:
        raise ValueError("no teacher outputs to average")
    stacked = np.stack([np.asarray(z, dtype=np.float64) for z in per_version])
    peak = stacked.max(axis=(0, 2), keepdims=True)  # logsumexp over versions, stably
    mean = np.exp(stacked - peak).mean(axis=0)
    out: FloatArray = np.log(mean) + peak[0]
    return out


def annealed_temperatures(start: float, final: float | None, epochs: int) -> list[float]:
    """One KD temperature per epoch: `start` throughout, or geometric from start to final."""
    if epochs < 1 or not start > 0 or (final is not None and not final > 0):
        raise ValueError("need epochs ≥ 1 and positive temperatures")
    if final is None or epochs == 1:
        return [float(start)] * epochs
    ratio = math.log(final / start) / (epochs - 1)
    return [float(start * math.exp(ratio * e)) for e in range(epochs)]


def confidence_alphas(
    teacher_logits: npt.ArrayLike, labels: npt.ArrayLike, alpha: float
) -> FloatArray:
    """Per-row hard-label weight alpha_i = 1 - (1 - alpha)·q_i[y_i] (alpha on unlabelled rows).

    Where the teacher already puts its mass on the true label the mix stays at alpha; where
    it is wrong (q[y] near 0) the row leans on the label alone, so the student is not
    taught the teacher's mistakes on the rows where we know better.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    q = np.exp(log_softmax(np.asarray(teacher_logits)))
    y = np.asarray(labels, dtype=np.int64)
    out = np.full(len(y), float(alpha))
    labelled = y >= 0
    out[labelled] = 1.0 - (1.0 - alpha) * q[np.flatnonzero(labelled), y[labelled]]
    return out


def class_balance_weights(teacher_logits: npt.ArrayLike, labels: npt.ArrayLike) -> FloatArray:
    """Row weights ∝ 1 / (rows of the row's class), mean 1: each class weighs the same.

    A row's class is its label where known, else the teacher's top class.
    """
    z = np.asarray(teacher_logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    classes = np.where(y >= 0, y, z.argmax(axis=1))
    counts = np.bincount(classes, minlength=z.shape[1]).astype(np.float64)
    present = int((counts > 0).sum())
    out: FloatArray = len(y) / (present * counts[classes])
    return out


@dataclass(frozen=True)
class TimeSplit:
    """Row ranges of a time-ordered set: train (oldest), calibration, gate (newest)."""

    train: slice
    calibration: slice
    gate: slice

    def sizes(self) -> dict[str, int]:
        return {
            name: part.stop - part.start
            for name, part in (
                ("train", self.train),
                ("calibration", self.calibration),
                ("gate", self.gate),
            )
        }


def time_split(n: int, *, gate_fraction: float, calibration_fraction: float) -> TimeSplit:
    """The newest `gate_fraction` of n rows for the gate, the `calibration_fraction`
    before it for the temperature fit, the rest for training (each at least one row)."""
    if not (0 < gate_fraction < 1 and 0 < calibration_fraction < 1):
        raise ValueError("fractions must lie in (0, 1)")
    if gate_fraction + calibration_fraction >= 1:
        raise ValueError("the gate and calibration slices must leave rows to train on")
    gate = max(1, round(gate_fraction * n))
    calibration = max(1, round(calibration_fraction * n))
    train = n - gate - calibration
    if train < 1:
        raise ValueError(f"{n} rows are too few to split")
    return TimeSplit(
        train=slice(0, train),
        calibration=slice(train, train + calibration),
        gate=slice(train + calibration, n),
    )
