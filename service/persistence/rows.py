"""PredictionBatch → table rows, vectorised per batch (runs on the writer thread)."""

from __future__ import annotations

from typing import Any

import numpy as np

from service.monitoring.records import PredictionBatch

CONF_BINS = 15
FINE_BINS = 1000


def bin_index(values: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bin of values in [0, 1]; 1.0 goes in the last bin (the ECE convention)."""
    return np.minimum((values * bins).astype(np.int64), bins - 1).clip(0)


def prediction_rows(batch: PredictionBatch) -> list[dict[str, Any]]:
    p = batch.student_probs.astype(np.float64)
    labels = p.argmax(axis=1)
    confidence = batch.confidence.astype(np.float64)
    columns: dict[str, list[Any]] = {
        "request_id": list(batch.request_ids),
        "student_label": labels.tolist(),
        "confidence": confidence.tolist(),
        "entropy": batch.entropy.astype(np.float64).tolist(),
        "conf_bin": bin_index(confidence, CONF_BINS).tolist(),
        "conf_fine": bin_index(confidence, FINE_BINS).tolist(),
        "entropy_fine": bin_index(batch.entropy.astype(np.float64), FINE_BINS).tolist(),
        "served_by_teacher": batch.served_by_teacher.tolist(),
        "degraded": batch.degraded.tolist(),
        "teacher_outcome": [o.value for o in batch.teacher_outcome],
        "inclusion_probability": batch.inclusion_probability.tolist(),
        "student_probs": [row.tobytes() for row in batch.student_probs.astype("<f2")],
        **_teacher_columns(batch, p, labels),
    }
    shared = {
        "model": batch.model,
        "student_version": batch.student_version,
        "teacher_version": batch.teacher_version,
        "routing_key": batch.routing_key,
        "created_at": batch.created_at,
        "fallback_threshold": batch.fallback_threshold,
        "student_seconds": batch.student_seconds,
        "total_seconds": batch.total_seconds,
        "teacher_error": batch.teacher_error,
    }
    names = list(columns)
    return [
        {**shared, **dict(zip(names, values, strict=True))}
        for values in zip(*columns.values(), strict=True)
    ]


def _teacher_columns(
    batch: PredictionBatch, p: np.ndarray, labels: np.ndarray
) -> dict[str, list[Any]]:
    n = len(batch)
    if batch.teacher_probs is None:
        empty: list[Any] = [None] * n
        return {
            "teacher_label": empty, "teacher_confidence": empty, "teacher_p_student": empty,
            "total_variation": empty, "kl_teacher_student": empty, "teacher_probs": empty,
            "teacher_seconds": empty,
        }  # fmt: skip
    q = batch.teacher_probs.astype(np.float64)
    seen_mask: np.ndarray = np.asarray(np.isfinite(q).all(axis=1))
    seen: list[bool] = [bool(s) for s in seen_mask]
    safe_q = np.where(seen_mask[:, None], q, 1.0 / q.shape[1])
    tiny = 1e-12
    kl = (safe_q * (np.log(np.maximum(safe_q, tiny)) - np.log(np.maximum(p, tiny)))).sum(axis=1)

    def where_seen(values: np.ndarray) -> list[Any]:
        return [v if s else None for v, s in zip(values.tolist(), seen, strict=True)]

    return {
        "teacher_label": where_seen(safe_q.argmax(axis=1)),
        "teacher_confidence": where_seen(safe_q.max(axis=1)),
        "teacher_p_student": where_seen(safe_q[np.arange(n), labels]),
        "total_variation": where_seen(0.5 * np.abs(p - safe_q).sum(axis=1)),
        "kl_teacher_student": where_seen(kl),
        "teacher_probs": [
            row.tobytes() if s else None for row, s in zip(safe_q.astype("<f2"), seen, strict=True)
        ],
        "teacher_seconds": [batch.teacher_seconds if s else None for s in seen],
    }


def input_rows(batch: PredictionBatch) -> list[dict[str, Any]]:
    if batch.inputs is None:
        return []
    return [
        {
            "request_id": rid,
            "model": batch.model,
            "created_at": batch.created_at,
            "features": row.tobytes(),
        }
        for rid, row in zip(batch.request_ids, batch.inputs.astype("<f4"), strict=True)
    ]


def decode_probs(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f2").astype(np.float64)
