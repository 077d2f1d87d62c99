"""PredictionBatch → table rows, column by column over a whole flush (the writer thread).

The writer runs in the serving process, so every microsecond it holds the GIL is taken
from the event loop. Nothing here loops over rows in Python where numpy can do it: a
flush becomes a few dozen array operations, whatever its size. Rows are kept as columns;
PostgreSQL gets them as one binary COPY payload built with numpy (`Rows.copy_binary`),
other databases as Python values (`Rows.flat`, `Rows.dicts`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, fields
from enum import Enum
from itertools import chain
from operator import attrgetter
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import BigInteger, Boolean, Float, Integer, LargeBinary, SmallInteger, Table

from service.monitoring.metrics import confidence_bin, confidence_fine_bin, fine_index
from service.monitoring.records import (
    FALLBACK_OUTCOMES,
    PredictionBatch,
    TeacherOutcome,
    inclusion_probability,
)
from service.persistence.tables import Prediction, PredictionInput

IntArray = npt.NDArray[np.intp]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class Fixed:
    """One fixed-size value per row: numbers (1-D) or byte strings of one width (2-D uint8).

    `null` marks the rows that are NULL (None: no row is).
    """

    values: npt.NDArray[Any]
    null: BoolArray | None = None


@dataclass(frozen=True, slots=True)
class Coded:
    """Strings (or byte strings) per row, as codes into their distinct values; -1 is NULL."""

    values: Sequence[str] | Sequence[bytes]
    codes: IntArray


Column = Fixed | Coded


class Rows:
    """The rows of one table, held as columns."""

    def __init__(self, table: Table, columns: dict[str, Column], count: int) -> None:
        self.table = table
        self.columns = columns
        self.count = count

    @property
    def names(self) -> list[str]:
        return list(self.columns)

    def __len__(self) -> int:
        return self.count

    def request_ids(self) -> list[str]:
        return _python_values(self.columns["request_id"])

    def take(self, index: IntArray) -> Rows:
        """The rows at `index`, in that order."""
        columns = {name: _take(column, index) for name, column in self.columns.items()}
        return Rows(self.table, columns, len(index))

    def lists(self) -> list[list[Any]]:
        """Each column as Python values (None for NULL)."""
        return [_python_values(column) for column in self.columns.values()]

    def flat(self) -> list[Any]:
        """All values row after row: row i is `flat[i * width : (i + 1) * width]`."""
        width = len(self.columns)
        out: list[Any] = [None] * (self.count * width)
        for j, values in enumerate(self.lists()):
            out[j::width] = values
        return out

    def tuples(self) -> list[tuple[Any, ...]]:
        return list(zip(*self.lists(), strict=True)) if self.count else []

    def dicts(self) -> list[dict[str, Any]]:
        names = self.names
        return [dict(zip(names, values, strict=True)) for values in self.tuples()]

    def copy_binary(self) -> bytes:
        """The rows in PostgreSQL's binary COPY format, signature and trailer included.

        Every row is a 16-bit field count, then per field a 32-bit length (-1: NULL) and
        the value in network byte order. Row and field offsets come from cumulative sums
        of the lengths, and each column is scattered into place with one indexed
        assignment (variable-length ones with a second, over their bytes).
        """
        n, width = self.count, len(self.columns)
        encoded = [
            _encode(column, self.table.c[name].type, n) for name, column in self.columns.items()
        ]
        lengths = np.stack([e.lengths for e in encoded]) if encoded else np.zeros((0, n))
        cells = 4 + np.maximum(lengths, 0)  # [width, n] bytes each field takes
        row_bytes = 2 + cells.sum(axis=0)
        row_start = len(_SIGNATURE) + np.cumsum(row_bytes) - row_bytes
        cell_start = row_start + 2 + np.cumsum(cells, axis=0) - cells
        out = np.empty(len(_SIGNATURE) + int(row_bytes.sum()) + 2, np.uint8)
        out[: len(_SIGNATURE)] = np.frombuffer(_SIGNATURE, np.uint8)
        out[-2:] = 0xFF  # trailer: a field count of -1
        out[row_start[:, None] + np.arange(2)] = np.frombuffer(
            np.array(width, ">i2").tobytes(), np.uint8
        )
        out[cell_start[..., None] + np.arange(4)] = (
            lengths.astype(">i4").view(np.uint8).reshape(width, n, 4)
        )
        for field, start in zip(encoded, cell_start + 4, strict=True):
            field.scatter(out, start)
        return out.tobytes()


_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, no header extension


@dataclass(frozen=True, slots=True)
class _Encoded:
    lengths: npt.NDArray[np.int64]  # bytes of each row's value; -1 for NULL
    data: npt.NDArray[np.uint8]  # fixed: [n, width]; variable: the distinct values, concatenated
    starts: npt.NDArray[np.int64] | None = None  # variable: where each row's value starts in data

    def scatter(self, out: npt.NDArray[np.uint8], start: npt.NDArray[np.int64]) -> None:
        if self.starts is None:
            keep = self.lengths >= 0
            rows = self.data if keep.all() else self.data[keep]
            out[start[keep][:, None] + np.arange(self.data.shape[1])] = rows
            return
        sizes = np.maximum(self.lengths, 0)
        total = int(sizes.sum())
        if not total:
            return
        step = np.arange(total) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        out[np.repeat(start, sizes) + step] = self.data[np.repeat(self.starts, sizes) + step]


def _encode(column: Column, sql_type: Any, n: int) -> _Encoded:
    if isinstance(column, Coded):
        return _encode_coded(column)
    values = column.values
    if values.ndim == 2:
        if not isinstance(sql_type, LargeBinary):
            raise TypeError(f"byte strings for a {sql_type!r} column")
        data = np.ascontiguousarray(values, np.uint8)
    else:
        data = values.astype(_wire_dtype(sql_type)).view(np.uint8).reshape(n, -1)
    lengths = np.full(n, data.shape[1], np.int64)
    if column.null is not None:
        lengths[column.null] = -1
    return _Encoded(lengths, data)


def _wire_dtype(sql_type: Any) -> str:
    """Network-order numpy dtype of a numeric SQL type (its binary COPY representation)."""
    if isinstance(sql_type, Boolean):
        return "u1"
    if isinstance(sql_type, SmallInteger):
        return ">i2"
    if isinstance(sql_type, BigInteger):
        return ">i8"
    if isinstance(sql_type, Integer):
        return ">i4"
    if isinstance(sql_type, Float):
        return ">f8"  # FLOAT without a precision is double precision
    raise TypeError(f"no binary encoding for {sql_type!r}")


def _encode_coded(column: Coded) -> _Encoded:
    values = column.values
    text = "".join(values) if values and isinstance(values[0], str) else None  # type: ignore[arg-type]
    if text is not None and text.isascii():  # the usual case: one encode, lengths as they are
        blobs: Sequence[str] | Sequence[bytes] = values
        data = text.encode("ascii")
    else:
        blobs = [v.encode() if isinstance(v, str) else v for v in values]
        data = b"".join(blobs)
    value_len = np.fromiter(map(len, blobs), np.int64, len(blobs))
    value_start = np.cumsum(value_len) - value_len
    # code -1 (NULL) picks the appended entries: length -1, start 0
    lengths = np.append(value_len, -1)[column.codes]
    starts = np.append(value_start, 0)[column.codes]
    return _Encoded(lengths, np.frombuffer(data, np.uint8), starts)


def _take(column: Column, index: IntArray) -> Column:
    if isinstance(column, Coded):
        return Coded(column.values, column.codes[index])
    return Fixed(column.values[index], None if column.null is None else column.null[index])


def _python_values(column: Column) -> list[Any]:
    if isinstance(column, Coded):
        lookup = np.empty(len(column.values) + 1, object)
        lookup[:-1] = column.values
        lookup[-1] = None
        out: list[Any] = lookup[column.codes].tolist()
        return out
    values = column.values
    if values.ndim == 2:
        width = values.shape[1]
        out = np.ascontiguousarray(values, np.uint8).view(f"V{width}").ravel().tolist()
    else:
        out = values.tolist()
    if column.null is not None:
        for i in np.flatnonzero(column.null).tolist():
            out[i] = None
    return out


def _coded(values: list[Any]) -> Coded:
    """Distinct values and a code per entry (None becomes NULL, code -1)."""
    first = values[0] if values else None
    if values.count(first) == len(values):  # the usual case: one value throughout
        distinct = [] if first is None else [first]
        codes = np.full(len(values), 0 if distinct else -1, np.intp)
    else:
        index = {v: i for i, v in enumerate(dict.fromkeys(values))}
        codes = np.fromiter(map(index.__getitem__, values), np.intp, len(values))
        if None in index:
            null = index.pop(None)
            codes = np.where(codes == null, -1, codes - (codes > null))
        distinct = list(index)
    return Coded([v.value if isinstance(v, Enum) else v for v in distinct], codes)


def _as_bytes(values: npt.NDArray[Any], dtype: str) -> npt.NDArray[np.uint8]:
    """Rows of a 2-D array as fixed-width byte strings in `dtype` ([n, width] uint8)."""
    wire = np.ascontiguousarray(values, dtype)
    return wire.view(np.uint8).reshape(len(wire), -1)


@dataclass
class Gathered:
    """The rows of many batches as per-row arrays, before anything is derived from them.

    Cheap to build (a few concatenations, no per-row Python) and to pickle: this is what
    the serving process hands to the writer process. `teacher_probs` rows are NaN where
    the teacher output was not observed (None: no row has one); `logged` are the rows
    whose inputs were sampled, `features` their inputs.
    """

    request_ids: list[str]
    model: Coded
    student_version: Coded
    teacher_version: Coded
    routing_key: Coded
    teacher_error: Coded
    teacher_outcome: Coded
    created_at: npt.NDArray[np.float64]
    fallback_threshold: npt.NDArray[np.float64]
    student_temperature: npt.NDArray[np.float64]
    student_seconds: npt.NDArray[np.float64]
    total_seconds: npt.NDArray[np.float64]
    teacher_seconds: npt.NDArray[np.float64]  # NaN where None
    shadow_rate: npt.NDArray[np.float64]
    student_probs: npt.NDArray[Any]
    teacher_probs: npt.NDArray[Any] | None
    entropy: npt.NDArray[Any]
    logged: IntArray
    features: npt.NDArray[Any] | None

    def __len__(self) -> int:
        return len(self.request_ids)


def gather(batches: Sequence[PredictionBatch]) -> Gathered:
    """Concatenate many batches column by column.

    Most batches hold one instance, so per-batch values are collected with C-level
    iteration and repeated per row only when some batch holds several.
    """

    def field(name: str) -> list[Any]:
        return list(map(attrgetter(name), batches))

    ids = field("request_ids")
    counts = np.fromiter(map(len, ids), np.intp, len(batches))
    n = int(counts.sum())
    repeat = n != len(batches)
    starts = np.cumsum(counts) - counts

    def per_row(values: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return np.repeat(values, counts) if repeat else values

    def numbers(name: str) -> npt.NDArray[np.float64]:
        return per_row(np.array(field(name), np.float64))  # None becomes NaN

    def strings(name: str) -> Coded:
        coded = _coded(field(name))
        return Coded(coded.values, per_row(coded.codes))

    def rows(name: str) -> npt.NDArray[Any]:
        return np.concatenate(field(name))

    student_probs = rows("student_probs")
    teacher_probs = None
    for i, probs in enumerate(field("teacher_probs")):
        if probs is not None:
            if teacher_probs is None:
                teacher_probs = np.full(student_probs.shape, np.nan)
            teacher_probs[starts[i] : starts[i] + counts[i]] = probs
    logged, features = np.zeros(0, np.intp), None
    inputs = field("inputs")
    which = [i for i, x in enumerate(inputs) if x is not None]
    if which:
        logged = np.concatenate([np.arange(starts[i], starts[i] + counts[i]) for i in which])
        features = np.concatenate([inputs[i] for i in which])
    return Gathered(
        request_ids=list(chain.from_iterable(ids)),
        model=strings("model"),
        student_version=strings("student_version"),
        teacher_version=strings("teacher_version"),
        routing_key=strings("routing_key"),
        teacher_error=strings("teacher_error"),
        teacher_outcome=_coded(list(chain.from_iterable(field("teacher_outcome")))),
        created_at=numbers("created_at"),
        fallback_threshold=numbers("fallback_threshold"),
        student_temperature=numbers("student_temperature"),
        shadow_rate=numbers("shadow_rate"),
        student_seconds=numbers("student_seconds"),
        total_seconds=numbers("total_seconds"),
        teacher_seconds=numbers("teacher_seconds"),
        student_probs=student_probs,
        teacher_probs=teacher_probs,
        entropy=rows("entropy"),
        logged=logged,
        features=features,
    )


def merge(parts: Sequence[Gathered]) -> Gathered:
    """Several gathered parts as one (the parts of one flush: the event loop gathers a
    flush in parts so that each pause is short; the rows are built from them at once)."""
    if len(parts) == 1:
        return parts[0]
    counts = np.array([len(g) for g in parts], np.intp)
    starts = (np.cumsum(counts) - counts).tolist()
    features = [g.features for g in parts if g.features is not None]
    teacher_probs = None
    if any(g.teacher_probs is not None for g in parts):  # NaN rows: no teacher output
        unseen = [np.full(g.student_probs.shape, np.nan) for g in parts]
        seen = [
            u if g.teacher_probs is None else g.teacher_probs
            for g, u in zip(parts, unseen, strict=True)
        ]
        teacher_probs = np.concatenate(seen)
    merged: dict[str, Any] = {
        "request_ids": list(chain.from_iterable(g.request_ids for g in parts)),
        "teacher_probs": teacher_probs,
        "logged": np.concatenate([g.logged + s for g, s in zip(parts, starts, strict=True)]),
        "features": np.concatenate(features) if features else None,
    }
    for field in fields(Gathered):
        if field.name not in merged:  # the rest: codes into strings, or one value per row
            columns = [getattr(g, field.name) for g in parts]
            coded = isinstance(columns[0], Coded)
            merged[field.name] = merge_coded(columns) if coded else np.concatenate(columns)
    return Gathered(**merged)


def merge_coded(columns: Sequence[Coded]) -> Coded:
    """Several coded columns as one: codes into the distinct values of them all."""
    index: dict[Any, int] = {}
    codes = []
    for column in columns:
        for value in column.values:
            index.setdefault(value, len(index))
        own = np.array([index[v] for v in column.values] + [-1], np.intp)
        codes.append(own[column.codes])
    return Coded(list(index), np.concatenate(codes))


def prediction_rows(g: Gathered) -> Rows:
    """The `predictions` rows: stored columns plus the per-row values the monitor sums."""
    n = len(g)
    p = g.student_probs.astype(np.float64)
    labels = p.argmax(axis=1)
    confidence = p.max(axis=1)
    entropy = g.entropy.astype(np.float64)
    low = _outcome_in(g.teacher_outcome, FALLBACK_OUTCOMES)
    columns: dict[str, Column] = {
        "request_id": Coded(g.request_ids, np.arange(n)),
        "model": g.model,
        "student_version": g.student_version,
        "teacher_version": g.teacher_version,
        "routing_key": g.routing_key,
        "created_at": Fixed(g.created_at),
        "fallback_threshold": Fixed(g.fallback_threshold),
        "student_temperature": Fixed(g.student_temperature),
        "student_seconds": Fixed(g.student_seconds),
        "total_seconds": Fixed(g.total_seconds),
        "teacher_error": g.teacher_error,
        "student_label": Fixed(labels),
        "confidence": Fixed(confidence),
        "entropy": Fixed(entropy),
        # The metric layer's own bin functions: the cells must match its edges exactly.
        "conf_bin": Fixed(confidence_bin(confidence)),
        "conf_fine": Fixed(confidence_fine_bin(confidence)),
        "entropy_fine": Fixed(fine_index(entropy)),
        "served_by_teacher": Fixed(_outcome_in(g.teacher_outcome, {TeacherOutcome.FALLBACK})),
        "degraded": Fixed(_outcome_in(g.teacher_outcome, {TeacherOutcome.FALLBACK_FAILED})),
        "teacher_outcome": g.teacher_outcome,
        "inclusion_probability": Fixed(inclusion_probability(low, g.shadow_rate)),
        "student_probs": Fixed(_as_bytes(p, "<f2")),
        **_teacher_columns(g, p, labels),
    }
    return Rows(Prediction.__table__, columns, n)  # type: ignore[arg-type]


def _outcome_in(outcomes: Coded, kinds: Collection[object]) -> BoolArray:
    codes = [i for i, value in enumerate(outcomes.values) if value in kinds]
    return np.isin(outcomes.codes, codes)


def _teacher_columns(
    g: Gathered, p: npt.NDArray[np.float64], labels: npt.NDArray[np.intp]
) -> dict[str, Column]:
    n, k = p.shape
    q = np.full((n, k), np.nan) if g.teacher_probs is None else g.teacher_probs.astype(np.float64)
    seen = np.isfinite(q).all(axis=1)
    unseen = ~seen
    safe_q = np.where(seen[:, None], q, 1.0 / k)
    tiny = 1e-12
    kl = (safe_q * (np.log(np.maximum(safe_q, tiny)) - np.log(np.maximum(p, tiny)))).sum(axis=1)
    return {
        "teacher_label": Fixed(safe_q.argmax(axis=1), unseen),
        "teacher_confidence": Fixed(safe_q.max(axis=1), unseen),
        "teacher_p_student": Fixed(safe_q[np.arange(n), labels], unseen),
        "total_variation": Fixed(0.5 * np.abs(p - safe_q).sum(axis=1), unseen),
        "kl_teacher_student": Fixed(kl, unseen),
        "teacher_probs": Fixed(_as_bytes(safe_q, "<f2"), unseen),
        "teacher_seconds": Fixed(g.teacher_seconds, unseen | np.isnan(g.teacher_seconds)),
    }


def input_rows(g: Gathered) -> Rows:
    """The logged inputs (float32 bytes per row)."""
    if g.features is None:
        return Rows(PredictionInput.__table__, {}, 0)  # type: ignore[arg-type]
    rows = g.logged
    ids = [g.request_ids[i] for i in rows.tolist()]
    columns: dict[str, Column] = {
        "request_id": Coded(ids, np.arange(len(ids))),
        "model": Coded(g.model.values, g.model.codes[rows]),
        "created_at": Fixed(g.created_at[rows]),
        "features": Fixed(_as_bytes(g.features, "<f4")),
    }
    return Rows(PredictionInput.__table__, columns, len(ids))  # type: ignore[arg-type]


def decode_probs(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f2").astype(np.float64)
