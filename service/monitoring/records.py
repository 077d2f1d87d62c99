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


# The rows the fallback asked the teacher about: exactly the low-confidence ones (c < τ).
FALLBACK_OUTCOMES = frozenset({TeacherOutcome.FALLBACK, TeacherOutcome.FALLBACK_FAILED})


def inclusion_probability(
    low: BoolArray, shadow_rate: float | npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """π = 1[c < τ] + 1[c ≥ τ]·π₀: the chance the teacher output was requested."""
    return np.where(low, 1.0, shadow_rate)


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

    `teacher_probs` rows are NaN where the teacher output was not observed. What follows
    from the rest is not stored twice: the confidence from the student's probabilities;
    who served a row, and whether it was degraded, from its teacher outcome; and π, the
    probability that its teacher output was requested, from both: π = 1[c < τ] + 1[c ≥ τ]·π₀,
    the rows with c < τ being exactly those the fallback asked about. Student-vs-teacher
    statistics weight by 1/π.
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
    entropy: Array
    fallback_threshold: float
    shadow_rate: float  # π₀ when the request was answered
    student_temperature: float
    student_seconds: float
    teacher_seconds: float | None
    total_seconds: float
    inputs: Array | None = None  # the request's features, when sampled for logging

    def __len__(self) -> int:
        return len(self.request_ids)

    @property
    def confidence(self) -> Array:
        out: Array = self.student_probs.max(axis=1)
        return out

    @property
    def served_by_teacher(self) -> BoolArray:
        return self._outcome_is(TeacherOutcome.FALLBACK)

    @property
    def degraded(self) -> BoolArray:
        return self._outcome_is(TeacherOutcome.FALLBACK_FAILED)

    @property
    def inclusion_probability(self) -> npt.NDArray[np.float64]:
        low = np.fromiter((o in FALLBACK_OUTCOMES for o in self.teacher_outcome), np.bool_)
        return inclusion_probability(low, self.shadow_rate)

    def _outcome_is(self, outcome: TeacherOutcome) -> BoolArray:
        return np.fromiter((o == outcome for o in self.teacher_outcome), np.bool_)

    def rows(self) -> list[PredictionRecord]:
        out = []
        confidence, pi = self.confidence, self.inclusion_probability
        by_teacher, degraded = self.served_by_teacher, self.degraded
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
                    served_by=ServedBy.TEACHER if by_teacher[i] else ServedBy.STUDENT,
                    degraded=bool(degraded[i]),
                    teacher_outcome=outcome,
                    teacher_error=self.teacher_error if failed else None,
                    student_probs=self.student_probs[i],
                    teacher_probs=teacher if observed else None,
                    confidence=float(confidence[i]),
                    entropy=float(self.entropy[i]),
                    inclusion_probability=float(pi[i]),
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
