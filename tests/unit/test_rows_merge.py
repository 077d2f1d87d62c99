"""A flush gathered in parts, merged, builds the same rows as one gathered whole."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from service.monitoring.records import PredictionBatch, TeacherOutcome
from service.persistence.rows import gather, input_rows, merge, prediction_rows


def batch(i: int, n: int, *, teacher: bool, inputs: bool, model: str = "m") -> PredictionBatch:
    probs = np.tile(np.array([0.75, 0.125, 0.125], np.float32), (n, 1))
    q = np.tile(np.array([0.125, 0.75, 0.125], np.float32), (n, 1)) if teacher else None
    return PredictionBatch(
        model=model, student_version="1", teacher_version="t" if teacher else None,
        routing_key=f"key{i}" if i % 2 else None, created_at=1000.0 + i,
        request_ids=[f"b{i}-{j}" for j in range(n)], student_probs=probs, teacher_probs=q,
        teacher_outcome=[TeacherOutcome.SHADOW if teacher else TeacherOutcome.NOT_ASKED] * n,
        teacher_error=None if teacher else "timeout",
        entropy=np.full(n, 0.1 * i, np.float32), shadow_rate=0.5, fallback_threshold=0.6,
        student_temperature=1.0,
        student_seconds=1e-4, teacher_seconds=2e-3 if teacher else None, total_seconds=2e-4,
        inputs=np.full((n, 4), float(i), np.float32) if inputs else None,
    )  # fmt: skip


@pytest.mark.parametrize("cut", [[2], [1, 3], [4]], ids=str)
def test_merged_parts_build_the_rows_of_the_whole(cut: list[int]) -> None:
    batches = [
        batch(0, 2, teacher=False, inputs=True),
        batch(1, 1, teacher=True, inputs=False, model="other"),
        batch(2, 3, teacher=False, inputs=False),
        batch(3, 2, teacher=True, inputs=True),
        batch(4, 1, teacher=False, inputs=False, model="other"),
    ]
    bounds = [0, *cut, len(batches)]
    parts = [gather(batches[a:b]) for a, b in pairwise(bounds)]
    whole, merged = gather(batches), merge(parts)
    assert prediction_rows(merged).tuples() == prediction_rows(whole).tuples()
    assert input_rows(merged).tuples() == input_rows(whole).tuples()
