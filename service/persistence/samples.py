"""Row-level samples for the loop's jobs: labelled predictions and teacher-observed pairs.

Unlike `aggregates` (sums only), recalibration and threshold retuning need per-row values,
so these readers return arrays. Every filter (model, student version, time range, label
arrival, teacher observed, matured windows) is in the SQL; only the columns a job uses
are selected.

Logits are recovered from the stored probabilities: p was computed as softmax(z / T) and
stored as float16, so z = T·ln p up to a per-row constant, which softmax ignores. The
approximation: float16 keeps 11 significant bits, so each ln p is off by at most 2^-11
(≈ 5e-4) for p ≥ 6.1e-5, worse for smaller p, and p below 2^-24 is stored as 0 and
floored at 2^-24, which raises those logits to T·ln 2^-24 ≈ -16.6·T. The top class is
exact: its probability is the float32 `confidence` column, put back in place of the float16
value. At a new T' ≥ T each floored class gains at most (2^-24)^(T/T') of probability.
Recomputing logits from logged inputs would be exact but only covers the input-logged
sample and needs the model in the job; the stored probabilities cover every row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, Integer, and_, cast, func, select
from sqlalchemy.sql.elements import ColumnElement

from service.monitoring.probabilities import softmax
from service.persistence.tables import Feedback, Prediction, ServingState

P, F = Prediction, Feedback
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
TINY = 2.0**-24  # the smallest positive float16
# Other classes are kept strictly below the top one: float16 rounding (relative 2^-11)
# must not make a near-tie outrank the class the student actually answered.
_BELOW_TOP = 1.0 - 2.0**-10
_SAME_T = 1e-9  # relative difference under which two temperatures are the same


@dataclass(frozen=True)
class Scope:
    """Rows of one deployment (and student version, unless None) created in [start, end).

    Labels count only if received before `end` too, so a job re-run at the same `end`
    reads the same rows. `default_temperature` stands in for rows that predate the
    `student_temperature` column (NULL): the version manifest's temperature.
    """

    model: str
    version: str | None
    start: float
    end: float
    default_temperature: float = 1.0

    def where(self) -> list[ColumnElement[bool]]:
        conditions = [P.model == self.model, P.created_at >= self.start, P.created_at < self.end]
        if self.version is not None:
            conditions.append(P.student_version == self.version)
        return conditions

    def row_temperature(self) -> ColumnElement[float]:
        return func.coalesce(P.student_temperature, self.default_temperature)

    def label_join(self) -> ColumnElement[bool]:
        return and_(F.request_id == P.request_id, F.received_at < self.end)


def decode_matrix(blobs: Sequence[bytes]) -> FloatArray:
    """Float16 little-endian probability rows → an [n, K] float64 matrix."""
    if not blobs:
        return np.zeros((0, 0))
    k = len(blobs[0]) // 2
    if any(len(b) != 2 * k for b in blobs):
        raise ValueError("probability rows of different lengths in one sample")
    out: FloatArray = (
        np.frombuffer(b"".join(bytes(b) for b in blobs), dtype="<f2").astype(np.float64)
    ).reshape(len(blobs), k)
    return out


def recover_logits(
    probs: FloatArray, temperature: FloatArray, confidence: FloatArray, label: IntArray
) -> FloatArray:
    """z = T·ln max(p, 2^-24) per row, with the exact top probability put back (see above)."""
    p = np.minimum(probs, (confidence * _BELOW_TOP)[:, None])
    p[np.arange(len(label)), label] = confidence
    out: FloatArray = temperature[:, None] * np.log(np.maximum(p, TINY))
    return out


def confidence_at(logits: FloatArray, temperature: float) -> FloatArray:
    """max softmax(z / T) per row, in float32 as the serving path computes it."""
    if len(logits) == 0:
        return np.zeros(0)
    out: FloatArray = softmax(logits.astype(np.float32), temperature).max(axis=1).astype(float)
    return out


def _rescored(
    confidence: FloatArray,
    row_t: FloatArray,
    label: IntArray,
    blobs: Sequence[bytes],
    temperature: float | None,
) -> FloatArray:
    """Confidences at `temperature`: rows served at another T are recomputed."""
    if temperature is None:
        return confidence
    other = np.abs(row_t - temperature) > _SAME_T * temperature
    if not other.any():
        return confidence
    rows = np.flatnonzero(other)
    logits = recover_logits(
        decode_matrix([blobs[int(i)] for i in rows]), row_t[rows], confidence[rows], label[rows]
    )
    out = confidence.copy()
    out[rows] = confidence_at(logits, temperature)
    return out


# -- labelled rows in matured windows -----------------------------------------------------


@dataclass(frozen=True, eq=False)
class LabelledSample:
    logits: FloatArray  # [n, K], recovered (see the module docstring)
    labels: IntArray
    confidence: FloatArray  # as served
    temperature: FloatArray  # T each row was served at
    buckets: int  # windows of the range that hold rows
    matured_buckets: int
    clients: list[str]  # who sent each label
    teacher_labels: IntArray  # the teacher's answer where it was asked, else -1

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, keep: BoolArray) -> LabelledSample:
        """The rows where `keep` is true, every column alike."""
        return replace(
            self,
            logits=self.logits[keep],
            labels=self.labels[keep],
            confidence=self.confidence[keep],
            temperature=self.temperature[keep],
            clients=[c for c, k in zip(self.clients, keep, strict=True) if k],
            teacher_labels=self.teacher_labels[keep],
        )


@dataclass(frozen=True)
class Maturity:
    """When a window's labels are final (METRICS.md): κ ≥ κ* or older than the horizon."""

    bucket_s: float
    completeness: float
    horizon_s: float


