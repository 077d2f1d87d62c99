"""The bundled digits build, end to end: train, distil, calibrate, export, register."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from service.backends.onnx import load_onnx_model
from service.demo.digits import MAX_PARITY, digits_splits, ensure_digits
from service.registry import Manifest, ModelRegistry

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Built:
    registry: ModelRegistry
    messages: list[str]
    teacher: Manifest
    student: Manifest


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """One build for the whole module, through `ensure_digits` on an empty registry."""
    registry = ModelRegistry(tmp_path_factory.mktemp("registry"))
    messages: list[str] = []
    assert ensure_digits(registry, progress=messages.append) is True
    return Built(
        registry=registry,
        messages=messages,
        teacher=registry.active_manifest("digits-teacher", "teacher"),
        student=registry.active_manifest("digits", "student"),
    )


def test_accuracies_meet_their_targets(built: Built) -> None:
    meta = built.student.metadata
    assert meta["teacher_accuracy"] >= 0.95
    assert meta["student_accuracy"] >= 0.90
    assert meta["agreement"] >= 0.90
    assert meta["student_params"] < 1_500 < meta["teacher_params"]
    assert meta["splits"] == digits_splits(seed=0).sizes()
    assert built.teacher.metadata["teacher_accuracy"] == meta["teacher_accuracy"]


def test_both_versions_load_and_reproduce_the_reported_accuracy(built: Built) -> None:
    test = digits_splits(seed=0).test
    for manifest, key in ((built.teacher, "teacher_accuracy"), (built.student, "student_accuracy")):
        model = load_onnx_model(built.registry, manifest)
        accuracy = float(np.mean(model.logits(test.x).argmax(axis=1) == test.y))
        assert accuracy == pytest.approx(manifest.metadata[key], abs=1e-9)


def test_manifests_describe_the_models(built: Built) -> None:
    assert (built.teacher.role, built.student.role) == ("teacher", "student")
    for manifest in (built.teacher, built.student):
        assert manifest.class_names == tuple(str(d) for d in range(10))
        assert (manifest.input.name, manifest.input.features) == ("input", 64)
        assert manifest.output_name == "logits"
        assert manifest.metadata["teacher_parity"] < MAX_PARITY
        assert manifest.metadata["student_parity"] < MAX_PARITY
    assert built.teacher.temperature == 1.0
    fitted = built.student.metadata["student_temperature"]
    assert built.student.temperature == built.student.reference_temperature == fitted
    assert 0.05 <= fitted <= 20.0
    assert (
        built.student.metadata["student_validation_nll"]
        <= built.student.metadata["student_validation_nll_t1"]
    )
    assert built.student.metadata["teacher"] == f"digits-teacher/{built.teacher.version}"


def test_progress_is_reported_through_the_callback(built: Built) -> None:
    assert any(m.startswith("training teacher (epoch 1/") for m in built.messages)
    assert any(m.startswith("distilling student (epoch") for m in built.messages)
    assert built.messages[-1].startswith("registered ")


def test_ensure_digits_does_not_build_twice(built: Built) -> None:
    assert ensure_digits(built.registry) is False
    assert len(built.registry.versions("digits", "student")) == 1
    assert len(built.registry.versions("digits-teacher", "teacher")) == 1
