"""Per-bucket sums: bucketing, merging shares, and the settings that keep windows whole."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from service.persistence.sums import bucket_starts, label_sums
from service.settings import Settings


def test_a_time_falls_in_the_bucket_that_starts_at_or_before_it() -> None:
    starts = bucket_starts([0.0, 59.999, 60.0, 119.5, 1_733_390_461.25], 60)
    np.testing.assert_array_equal(starts, [0.0, 0.0, 60.0, 60.0, 1_733_390_460.0])


def labels(created_at: list[float], teacher_correct: list[bool | None]) -> list[dict[str, object]]:
    n = len(created_at)
    return label_sums(
        model=["m"] * n, created_at=created_at, conf_bin=[3] * n, conf_fine=[250] * n,
        confidence=[0.25] * n, inclusion_probability=[0.5] * n, student_correct=[True] * n,
        teacher_correct=teacher_correct, nll=[1.0] * n, brier=[0.5] * n, bucket_s=60,
    )  # fmt: skip


def test_labels_are_summed_per_bucket_and_cell() -> None:
    rows = labels([70.0, 10.0, 20.0], [False, True, None])  # in key order, whatever came first
    assert [(r["bucket_start"], r["n"], r["paired_n"]) for r in rows] == [
        (0.0, 2, 1),
        (60.0, 1, 1),
    ]
    first, second = rows
    assert first["both_w"] == 2.0 and first["student_only_w"] == 0.0  # w = 1/π = 2
    assert second["student_only_n"] == 1 and second["paired_sum_w2"] == 4.0
    assert first["sum_nll"] == 2.0 and isinstance(first["n"], int)


def test_a_weight_is_zero_where_nothing_was_sampled() -> None:
    """π = 0 (shadow off, a confident row) must not become an infinite or NaN sum."""
    rows = label_sums(
        model=["m"], created_at=[1.0], conf_bin=[14], conf_fine=[990], confidence=[0.99],
        inclusion_probability=[0.0], student_correct=[True], teacher_correct=[None],
        nll=[0.01], brier=[0.0], bucket_s=60,
    )  # fmt: skip
    assert rows[0]["paired_sum_w"] == 0.0 and rows[0]["n"] == 1


def test_every_window_must_be_whole_buckets() -> None:
    Settings(monitoring={"windows": ["5m", "1h"]}, recording={"bucket_s": 60})
    Settings(monitoring={"windows": ["10s"]}, recording={"bucket_s": 10})
    with pytest.raises(ValidationError, match=r"not a multiple of recording\.bucket_s"):
        Settings(monitoring={"windows": ["90s"]}, recording={"bucket_s": 60})
