"""The re-distillation transfer set: logged inputs, joined by request id to what the
teacher said about them (when it was asked) and to their feedback label (when one came).

Everything is joined in SQL on `request_id`, never by position, and ordered by
(created_at, request_id), so the rows come back in time order and in the same order on
every run over the same data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, and_, select

from service.persistence.tables import Feedback, Prediction, PredictionInput

UNLABELLED = -1
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, eq=False)
class TransferRows:
    """n logged inputs, oldest first; row i of every array describes `request_ids[i]`.

    `teacher_probs[i]` is NaN where no teacher output was recorded, `labels[i]` is -1
    where no label arrived (`label_clients[i]`, who sent it, None then too),
    `inclusion_probability[i]` NaN where the prediction row is gone.
    `discarded` counts what was left out and why: inputs of another width or not finite
    (the row is dropped), teacher outputs of another class count, labels out of range
    (the row stays, without them).
    """

    request_ids: list[str]
    created_at: FloatArray
    x: npt.NDArray[np.float32]
    teacher_probs: FloatArray
    teacher_versions: list[str | None]
    inclusion_probability: FloatArray
    labels: npt.NDArray[np.int64]
    label_clients: list[str | None]
    discarded: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.request_ids)

    @property
    def recorded(self) -> npt.NDArray[np.bool_]:
        """Rows whose teacher output was recorded at serving time."""
        return np.asarray(np.isfinite(self.teacher_probs).all(axis=1))

    def take(self, index: npt.NDArray[np.int64] | slice) -> TransferRows:
        """The rows at `index`, every column alike."""
        ids = np.asarray(self.request_ids, dtype=object)[index]
        versions = np.asarray(self.teacher_versions, dtype=object)[index]
        clients = np.asarray(self.label_clients, dtype=object)[index]
        return TransferRows(
            request_ids=[str(r) for r in ids],
            created_at=self.created_at[index],
            x=self.x[index],
            teacher_probs=self.teacher_probs[index],
            teacher_versions=[None if v is None else str(v) for v in versions],
            inclusion_probability=self.inclusion_probability[index],
            labels=self.labels[index],
            label_clients=[None if c is None else str(c) for c in clients],
            discarded=dict(self.discarded),
        )

    def without_labels(self, drop: npt.NDArray[np.bool_]) -> TransferRows:
        """These rows with the labels at `drop` taken away (the rows stay, unlabelled)."""
        labels = np.where(drop, UNLABELLED, self.labels)
        clients = [None if d else c for c, d in zip(self.label_clients, drop, strict=True)]
        return replace(self, labels=labels, label_clients=clients)


def read_transfer_rows(
    connection: Connection,
    *,
    model: str,
    features: int,
    classes: int,
    before: float,
    since: float | None = None,
    limit: int = 200_000,
) -> TransferRows:
    """The newest `limit` inputs logged for `model` in [since, before), oldest first.

    Labels count only when received before `before` too, so a job re-run later on the
    same database sees the same rows. Inputs of another width than `features` and
    teacher outputs with another class count than `classes` are left out (counted).
    """
    if limit < 1:
        raise ValueError("limit must be ≥ 1")
    i, p, f = PredictionInput, Prediction, Feedback
    conditions = [i.model == model, i.created_at < before]
    if since is not None:
        conditions.append(i.created_at >= since)
    query = (
        select(
            i.request_id,
            i.created_at,
            i.features,
            p.teacher_probs,
            p.teacher_version,
            p.inclusion_probability,
            f.label,
            f.client,
        )
        .outerjoin(p, p.request_id == i.request_id)
        .outerjoin(f, and_(f.request_id == i.request_id, f.received_at < before))
        .where(*conditions)
        .order_by(i.created_at.desc(), i.request_id.desc())
        .limit(limit)
    )
    # The newest `limit` rows were selected; hand them back oldest first.
    newest_first = connection.execute(query).all()
    return _decode(newest_first[::-1], features=features, classes=classes)


def _decode(rows: Sequence[Any], features: int, classes: int) -> TransferRows:
    """Rows of (request_id, created_at, features, teacher_probs, teacher_version,
    inclusion_probability, label, client) → arrays."""
    width = features * 4
    discarded = {"input_shape": 0, "input_not_finite": 0, "teacher_shape": 0, "label_range": 0}
    sized = [r for r in rows if r.features is not None and len(r.features) == width]
    discarded["input_shape"] = len(rows) - len(sized)
    x = np.frombuffer(b"".join(bytes(r.features) for r in sized), dtype="<f4")
    x = x.astype(np.float32).reshape(len(sized), features)
    finite = np.asarray(np.isfinite(x).all(axis=1))
    discarded["input_not_finite"] = int((~finite).sum())
    kept = [r for r, ok in zip(sized, finite, strict=True) if ok]
    x = np.ascontiguousarray(x[finite])
    n = len(kept)
    q = np.full((n, classes), np.nan)
    labels = np.full(n, UNLABELLED, dtype=np.int64)
    for row, r in enumerate(kept):
        if r.teacher_probs is not None:
            if len(r.teacher_probs) == classes * 2:
                q[row] = np.frombuffer(bytes(r.teacher_probs), dtype="<f2")
            else:
                discarded["teacher_shape"] += 1
        if r.label is not None:
            if 0 <= r.label < classes:
                labels[row] = r.label
            else:
                discarded["label_range"] += 1
    return TransferRows(
        request_ids=[r.request_id for r in kept],
        created_at=np.array([r.created_at for r in kept], dtype=np.float64),
        x=x,
        teacher_probs=q,
        teacher_versions=[r.teacher_version if r.teacher_probs is not None else None for r in kept],
        inclusion_probability=np.array(
            [np.nan if r.inclusion_probability is None else r.inclusion_probability for r in kept],
            dtype=np.float64,
        ),
        labels=labels,
        label_clients=[r.client if labels[i] != UNLABELLED else None for i, r in enumerate(kept)],
        discarded={k: v for k, v in discarded.items() if v},
    )
