"""The local ONNX teacher: correct probabilities, inline for small calls, threads for big."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from service.backends.onnx import OnnxModel, load_onnx_model
from service.backends.teacher import LocalTeacher
from service.registry import ModelRegistry
from tests.support.models import register_linear


@pytest.fixture
def model(tmp_path: Path) -> OnnxModel:
    registry = ModelRegistry(tmp_path)
    manifest = register_linear(registry, name="t", role="teacher", scale=8.0)
    return load_onnx_model(registry, manifest)


class ThreadSpy:
    """Wraps a model and remembers which thread ran each call."""

    def __init__(self, model: OnnxModel) -> None:
        self.model = model
        self.manifest = model.manifest
        self.version = model.version
        self.threads: list[str] = []

    def logits(self, x: np.ndarray) -> np.ndarray:
        self.threads.append(threading.current_thread().name)
        return self.model.logits(x)


async def test_probabilities_are_a_softmax_of_the_logits(model: OnnxModel) -> None:
    teacher = LocalTeacher(model, threads=1, inline_max_s=1.0)
    probs = await teacher.probabilities(np.array([[1.0, 0, 0, 0]], np.float32), 1.0)
    expected = np.exp([8.0, 0.0, 0.0]) / np.exp([8.0, 0.0, 0.0]).sum()
    np.testing.assert_allclose(probs[0], expected, rtol=1e-5)
    await teacher.aclose()


async def test_small_calls_run_inline_and_large_ones_in_a_thread(model: OnnxModel) -> None:
    teacher = LocalTeacher(model, threads=1, inline_max_s=0.0)
    assert teacher.per_row_s >= 0 and teacher.fixed_s >= 0
    spy = ThreadSpy(model)
    teacher._model = spy  # type: ignore[assignment]
    x = np.zeros((4, 4), np.float32)
    await teacher.probabilities(x, 1.0)  # budget 0: every call goes to the pool
    teacher._inline_max_s = 1.0
    assert teacher.runs_inline(4)
    await teacher.probabilities(x, 1.0)
    assert spy.threads[0].startswith("kdguard-teacher")
    assert spy.threads[1] == threading.current_thread().name
    await teacher.aclose()


def test_the_cost_model_grows_with_rows(model: OnnxModel) -> None:
    teacher = LocalTeacher(model, threads=1, inline_max_s=0.0)
    teacher.fixed_s, teacher.per_row_s = 10e-6, 1e-6
    teacher._inline_max_s = 50e-6
    assert teacher.runs_inline(40)
    assert not teacher.runs_inline(41)