def _bucket(connection: Connection, size: float) -> ColumnElement[Any]:
    """⌊created_at / size⌋: epoch-aligned windows, as the monitor's. Times are positive,
    so SQLite's truncating CAST is a floor; PostgreSQL's CAST rounds, hence floor()."""
    ratio = P.created_at / size
    if connection.dialect.name == "postgresql":
        return cast(func.floor(ratio), Integer)
    return cast(ratio, Integer)


def matured_buckets(
    connection: Connection, scope: Scope, maturity: Maturity
) -> tuple[list[int], int]:
    """The matured windows of the scope (and how many windows hold rows at all)."""
    bucket = _bucket(connection, maturity.bucket_s)
    query = (
        select(bucket, func.count(), func.count(F.request_id))
        .select_from(P)
        .outerjoin(F, scope.label_join())
        .where(*scope.where())
        .group_by(bucket)
    )
    matured, total = [], 0
    for index, rows, labelled in connection.execute(query):
        total += 1
        end = (int(index) + 1) * maturity.bucket_s
        ready = labelled / rows >= maturity.completeness or scope.end - end >= maturity.horizon_s
        if end <= scope.end and ready:
            matured.append(int(index))
    return matured, total


def matured_labelled(
    connection: Connection, scope: Scope, maturity: Maturity, *, limit: int
) -> LabelledSample:
    """Labelled predictions in matured windows, newest first, at most `limit` of them."""
    matured, total = matured_buckets(connection, scope, maturity)
    rows: list[Any] = []
    if matured:
        query = (
            select(
                P.confidence,
                P.student_label,
                scope.row_temperature(),
                P.student_probs,
                F.label,
                F.client,
                P.teacher_label,
            )
            .join(F, scope.label_join())
            .where(*scope.where(), _bucket(connection, maturity.bucket_s).in_(matured))
            .order_by(P.created_at.desc(), P.request_id)
            .limit(limit)
        )
        rows = list(connection.execute(query))
    confidence = np.array([r[0] for r in rows], dtype=np.float64)
    student = np.array([r[1] for r in rows], dtype=np.int64)
    temperature = np.array([r[2] for r in rows], dtype=np.float64)
    probs = decode_matrix([r[3] for r in rows])
    return LabelledSample(
        logits=recover_logits(probs, temperature, confidence, student)
        if rows
        else np.zeros((0, 0)),
        labels=np.array([r[4] for r in rows], dtype=np.int64),
        confidence=confidence,
        temperature=temperature,
        buckets=total,
        matured_buckets=len(matured),
        clients=[r[5] for r in rows],
        teacher_labels=np.array([-1 if r[6] is None else r[6] for r in rows], dtype=np.int64),
    )


