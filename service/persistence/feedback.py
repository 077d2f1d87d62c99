"""Feedback labels: checked against what the service issued, stored once, never twice.

Repository functions take a session and keyword arguments and never commit: the caller
owns the transaction, so an acknowledgement is only sent after the commit.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.errors import (
    BadInputError,
    ConflictError,
    NotFoundError,
    UnavailableError,
    UnprocessableError,
)
from service.monitoring.metrics import label_columns
from service.persistence.rows import decode_probs
from service.persistence.sums import add_sums, label_sums
from service.persistence.tables import Feedback, IdempotencyKey, LabelSums, Prediction


@dataclass(frozen=True)
class Label:
    request_id: str
    label: int


def record_labels(
    session: Session,
    *,
    labels: list[Label],
    num_classes: int,
    client: str,
    bucket_s: int,
    now: float | None = None,
) -> dict[str, int]:
    """Store labels and add them to the window sums (buckets of `bucket_s` seconds);
    {"accepted": new, "unchanged": repeats}. 404 unknown ids, 409 conflicts."""
    ids = [item.request_id for item in labels]
    if len(set(ids)) != len(ids):
        raise BadInputError("a request id appears twice in one feedback request")
    for item in labels:
        if not 0 <= item.label < num_classes:
            raise UnprocessableError(f"label {item.label} is outside 0..{num_classes - 1}")
    predictions = {
        p.request_id: p
        for p in session.execute(select(Prediction).where(Prediction.request_id.in_(ids))).scalars()
    }
    missing = [i for i in ids if i not in predictions]
    if missing:
        raise NotFoundError(f"unknown request id(s), not issued by this service: {missing[:10]}")
    existing = {
        f.request_id: f.label
        for f in session.execute(select(Feedback).where(Feedback.request_id.in_(ids))).scalars()
    }
    conflicts = [i.request_id for i in labels if existing.get(i.request_id, i.label) != i.label]
    if conflicts:
        raise ConflictError(f"a different label was already recorded for: {conflicts[:10]}")
    received = time.time() if now is None else now
    new = [i for i in labels if i.request_id not in existing]
    rows = [_feedback_row(predictions[i.request_id], i.label, client, received) for i in new]
    session.add_all(rows)
    session.flush()  # a label stored meanwhile by another request fails here, sums untouched
    _add_label_sums(session, [(predictions[row.request_id], row) for row in rows], bucket_s)
    return {"accepted": len(new), "unchanged": len(labels) - len(new)}


def _add_label_sums(
    session: Session, labelled: list[tuple[Prediction, Feedback]], bucket_s: int
) -> None:
    """Each new label's share of its prediction's bucket in `label_sums`."""
    predictions = [p for p, _ in labelled]
    feedback = [f for _, f in labelled]
    sums = label_sums(
        model=[p.model for p in predictions],
        created_at=[p.created_at for p in predictions],
        conf_bin=[p.conf_bin for p in predictions],
        conf_fine=[p.conf_fine for p in predictions],
        confidence=[p.confidence for p in predictions],
        inclusion_probability=[p.inclusion_probability for p in predictions],
        student_correct=[f.student_correct for f in feedback],
        teacher_correct=[f.teacher_correct for f in feedback],
        nll=[f.nll for f in feedback],
        brier=[f.brier for f in feedback],
        bucket_s=bucket_s,
    )
    add_sums(session.connection(), LabelSums, sums)


def _feedback_row(prediction: Prediction, label: int, client: str, received: float) -> Feedback:
    """Per-row calibration inputs (correctness, NLL, Brier), computed once, here."""
    columns = label_columns(decode_probs(prediction.student_probs)[None, :], [label])
    return Feedback(
        request_id=prediction.request_id,
        model=prediction.model,
        label=label,
        received_at=received,
        client=client[:64],
        student_correct=bool(columns.correct[0]),
        teacher_correct=None
        if prediction.teacher_label is None
        else prediction.teacher_label == label,
        nll=float(columns.nll[0]),
        brier=float(columns.brier[0]),
    )


def body_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def replay(session: Session, *, key: str, body_sha256: str) -> dict[str, Any] | None:
    """The stored answer for a repeated Idempotency-Key; 422 if reused for another body."""
    row = session.get(IdempotencyKey, key)
    if row is None:
        return None
    if row.body_sha256 != body_sha256:
        raise UnprocessableError("this Idempotency-Key was already used with a different body")
    return row.response


def remember(session: Session, *, key: str, body_sha256: str, response: dict[str, Any]) -> None:
    session.add(
        IdempotencyKey(key=key, body_sha256=body_sha256, response=response, created_at=time.time())
    )


_FLUSH_WAIT_S = 2.0  # how long a label for a not-yet-stored prediction waits for the writer


class FeedbackStore:
    """Runs one feedback request as one transaction; acknowledges only after commit.

    A label may arrive before the writer has flushed its prediction (a fast client): an
    unknown id triggers one flush of the writer and a second look before it is a 404. If
    that flush did not finish in time (the database is down or locked, so the id may
    still be queued), a second miss is a 503, not a 404 that would tell the client to
    drop a valid label. A database that cannot be reached is a 503, never a false
    acknowledgement.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        num_classes: Callable[[], int],
        bucket_s: int,
        flush_writer: Callable[[float], bool] | None,
    ) -> None:
        self._sessions = sessions
        self._num_classes = num_classes
        self._bucket_s = bucket_s
        self._flush_writer = flush_writer

    def submit(
        self, labels: list[Label], *, client: str, idempotency_key: str | None, body: bytes
    ) -> dict[str, Any]:
        try:
            return self._submit(labels, client, idempotency_key, body)
        except NotFoundError:
            if self._flush_writer is None:
                raise
            flushed = self._flush_writer(_FLUSH_WAIT_S)
        try:
            return self._submit(labels, client, idempotency_key, body)
        except NotFoundError as exc:
            if flushed:
                raise
            raise UnavailableError(
                "prediction records are still waiting for the database; the feedback was"
                " not recorded",
                headers={"Retry-After": "5"},
            ) from exc

    def _submit(
        self, labels: list[Label], client: str, key: str | None, body: bytes
    ) -> dict[str, Any]:
        digest = body_hash(body)
        try:
            with self._sessions.begin() as session:
                if key is not None and (previous := replay(session, key=key, body_sha256=digest)):
                    return previous
                result: dict[str, Any] = record_labels(
                    session, labels=labels, num_classes=self._num_classes(), client=client,
                    bucket_s=self._bucket_s,
                )  # fmt: skip
                if key is not None:
                    remember(session, key=key, body_sha256=digest, response=result)
            return result
        except IntegrityError as exc:  # a concurrent request stored the same id or key first
            raise ConflictError("a concurrent feedback request stored these labels; retry") from exc
        except OperationalError as exc:
            raise UnavailableError(
                "the database is unavailable; the feedback was not recorded",
                headers={"Retry-After": "5"},
            ) from exc
