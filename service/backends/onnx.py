"""ONNX Runtime execution of one registered model version.

`load_onnx_model` is the only way a version gets into memory: it verifies the checksum,
runs the ONNX checker, checks the input spec against the manifest and does a warm-up run
that must produce finite logits of the right shape. A version that fails any step raises
`ModelValidationError` and never reaches traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort

from service.errors import ModelValidationError
from service.registry import Manifest, ModelRegistry

Array = npt.NDArray[np.float32]

_WARMUP_ROWS = (1, 8)


@dataclass(frozen=True)
class OnnxModel:
    """A loaded, validated ONNX model that maps float32 [n, features] to logits [n, K]."""

    manifest: Manifest
    session: ort.InferenceSession
    input_name: str
    output_name: str

    @property
    def version(self) -> str:
        return self.manifest.version

    def logits(self, x: Array) -> Array:
        out = self.session.run([self.output_name], {self.input_name: x})[0]
        return np.asarray(out, dtype=np.float32)


def load_onnx_model(registry: ModelRegistry, manifest: Manifest, *, threads: int = 1) -> OnnxModel:
    """Verify, load and warm one version. Raises ModelValidationError on any defect."""
    data = registry.read_verified(manifest)
    try:
        onnx.checker.check_model(onnx.load_model_from_string(data))
    except Exception as exc:  # the checker raises several unrelated types
        raise ModelValidationError(f"{_label(manifest)} is not a valid ONNX model: {exc}") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelValidationError(f"{_label(manifest)} cannot be loaded: {exc}") from exc
    model = OnnxModel(
        manifest=manifest,
        session=session,
        input_name=_check_input(session, manifest),
        output_name=_check_output(session, manifest),
    )
    _warm_up(model)
    return model


def _check_input(session: ort.InferenceSession, manifest: Manifest) -> str:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelValidationError(f"{_label(manifest)} must take one input, takes {len(inputs)}")
    spec, found = manifest.input, inputs[0]
    if found.name != spec.name:
        raise ModelValidationError(
            f"{_label(manifest)} input is named {found.name!r}, manifest says {spec.name!r}"
        )
    if found.type != "tensor(float)":
        raise ModelValidationError(f"{_label(manifest)} input type is {found.type}, not float32")
    shape = list(found.shape)
    if len(shape) != 2 or shape[1] != spec.features:
        raise ModelValidationError(
            f"{_label(manifest)} input shape {shape} does not match [batch, {spec.features}]"
        )
    return str(found.name)


def _check_output(session: ort.InferenceSession, manifest: Manifest) -> str:
    outputs = {o.name: o for o in session.get_outputs()}
    found = outputs.get(manifest.output_name)
    if found is None:
        raise ModelValidationError(
            f"{_label(manifest)} has no output {manifest.output_name!r} (has {sorted(outputs)})"
        )
    last = found.shape[-1] if found.shape else None
    if isinstance(last, int) and last != manifest.num_classes:
        raise ModelValidationError(
            f"{_label(manifest)} outputs {last} classes, manifest lists {manifest.num_classes}"
        )
    return manifest.output_name


def _warm_up(model: OnnxModel) -> None:
    rng = np.random.default_rng(0)
    for rows in _WARMUP_ROWS:
        x = rng.standard_normal((rows, model.manifest.input.features)).astype(np.float32)
        try:
            logits = model.logits(x)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelValidationError(f"{_label(model.manifest)} failed warm-up: {exc}") from exc
        if logits.shape != (rows, model.manifest.num_classes):
            raise ModelValidationError(
                f"{_label(model.manifest)} warm-up gave shape {logits.shape}, "
                f"expected {(rows, model.manifest.num_classes)}"
            )
        if not np.isfinite(logits).all():
            raise ModelValidationError(f"{_label(model.manifest)} warm-up gave non-finite logits")


def _label(manifest: Manifest) -> str:
    return f"model {manifest.name}/{manifest.version}"


def input_spec_of(data: bytes) -> tuple[str, int, str]:
    """Read (input name, feature count, first output name) from an ONNX file's bytes."""
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (first,) = session.get_inputs()
    features = first.shape[1]
    if not isinstance(features, int):
        raise ModelValidationError("the input's feature dimension must be fixed")
    return str(first.name), features, str(session.get_outputs()[0].name)
