"""What the request path hands downstream: one column-wise batch per request.

A batch is emitted when everything about its rows is known: at response time for rows
that were not shadowed, and when the shadow teacher call finishes (or is dropped) for
those that were. So each instance is recorded exactly once, and the request path builds
one object per request, not one per instance. `rows()` expands a batch into per-instance
records, off the request path (persistence, tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]


class ServedBy(StrEnum):
    STUDENT = "student"
    TEACHER = "teacher"


class TeacherOutcome(StrEnum):
    """What happened to the teacher side of an instance."""

    NOT_ASKED = "not_asked"  # confident, not sampled for shadow
    FALLBACK = "fallback"  # low confidence: the teacher answered and was served
    FALLBACK_FAILED = "fallback_failed"  # low confidence, teacher failed: student served, degraded
    SHADOW = "shadow"  # sampled for shadow: the teacher answered off the request path
    SHADOW_DROPPED = "shadow_dropped"  # sampled for shadow, but dropped or failed


@dataclass(frozen=True, slots=True)
class PredictionRecord:
    """One instance, expanded from a batch."""

    request_id: str
    model: str
    student_version: str
    teacher_version: str | None
    routing_key: str | None
    created_at: float
    served_by: ServedBy
    degraded: bool
    teacher_outcome: TeacherOutcome
    teacher_error: str | None
    student_probs: Array
    teacher_probs: Array | None
    confidence: float
    entropy: float
    inclusion_probability: float
    fallback_threshold: float
    student_temperature: float
    student_seconds: float
    teacher_seconds: float | None
    total_seconds: float

    @property
    def student_label(self) -> int:
        return int(self.student_probs.argmax())

    @property
    def teacher_label(self) -> int | None:
        return None if self.teacher_probs is None else int(self.teacher_probs.argmax())


@dataclass(slots=True)  # not frozen: a frozen __init__ costs a setattr call per field
class PredictionBatch:
    """Rows of one request that share a teacher outcome kind, as arrays.

    `teacher_probs` rows are NaN where the teacher output was not observed.
    `inclusion_probability` is π = 1[c < τ] + 1[c ≥ τ]·π₀ per row: the probability that
    the teacher output was requested. Student-vs-teacher statistics weight by 1/π.
    """

    model: str
    student_version: str
    teacher_version: str | None
    routing_key: str | None
    created_at: float
    request_ids: Sequence[str]
    student_probs: Array
    teacher_probs: Array | None
    teacher_outcome: Sequence[TeacherOutcome]
    teacher_error: str | None
    served_by_teacher: BoolArray
    degraded: BoolArray
    confidence: Array
    entropy: Array
    inclusion_probability: npt.NDArray[np.float64]
    fallback_threshold: float
    student_temperature: float
    student_seconds: float
    teacher_seconds: float | None
    total_seconds: float
    inputs: Array | None = None  # the request's features, when sampled for logging

    def __len__(self) -> int:
        return len(self.request_ids)

    def rows(self) -> list[PredictionRecord]:
        out = []
        for i, request_id in enumerate(self.request_ids):
            teacher = None if self.teacher_probs is None else self.teacher_probs[i]
            observed = teacher is not None and bool(np.isfinite(teacher).all())
            outcome = self.teacher_outcome[i]
            failed = outcome in (TeacherOutcome.FALLBACK_FAILED, TeacherOutcome.SHADOW_DROPPED)
            out.append(
                PredictionRecord(
                    request_id=request_id,
                    model=self.model,
                    student_version=self.student_version,
                    teacher_version=self.teacher_version,
                    routing_key=self.routing_key,
                    created_at=self.created_at,
                    served_by=ServedBy.TEACHER if self.served_by_teacher[i] else ServedBy.STUDENT,
                    degraded=bool(self.degraded[i]),
                    teacher_outcome=outcome,
                    teacher_error=self.teacher_error if failed else None,
                    student_probs=self.student_probs[i],
                    teacher_probs=teacher if observed else None,
                    confidence=float(self.confidence[i]),
                    entropy=float(self.entropy[i]),
                    inclusion_probability=float(self.inclusion_probability[i]),
                    fallback_threshold=self.fallback_threshold,
                    student_temperature=self.student_temperature,
                    student_seconds=self.student_seconds,
                    teacher_seconds=self.teacher_seconds if observed else None,
                    total_seconds=self.total_seconds,
                )
            )
        return out


class Recorder(Protocol):
    """Receives finished batches. Must never block: called on the event loop."""

    def record(self, batch: PredictionBatch) -> None: ...


class NullRecorder:
    """Discards records (used when nothing downstream is configured)."""

    def record(self, batch: PredictionBatch) -> None:
        return None
