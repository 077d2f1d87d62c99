"""Per-bucket sums: what every monitoring window adds up, kept current as rows arrive.

Every statistic in `monitoring.metrics` is built from sums and per-bin counts. Rather
than re-reading every prediction of a window on each monitor pass (a day-long window is
all of a day's traffic, every pass), each row's share of those sums is added once, to
its time bucket (`recording.bucket_s`, by prediction time), in the transaction that
stores the row: the writer adds each flush to `prediction_sums` (by confidence decile)
and `entropy_sums` (by fine entropy bin), and feedback adds each label to `label_sums`
(by ECE cell and fine confidence bin) for the bucket of its prediction. A window whose
ends are multiples of the bucket length is then the sum of its buckets: a few thousand
numbers however much traffic it covers, and exact whatever order rows and labels come
in (rows written late after an outage, labels hours late, several replicas), because a
row and its sums commit or roll back together.

Adding is an upsert (`value = value + excluded.value`) in key order, so two writers that
touch the same buckets lock them in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql, sqlite

from service.monitoring.metrics import DECILES, FINE_BINS
from service.persistence.database import is_postgres
from service.persistence.rows import Coded, Fixed, Rows

Floats = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]
SumRows = list[dict[str, Any]]


def bucket_starts(created_at: npt.ArrayLike, bucket_s: float) -> Floats:
    """The start of the bucket each time falls in (a multiple of `bucket_s`)."""
    return np.floor(np.asarray(created_at, np.float64) / bucket_s) * bucket_s


def prediction_sums(rows: Rows, bucket_s: float) -> tuple[SumRows, SumRows]:
    """The `prediction_sums` and `entropy_sums` shares of some `predictions` rows, each in
    key order."""
    if not len(rows):
        return [], []
    model = rows.columns["model"]
    assert isinstance(model, Coded)
    n = len(rows)
    bucket = bucket_starts(_numbers(rows, "created_at"), bucket_s)
    w = _weights(_numbers(rows, "inclusion_probability"))
    teacher_label, no_teacher = _nullable(rows, "teacher_label")
    teacher = ~no_teacher
    flip = teacher & (_numbers(rows, "student_label") != teacher_label)
    served = teacher & ~_numbers(rows, "served_by_teacher").astype(bool)
    shadow = _equals(rows, "teacher_outcome", "shadow")
    top, no_top = _nullable(rows, "teacher_confidence")
    at_student, no_at_student = _nullable(rows, "teacher_p_student")
    delta = np.where(no_top | no_at_student, 0.0, top - at_student)
    tv, _ = _nullable(rows, "total_variation")
    kl, _ = _nullable(rows, "kl_teacher_student")
    decile = _numbers(rows, "conf_fine").astype(np.int64) // (FINE_BINS // DECILES)
    by_decile = _grouped(
        {"model": model, "bucket_start": bucket, "decile": decile},
        {
            "n": np.ones(n),
            "teacher_n": teacher,
            "sum_w": w * teacher,
            "sum_w2": w * w * teacher,
            "sum_w_flip": w * flip,
            "sum_w_tv": np.where(teacher, w * tv, 0.0),
            "sum_w_kl": np.where(teacher, w * kl, 0.0),
            "served_n": served,
            "served_sum_w": w * served,
            "served_sum_w2": w * w * served,
            "served_sum_w_flip": w * (served & flip),
            "shadow_n": shadow,
            "shadow_sum_w": w * shadow,
            "shadow_sum_w2": w * w * shadow,
            "shadow_sum_w_delta": np.where(shadow, w * delta, 0.0),
            "shadow_sum_w_delta2": np.where(shadow, w * delta * delta, 0.0),
        },
        counts={"n", "teacher_n", "served_n", "shadow_n"},
    )
    by_entropy = _grouped(
        {
            "model": model,
            "bucket_start": bucket,
            "entropy_fine": _numbers(rows, "entropy_fine").astype(np.int64),
        },
        {"n": np.ones(n)},
        counts={"n"},
    )
    return by_decile, by_entropy


def label_sums(
    *,
    model: Sequence[str],
    created_at: npt.ArrayLike,
    conf_bin: npt.ArrayLike,
    conf_fine: npt.ArrayLike,
    confidence: npt.ArrayLike,
    inclusion_probability: npt.ArrayLike,
    student_correct: npt.ArrayLike,
    teacher_correct: Sequence[bool | None],
    nll: npt.ArrayLike,
    brier: npt.ArrayLike,
    bucket_s: float,
) -> SumRows:
    """The `label_sums` share of some new labels, each given with its prediction's columns."""
    if not len(model):
        return []
    s = np.asarray(student_correct, bool)
    paired = np.array([t is not None for t in teacher_correct], bool)
    t = np.array([bool(t) for t in teacher_correct], bool)
    w = _weights(inclusion_probability)
    both, teacher_only, student_only = paired & s & t, paired & t & ~s, paired & s & ~t
    return _grouped(
        {
            "model": np.asarray(model, object),
            "bucket_start": bucket_starts(created_at, bucket_s),
            "conf_bin": np.asarray(conf_bin, np.int64),
            "conf_fine": np.asarray(conf_fine, np.int64),
        },
        {
            "n": np.ones(len(model)),
            "sum_correct": s,
            "sum_conf": np.asarray(confidence, np.float64),
            "sum_nll": np.asarray(nll, np.float64),
            "sum_brier": np.asarray(brier, np.float64),
            "paired_n": paired,
            "paired_sum_w": w * paired,
            "paired_sum_w2": w * w * paired,
            "both_w": w * both,
            "teacher_only_w": w * teacher_only,
            "student_only_w": w * student_only,
            "both_n": both,
            "teacher_only_n": teacher_only,
            "student_only_n": student_only,
        },
        counts={"n", "paired_n", "both_n", "teacher_only_n", "student_only_n"},
    )


