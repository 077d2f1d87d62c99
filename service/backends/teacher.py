"""The teacher seam: anything that turns a float32 batch into class probabilities.

Teacher answers are untrusted input: every backend passes its output through
`validate_probabilities`, and any defect is a `TeacherError` with a fixed reason.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

from service.backends.onnx import Array, OnnxModel
from service.errors import TeacherError
from service.monitoring.probabilities import softmax

TEACHER_ERROR_REASONS = (
    "timeout", "connect", "http_status", "malformed", "wrong_shape", "wrong_classes",
    "non_finite", "invalid_probabilities", "circuit_open", "queue_full", "shutdown", "internal",
)  # fmt: skip


class TeacherBackend(Protocol):
    @property
    def version(self) -> str: ...

    async def probabilities(self, x: Array, timeout_s: float) -> Array:
        """Probabilities [n, K] for x [n, features]; raises TeacherError on any failure."""
        ...

    async def warm_up(self, features: int) -> None:
        """Make the first real call cheap (connections, lazy imports); may raise TeacherError."""
        ...

    async def aclose(self) -> None: ...


def validate_probabilities(
    values: Array, *, rows: int, num_classes: int, are_logits: bool
) -> Array:
    """Check a teacher output's shape and values; convert logits to probabilities."""
    if values.ndim != 2 or values.shape[0] != rows:
        raise TeacherError(
            "wrong_shape", f"teacher returned shape {values.shape}, {rows} rows expected"
        )
    if values.shape[1] != num_classes:
        raise TeacherError(
            "wrong_classes", f"teacher returned {values.shape[1]} classes, {num_classes} expected"
        )
    if not np.isfinite(values).all():
        raise TeacherError("non_finite", "teacher output contains NaN or Inf")
    if are_logits:
        return softmax(values)
    if (values < -1e-6).any() or (np.abs(values.sum(axis=1) - 1.0) > 1e-3).any():
        raise TeacherError("invalid_probabilities", "teacher probabilities do not sum to 1")
    return values.astype(np.float32, copy=False)


class LocalTeacher:
    """An ONNX teacher from the registry.

    Small calls run on the event loop: ONNX Runtime releases the GIL inside every student
    call, so a teacher thread waiting for the GIL turns each request into a thread switch,
    which costs far more than a small teacher's compute. The teacher times itself at load
    (a fixed cost plus a cost per row) and runs a call inline when it is expected to take
    at most `inline_max_s`; larger calls go to a thread pool sized to the dispatcher's
    concurrency cap, so even calls whose caller gave up never overlap beyond it.
    """

    def __init__(self, model: OnnxModel, *, threads: int, inline_max_s: float) -> None:
        self._model = model
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kdguard-teacher")
        self._inline_max_s = inline_max_s
        self.fixed_s, self.per_row_s = _calibrate(model)

    @property
    def version(self) -> str:
        return self._model.version

    def runs_inline(self, rows: int) -> bool:
        return self.fixed_s + self.per_row_s * rows <= self._inline_max_s

    async def probabilities(self, x: Array, timeout_s: float) -> Array:
        try:
            if self.runs_inline(len(x)):
                logits = self._model.logits(x)
            else:
                async with asyncio.timeout(timeout_s):
                    loop = asyncio.get_running_loop()
                    logits = await loop.run_in_executor(self._pool, self._model.logits, x)
        except TimeoutError as exc:
            raise TeacherError("timeout", f"local teacher exceeded {timeout_s:.3f}s") from exc
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise TeacherError("internal", f"local teacher failed: {exc}") from exc
        scaled = logits / np.float32(self._model.manifest.temperature)
        return validate_probabilities(
            scaled, rows=x.shape[0], num_classes=self._model.manifest.num_classes, are_logits=True
        )

    async def warm_up(self, features: int) -> None:
        return None  # calibration at construction already ran the model

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _calibrate(model: OnnxModel, *, rows: int = 32, repeats: int = 7) -> tuple[float, float]:
    """(fixed seconds, seconds per row) of one call, from the fastest of a few runs."""
    rng = np.random.default_rng(0)
    features = model.manifest.input.features
    timings = []
    for n in (1, rows):
        x = rng.standard_normal((n, features)).astype(np.float32)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            model.logits(x)
            best = min(best, time.perf_counter() - started)
        timings.append(best)
    per_row = max((timings[1] - timings[0]) / (rows - 1), 0.0)
    return max(timings[0] - per_row, 0.0), per_row