# -- teacher-observed pairs ---------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ShadowPairs:
    """Requests whose teacher output was observed (fallback or shadow), with π and labels."""

    confidence: FloatArray  # at the requested temperature
    student_label: IntArray
    teacher_label: IntArray
    inclusion_probability: FloatArray
    served_by_teacher: BoolArray
    label: IntArray  # -1 where no label arrived
    student_logits: FloatArray | None  # [n, K] recovered, when asked for
    teacher_probs: FloatArray | None  # [n, K], when asked for

    def __len__(self) -> int:
        return len(self.confidence)

    @property
    def weight(self) -> FloatArray:
        out: FloatArray = 1.0 / self.inclusion_probability
        return out

    @property
    def flip(self) -> BoolArray:
        out: BoolArray = self.student_label != self.teacher_label
        return out


def shadow_pairs(
    connection: Connection,
    scope: Scope,
    *,
    temperature: float | None = None,
    with_probs: bool = False,
) -> ShadowPairs:
    """Every teacher-observed request of the scope; confidences rescored at `temperature`."""
    columns = [
        P.confidence, P.student_label, scope.row_temperature(), P.student_probs,
        P.teacher_label, P.inclusion_probability, P.served_by_teacher, F.label,
    ]  # fmt: skip
    if with_probs:
        columns.append(P.teacher_probs)
    query = (
        select(*columns)
        .select_from(P)
        .outerjoin(F, scope.label_join())
        .where(*scope.where(), P.teacher_label.is_not(None))
        .order_by(P.created_at, P.request_id)  # the same rows in the same order on a re-run
    )
    rows: list[Any] = list(connection.execute(query))
    confidence = np.array([r[0] for r in rows], dtype=np.float64)
    student = np.array([r[1] for r in rows], dtype=np.int64)
    row_t = np.array([r[2] for r in rows], dtype=np.float64)
    blobs = [r[3] for r in rows]
    logits = None
    if with_probs:
        logits = recover_logits(decode_matrix(blobs), row_t, confidence, student)
    return ShadowPairs(
        confidence=_rescored(confidence, row_t, student, blobs, temperature),
        student_label=student,
        teacher_label=np.array([r[4] for r in rows], dtype=np.int64),
        inclusion_probability=np.array([r[5] for r in rows], dtype=np.float64),
        served_by_teacher=np.array([bool(r[6]) for r in rows], dtype=np.bool_),
        label=np.array([-1 if r[7] is None else r[7] for r in rows], dtype=np.int64),
        student_logits=logits,
        teacher_probs=decode_matrix([r[8] for r in rows]) if with_probs else None,
    )


# -- all traffic ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Traffic:
    confidence: FloatArray  # every request's, at the requested temperature
    realised_teacher_share: float  # share sent to the teacher (c < the τ then in force)

    def __len__(self) -> int:
        return len(self.confidence)


def traffic(connection: Connection, scope: Scope, *, temperature: float | None = None) -> Traffic:
    """Every request's confidence; probabilities are read only for rows served at another T."""
    same = (
        func.abs(scope.row_temperature() - temperature) <= _SAME_T * temperature
        if temperature is not None
        else None
    )
    plain = select(P.confidence).where(*scope.where())
    if same is not None:
        plain = plain.where(same)
    confidence = np.array(connection.execute(plain).scalars().all(), dtype=np.float64)
    if same is not None:
        other: list[Any] = list(
            connection.execute(
                select(P.confidence, P.student_label, scope.row_temperature(), P.student_probs)
                .where(*scope.where(), ~same)
            )
        )  # fmt: skip
        if other:
            rescored = _rescored(
                np.array([r[0] for r in other], dtype=np.float64),
                np.array([r[2] for r in other], dtype=np.float64),
                np.array([r[1] for r in other], dtype=np.int64),
                [r[3] for r in other],
                temperature,
            )
            confidence = np.concatenate([confidence, rescored])
    sent = connection.execute(
        select(func.count()).where(*scope.where(), P.confidence < P.fallback_threshold)
    ).scalar_one()
    share = int(sent) / len(confidence) if len(confidence) else 0.0
    return Traffic(confidence=confidence, realised_teacher_share=share)


# -- what is served now ----------------------------------------------------------------------


@dataclass(frozen=True)
class Serving:
    student_version: str
    temperature: float
    fallback_threshold: float


def serving(connection: Connection, model: str) -> Serving | None:
    """The deployment's serving state (what every replica serves), if one is recorded."""
    row = connection.execute(
        select(
            ServingState.student_version,
            ServingState.temperature,
            ServingState.fallback_threshold,
        ).where(ServingState.model == model)
    ).one_or_none()
    return None if row is None else Serving(str(row[0]), float(row[1]), float(row[2]))
