"""Model registry: atomic versions, checksums, validation, safe names."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.backends.onnx import load_onnx_model
from service.errors import ModelValidationError, NotFoundError
from service.registry import InputSpec, Manifest, ModelRegistry
from service.registry.store import WEIGHTS_FILE, decode_weights, encode_weights
from tests.support.models import diagonal_weights, linear_onnx, register_linear

TRAVERSAL_NAMES = [
    "..", "../etc", "a/b", "/etc/passwd", "..\\x", ".hidden", "", "x" * 65, "a\x00b",
    "%2e%2e", "~root", "a b", "v1/../../x",
]  # fmt: skip


def test_versions_are_numbered_and_the_newest_is_the_default(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    first = register_linear(registry, name="m", role="student", activate=False)
    second = register_linear(registry, name="m", role="student", activate=False)
    assert (first.version, second.version) == ("1", "2")
    assert registry.active_manifest("m", "student").version == "2"
    registry.set_active("m", "student", "1")
    assert registry.active_manifest("m", "student").version == "1"
    assert [m.version for m in registry.versions("m")] == ["1", "2"]


def test_a_registered_version_loads_and_predicts(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    manifest = register_linear(registry, name="m", role="student", scale=2.0)
    model = load_onnx_model(registry, manifest)
    logits = model.logits(np.array([[1.0, 0, 0, 0]], np.float32))
    assert logits.tolist() == [[2.0, 0.0, 0.0]]


def test_checksum_mismatch_is_refused(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    manifest = register_linear(registry, name="m", role="student")
    path = registry.model_path(manifest)
    path.write_bytes(linear_onnx(diagonal_weights(9.0), np.zeros(3, np.float32)))
    with pytest.raises(ModelValidationError, match="checksum"):
        load_onnx_model(registry, manifest)


def test_truncated_model_is_refused(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    good = linear_onnx(diagonal_weights(1.0), np.zeros(3, np.float32))
    manifest = registry.register(
        name="m", role="student", model=good[: len(good) // 2],
        input=InputSpec("input", 4), output_name="logits", class_names="abc",
    )  # fmt: skip
    with pytest.raises(ModelValidationError, match="not a valid ONNX model"):
        load_onnx_model(registry, manifest)


@pytest.mark.parametrize(
    ("spec", "output", "classes", "message"),
    [
        (InputSpec("x", 4), "logits", "abc", "input is named"),
        (InputSpec("input", 5), "logits", "abc", "does not match"),
        (InputSpec("input", 4), "probs", "abc", "has no output"),
        (InputSpec("input", 4), "logits", "abcd", "outputs 3 classes"),
    ],
)
def test_wrong_input_or_output_spec_is_refused(
    tmp_path: Path, spec: InputSpec, output: str, classes: str, message: str
) -> None:
    registry = ModelRegistry(tmp_path)
    manifest = registry.register(
        name="m", role="student", model=linear_onnx(diagonal_weights(1.0), np.zeros(3, np.float32)),
        input=spec, output_name=output, class_names=classes,
    )  # fmt: skip
    with pytest.raises(ModelValidationError, match=message):
        load_onnx_model(registry, manifest)


@pytest.mark.parametrize("name", TRAVERSAL_NAMES)
def test_names_cannot_escape_the_registry(tmp_path: Path, name: str) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    register_linear(registry, name="m", role="student")
    with pytest.raises(NotFoundError):
        registry.manifest("m", name)
    with pytest.raises(NotFoundError):
        registry.manifest(name, "1")


def test_a_tampered_manifest_naming_another_version_is_refused(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    register_linear(registry, name="m", role="student")
    manifest_path = tmp_path / "m" / "1" / "manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace('"version": "1"', '"version": "2"'))
    with pytest.raises(ModelValidationError, match="another version"):
        registry.manifest("m", "1")


def test_set_active_checks_the_role(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    register_linear(registry, name="m", role="teacher", activate=False)
    with pytest.raises(ModelValidationError, match="not a student"):
        registry.set_active("m", "student", "1")


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "net.0.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "net.0.bias": np.zeros(3, np.float32),
    }


def _register_with(
    registry: ModelRegistry,
    *,
    extra_files: dict[str, bytes],
    metadata: dict[str, Any] | None = None,
) -> Manifest:
    return registry.register(
        name="m", role="student", model=linear_onnx(diagonal_weights(1.0), np.zeros(3, np.float32)),
        input=InputSpec("input", 4), output_name="logits", class_names="abc",
        extra_files=extra_files, metadata=metadata,
    )  # fmt: skip


def test_weights_are_stored_with_the_version_and_read_back_exactly(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    stored = _weights()
    manifest = _register_with(
        registry, extra_files={WEIGHTS_FILE: encode_weights(stored)}, metadata={"a": 1}
    )
    assert set(manifest.metadata) == {"a", "files"}
    assert (tmp_path / "m" / "1" / WEIGHTS_FILE).is_file()
    # Read through a fresh manifest from disk, as another process would.
    loaded = registry.load_weights(registry.manifest("m", "1"))
    assert loaded is not None
    assert set(loaded) == set(stored)
    for key, value in stored.items():
        assert loaded[key].dtype == np.float32
        assert np.array_equal(loaded[key], value)


def test_a_version_without_weights_has_none(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    manifest = register_linear(registry, name="m", role="student")
    assert registry.load_weights(manifest) is None
    assert registry.read_extra(manifest, WEIGHTS_FILE) is None


def test_changed_or_missing_weights_are_refused(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    manifest = _register_with(registry, extra_files={WEIGHTS_FILE: encode_weights(_weights())})
    path = tmp_path / "m" / "1" / WEIGHTS_FILE
    path.write_bytes(encode_weights({"net.0.bias": np.ones(3, np.float32)}))
    with pytest.raises(ModelValidationError, match="checksum"):
        registry.load_weights(manifest)
    path.unlink()
    with pytest.raises(ModelValidationError, match="cannot read"):
        registry.load_weights(manifest)


def test_pickled_arrays_are_never_loaded(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, w=np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a weights archive"):
        decode_weights(buffer.getvalue())
    registry = ModelRegistry(tmp_path)
    manifest = _register_with(registry, extra_files={WEIGHTS_FILE: buffer.getvalue()})
    with pytest.raises(ModelValidationError, match="unreadable weights"):
        registry.load_weights(manifest)


def test_empty_or_non_finite_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="no weights"):
        encode_weights({})
    with pytest.raises(ValueError, match="finite float32"):
        decode_weights(encode_weights({"w": np.array([1.0, np.nan], np.float32)}))
    with pytest.raises(ValueError, match="not a weights archive"):
        decode_weights(b"")


@pytest.mark.parametrize(
    "file",
    ["model.onnx", "manifest.json", "reference.json", "../x.npz", "w.pkl", ".w.npz", "W.npz"],
)
def test_extra_file_names_are_checked(tmp_path: Path, file: str) -> None:
    registry = ModelRegistry(tmp_path)
    with pytest.raises(ModelValidationError, match="extra file name"):
        _register_with(registry, extra_files={file: b"{}"})
    assert not (tmp_path / "m" / "1").exists()


def test_metadata_cannot_forge_the_file_sums(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    with pytest.raises(ModelValidationError, match="written by the registry"):
        _register_with(
            registry, extra_files={WEIGHTS_FILE: b"x"}, metadata={"files": {WEIGHTS_FILE: "0"}}
        )
