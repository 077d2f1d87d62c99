"""The detectors on real digits: quiet on clean held-out digits, firing on noise and
occlusion in the first window (the demo's drift phases)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from service.backends.onnx import OnnxModel, load_onnx_model
from service.demo.digits import build_digits, digits_splits
from service.demo.traffic import add_noise, occlude
from service.monitoring.metrics import DriftStats, EntropyReference, FlipStats
from service.monitoring.probabilities import normalized_entropy, softmax
from service.registry import ModelRegistry

pytestmark = pytest.mark.slow

Models = tuple[OnnxModel, OnnxModel, EntropyReference]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    registry = ModelRegistry(Path(tmp_path_factory.mktemp("digits")) / "registry")
    build = build_digits(registry)
    stored = registry.load_reference(build.student)
    assert stored is not None and stored[1] == "validation"  # saved by the build
    return (
        load_onnx_model(registry, build.student),
        load_onnx_model(registry, build.teacher),
        EntropyReference.fit(np.asarray(stored[0])),
    )


def window(models: Models, transform: Callable[[np.ndarray], np.ndarray]) -> tuple[str, str]:
    """(entropy drift state, flip rate state) for one window of the test split."""
    student, teacher, reference = models
    x = transform(np.asarray(digits_splits().test.x)).astype(np.float32)
    p = softmax(student.logits(x), student.manifest.temperature)
    q = softmax(teacher.logits(x), teacher.manifest.temperature)
    h = normalized_entropy(softmax(student.logits(x), student.manifest.reference_temperature))
    drift = DriftStats.from_arrays(h, reference).result(reference, min_n=100)
    # Every row observed by the teacher (pi = 1): the plain flip rate, judged at 5%.
    flips = FlipStats.from_arrays(p, q, np.ones(len(x)), np.ones(len(x), bool)).result(0.05)
    return drift.state, flips.state


def test_clean_held_out_digits_raise_no_alarm(models: Models) -> None:
    assert window(models, lambda x: x) == ("ok", "ok")


@pytest.mark.parametrize(
    "transform",
    [
        lambda x: add_noise(x, 0.35, np.random.default_rng(0)),
        lambda x: occlude(x, 1.0, np.random.default_rng(0)),
    ],
    ids=["noise", "occlusion"],
)
def test_noise_and_occlusion_fire_in_the_first_window(
    models: Models, transform: Callable[[np.ndarray], np.ndarray]
) -> None:
    drift, flips = window(models, transform)
    assert drift == "alert"
    assert flips == "alert"