def add_sums(connection: Connection, table: type[Any], rows: SumRows) -> None:
    """Add `rows` (in key order) to the stored sums: a new key is inserted, a stored one
    added to."""
    if not rows:
        return
    columns = table.__table__.c
    keys = _keys(table)
    insert: Any = (postgresql.insert if is_postgres(connection) else sqlite.insert)(table)
    statement = insert.on_conflict_do_update(
        index_elements=keys,
        set_={
            c.name: columns[c.name] + insert.excluded[c.name] for c in columns if c.name not in keys
        },
    )
    connection.execute(statement, rows)


def _weights(inclusion_probability: npt.ArrayLike) -> Floats:
    """w = 1/π; 0 where π = 0 (shadow off, a confident row: no teacher output to weigh)."""
    pi = np.asarray(inclusion_probability, np.float64)
    return np.divide(1.0, pi, out=np.zeros_like(pi), where=pi > 0)


def _keys(table: type[Any]) -> list[str]:
    return [c.name for c in table.__table__.primary_key.columns]


def _grouped(
    keys: Mapping[str, npt.NDArray[Any] | Coded],
    values: Mapping[str, npt.NDArray[Any]],
    *,
    counts: set[str],
) -> SumRows:
    """Sum `values` over the rows that share all `keys`: one dict per key, in key order.

    Each key column becomes codes into its sorted distinct values, and the codes one
    integer per row (mixed radix), so grouping is a single 1-D sort.
    """
    distinct: list[list[Any]] = []
    combined: npt.NDArray[np.int64] | int = 0
    for column in keys.values():
        if isinstance(column, Coded):  # already codes; ranked so that key order holds
            order = np.argsort(np.asarray(column.values, object), kind="stable")
            rank = np.empty(len(order), np.int64)
            rank[order] = np.arange(len(order))
            uniques, code = [column.values[i] for i in order.tolist()], rank[column.codes]
        else:
            found, code = np.unique(column, return_inverse=True)
            uniques = found.tolist()
        distinct.append(uniques)
        combined = combined * len(uniques) + code.ravel()
    cells, inverse = np.unique(combined, return_inverse=True)
    inverse = inverse.ravel()
    sums = {
        name: np.bincount(inverse, np.asarray(v, np.float64), minlength=len(cells)).tolist()
        for name, v in values.items()
    }
    columns: list[list[Any]] = []
    for uniques in reversed(distinct):  # undo the mixed radix, last key first
        columns.append([uniques[c] for c in (cells % len(uniques)).tolist()])
        cells = cells // len(uniques)
    names = list(keys)
    out = []
    for i, cell in enumerate(zip(*reversed(columns), strict=True)):
        row: dict[str, Any] = dict(zip(names, cell, strict=True))
        for name, total in sums.items():
            row[name] = round(total[i]) if name in counts else total[i]
        out.append(row)
    return out


def _numbers(rows: Rows, name: str) -> npt.NDArray[Any]:
    column = rows.columns[name]
    assert isinstance(column, Fixed)
    return column.values


def _nullable(rows: Rows, name: str) -> tuple[Floats, Mask]:
    """A column's values as floats (0 where NULL) and its NULL mask."""
    column = rows.columns[name]
    assert isinstance(column, Fixed)
    null = np.zeros(len(rows), bool) if column.null is None else column.null
    return np.where(null, 0.0, column.values.astype(np.float64)), null


def _equals(rows: Rows, name: str, value: str) -> Mask:
    """Which rows of a string column hold `value`."""
    column = rows.columns[name]
    assert isinstance(column, Coded)
    values = list(column.values)
    if value not in values:
        return np.zeros(len(rows), bool)
    return np.asarray(column.codes == values.index(value))
