"""PredictionBatch → table rows, vectorised per batch (runs on the writer thread)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.monitoring.metrics import confidence_bin, confidence_fine_bin, fine_index
from service.monitoring.records import PredictionBatch


@dataclass(frozen=True)
class Rows:
    """Column names and row tuples, ready for COPY or executemany."""

    names: list[str]
    tuples: list[tuple[Any, ...]]

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.names, values, strict=True)) for values in self.tuples]

    def __len__(self) -> int:
        return len(self.tuples)


def prediction_rows(batches: Sequence[PredictionBatch]) -> Rows:
    """All rows of many batches, computed column by column over their concatenation.

    Most batches hold one instance; per-batch numpy calls would cost more than the rows.
    """
    counts = [len(b) for b in batches]
    p = np.concatenate([b.student_probs for b in batches]).astype(np.float64)
    labels = p.argmax(axis=1)
    confidence = np.concatenate([b.confidence for b in batches]).astype(np.float64)
    entropy = np.concatenate([b.entropy for b in batches]).astype(np.float64)

    def per_row(values: Sequence[Any]) -> list[Any]:
        return [v for v, n in zip(values, counts, strict=True) for _ in range(n)]

    columns: dict[str, list[Any]] = {
        "request_id": [rid for b in batches for rid in b.request_ids],
        "model": per_row([b.model for b in batches]),
        "student_version": per_row([b.student_version for b in batches]),
        "teacher_version": per_row([b.teacher_version for b in batches]),
        "routing_key": per_row([b.routing_key for b in batches]),
        "created_at": per_row([b.created_at for b in batches]),
        "fallback_threshold": per_row([b.fallback_threshold for b in batches]),
        "student_temperature": per_row([b.student_temperature for b in batches]),
        "student_seconds": per_row([b.student_seconds for b in batches]),
        "total_seconds": per_row([b.total_seconds for b in batches]),
        "teacher_error": per_row([b.teacher_error for b in batches]),
        "student_label": labels.tolist(),
        "confidence": confidence.tolist(),
        "entropy": entropy.tolist(),
        # The metric layer's own bin functions: the cells must match its edges exactly.
        "conf_bin": confidence_bin(confidence).tolist(),
        "conf_fine": confidence_fine_bin(confidence).tolist(),
        "entropy_fine": fine_index(entropy).tolist(),
        "served_by_teacher": np.concatenate([b.served_by_teacher for b in batches]).tolist(),
        "degraded": np.concatenate([b.degraded for b in batches]).tolist(),
        "teacher_outcome": [o.value for b in batches for o in b.teacher_outcome],
        "inclusion_probability": np.concatenate(
            [b.inclusion_probability for b in batches]
        ).tolist(),
        "student_probs": [row.tobytes() for row in p.astype("<f2")],
        **_teacher_columns(batches, counts, p, labels),
    }
    return Rows(list(columns), list(zip(*columns.values(), strict=True)))


def _teacher_columns(
    batches: Sequence[PredictionBatch], counts: list[int], p: np.ndarray, labels: np.ndarray
) -> dict[str, list[Any]]:
    n, k = p.shape
    q = np.full((n, k), np.nan)
    seconds: list[float | None] = []
    start = 0
    for batch, count in zip(batches, counts, strict=True):
        if batch.teacher_probs is not None:
            q[start : start + count] = batch.teacher_probs
        seconds += [batch.teacher_seconds] * count
        start += count
    seen_mask: np.ndarray = np.asarray(np.isfinite(q).all(axis=1))
    seen: list[bool] = [bool(s) for s in seen_mask]
    safe_q = np.where(seen_mask[:, None], q, 1.0 / k)
    tiny = 1e-12
    kl = (safe_q * (np.log(np.maximum(safe_q, tiny)) - np.log(np.maximum(p, tiny)))).sum(axis=1)

    def where_seen(values: Sequence[Any]) -> list[Any]:
        return [v if s else None for v, s in zip(values, seen, strict=True)]

    return {
        "teacher_label": where_seen(safe_q.argmax(axis=1).tolist()),
        "teacher_confidence": where_seen(safe_q.max(axis=1).tolist()),
        "teacher_p_student": where_seen(safe_q[np.arange(n), labels].tolist()),
        "total_variation": where_seen((0.5 * np.abs(p - safe_q).sum(axis=1)).tolist()),
        "kl_teacher_student": where_seen(kl.tolist()),
        "teacher_probs": where_seen([row.tobytes() for row in safe_q.astype("<f2")]),
        "teacher_seconds": where_seen(seconds),
    }


def input_rows(batches: Sequence[PredictionBatch]) -> Rows:
    """The logged inputs of many batches (float32 bytes per row)."""
    tuples = [
        (rid, batch.model, batch.created_at, row.tobytes())
        for batch in batches
        if batch.inputs is not None
        for rid, row in zip(batch.request_ids, batch.inputs.astype("<f4"), strict=True)
    ]
    return Rows(["request_id", "model", "created_at", "features"], tuples)


def decode_probs(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f2").astype(np.float64)
