"""Helpers shared by the metric tests: synthetic data, random chunking, field-wise equality."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import reduce
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from service.monitoring.probabilities import softmax

S = TypeVar("S")
Floats = npt.NDArray[np.float32]


def random_chunks(n: int, rng: np.random.Generator, pieces: int = 6) -> list[npt.NDArray[np.int64]]:
    """Row indices of `n` rows split at random cut points; one chunk is always empty."""
    order = rng.permutation(n)  # chunks are not contiguous: merging must not care about order
    cuts = np.sort(rng.integers(0, n + 1, size=pieces - 1))
    chunks = np.split(order, cuts)
    return [np.array([], dtype=np.int64), *chunks]


def merge_all(parts: Sequence[S], empty: S, merge: Callable[[S, S], S]) -> S:
    return reduce(merge, parts, empty)


def assert_same_stats(a: Any, b: Any, rtol: float = 1e-9) -> None:
    """Every field equal: integers exactly, floats to `rtol` (sums in a different order)."""
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        left, right = np.asarray(getattr(a, f.name)), np.asarray(getattr(b, f.name))
        assert left.shape == right.shape, f.name
        if np.issubdtype(left.dtype, np.integer):
            np.testing.assert_array_equal(left, right, err_msg=f.name)
        else:
            np.testing.assert_allclose(left, right, rtol=rtol, atol=1e-9, err_msg=f.name)


def random_probs(rng: np.random.Generator, n: int, k: int = 10, scale: float = 3.0) -> Floats:
    """Float32 softmax rows of Gaussian logits; larger `scale` means more confident rows."""
    return softmax((rng.standard_normal((n, k)) * scale).astype(np.float32))


def sample_labels(rng: np.random.Generator, probs: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    """One label per row drawn from the row's own distribution: perfectly calibrated labels."""
    cumulative = np.cumsum(np.asarray(probs, dtype=np.float64), axis=1)
    u = rng.random((probs.shape[0], 1)) * cumulative[:, -1:]
    out: npt.NDArray[np.int64] = (u > cumulative).sum(axis=1).astype(np.int64)
    return out


def assert_same_value(a: Any, b: Any, rtol: float = 1e-9) -> None:
    """Two MetricValues agree: value, interval, state and every detail (NaN equal to NaN)."""
    assert (a.name, a.n, a.state, a.threshold) == (b.name, b.n, b.state, b.threshold)
    for x, y in ((a.value, b.value), (a.ci_low, b.ci_low), (a.ci_high, b.ci_high)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-12, equal_nan=True)
    assert a.details.keys() == b.details.keys()
    for key in a.details:
        left, right = np.asarray(a.details[key]), np.asarray(b.details[key])
        np.testing.assert_allclose(left, right, rtol, 1e-12, equal_nan=True, err_msg=key)
