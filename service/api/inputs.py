"""Turning request bodies into a checked float32 batch, shared by both APIs.

Parsing is done by hand with orjson + numpy rather than a pydantic model: for a 64-float
instance that is several times cheaper, and this runs on every request. The pydantic
schemas in `schemas.py` still document the same bodies in the OpenAPI spec.
"""

from __future__ import annotations

import re
from itertools import chain
from typing import Any

import numpy as np
import orjson

from service.backends.onnx import Array
from service.errors import BadInputError, UnsupportedMediaTypeError

REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_NUMBER_TYPES = frozenset({float, int})
_JSON_NAMES = {
    bool: "booleans",
    str: "strings",
    type(None): "nulls",
    list: "nested lists",
    dict: "objects",
}


def require_json(content_type: str | None) -> None:
    """Accept application/json (any charset) or a missing header; refuse everything else."""
    if content_type is None:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaTypeError(f"expected application/json, got {media or 'nothing'}")


def load_json(body: bytes) -> Any:
    if not body:
        raise BadInputError("the request body is empty")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadInputError(f"malformed JSON: {exc}") from exc


def to_batch(values: Any, *, features: int, max_batch: int, what: str = "inputs") -> Array:
    """A list of instances (or one flat instance) → float32 [n, features], checked."""
    rows = _rows(values, what)
    if len(rows) > max_batch:
        raise BadInputError(f"batch of {len(rows)} instances is over the limit of {max_batch}")
    array = _numbers(rows, what)
    if array.shape[1] != features:
        raise BadInputError(f"each instance must have {features} numbers, got {array.shape[1]}")
    return finite_float32(array, what=what)


def to_tensor(values: Any, *, shape: tuple[int, int], what: str = "data") -> Array:
    """OIP tensor data, flat (row-major) or nested one level → float32 of `shape`."""
    rows = _rows(values, what)
    if len({len(row) for row in rows}) != 1:
        raise BadInputError(f"`{what}` rows must all have the same length")
    array = _numbers(rows, what)
    if array.size != shape[0] * shape[1]:
        raise BadInputError(
            f"`{what}` holds {array.size} values; shape {list(shape)} needs {shape[0] * shape[1]}"
        )
    return finite_float32(array.reshape(shape), what=what)


def _rows(values: Any, what: str) -> list[Any]:
    if not isinstance(values, list):
        raise BadInputError(f"`{what}` must be a list of numbers or a list of lists")
    if not values:
        raise BadInputError(f"`{what}` is empty: send at least one instance")
    return values if isinstance(values[0], list) else [values]


def _numbers(rows: list[Any], what: str) -> np.ndarray:
    """Strings, booleans, nulls and deeper nesting are refused rather than coerced."""
    try:
        # JSON gives float, int, bool, str, None, list or dict; type() is exact, so a
        # bool is not taken for an int.
        found = set(map(type, chain.from_iterable(rows)))
    except TypeError:
        raise BadInputError(f"`{what}` must be all numbers or all lists of numbers") from None
    if not found <= _NUMBER_TYPES:
        names = sorted(_JSON_NAMES.get(t, t.__name__) for t in found - _NUMBER_TYPES)
        raise BadInputError(f"`{what}` must contain only numbers (got {', '.join(names)})")
    try:
        return np.array(rows, dtype=np.float64)
    except OverflowError:
        raise BadInputError(f"`{what}` contains a value too large for float32") from None
    except ValueError:
        raise BadInputError(f"`{what}` rows must all have the same length") from None


def finite_float32(array: np.ndarray, *, what: str) -> Array:
    with np.errstate(over="ignore", invalid="ignore"):
        x = array.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise BadInputError(f"`{what}` contains NaN, Inf or a value too large for float32")
    return np.ascontiguousarray(x)


def check_request_ids(ids: Any, count: int) -> list[str] | None:
    if ids is None:
        return None
    if not isinstance(ids, list) or len(ids) != count:
        raise BadInputError(f"`request_ids` must be a list of {count} strings, one per instance")
    for value in ids:
        if not isinstance(value, str) or not REQUEST_ID.match(value):
            raise BadInputError(
                "each request id must be 1-128 characters of letters, digits, . _ : -"
            )
    if len(set(ids)) != count:
        raise BadInputError("`request_ids` must be unique within a request")
    return list(ids)


def check_routing_key(key: Any) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str) or not 0 < len(key) <= 256:
        raise BadInputError("`routing_key` must be a string of 1-256 characters")
    return key
