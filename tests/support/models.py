"""Tiny ONNX classifiers built directly with onnx.helper: logits = x @ W + b.

With W = k·[I | 0] (features ≥ classes), an input with value a in feature 0 and zeros
elsewhere gives logits [k·a, 0, ...], so a test can dial the student's confidence exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.registry import InputSpec, Manifest, ModelRegistry

FEATURES = 4
CLASSES = 3


def linear_onnx(
    weight: npt.NDArray[np.float32], bias: npt.NDArray[np.float32], *, input_name: str = "input"
) -> bytes:
    features, classes = weight.shape
    graph = helper.make_graph(
        [helper.make_node("Gemm", [input_name, "W", "b"], ["logits"])],
        "linear",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=[
            numpy_helper.from_array(weight.astype(np.float32), "W"),
            numpy_helper.from_array(bias.astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


def diagonal_weights(
    scale: float, *, features: int = FEATURES, classes: int = CLASSES
) -> npt.NDArray[np.float32]:
    weight = np.zeros((features, classes), np.float32)
    weight[np.arange(classes), np.arange(classes)] = scale
    return weight


def register_linear(
    registry: ModelRegistry,
    *,
    name: str,
    role: str,
    scale: float = 4.0,
    temperature: float = 1.0,
    permute: bool = False,
    activate: bool = True,
) -> Manifest:
    """A diagonal linear model; `permute` rotates its classes so it disagrees."""
    weight = diagonal_weights(scale)
    if permute:
        weight = np.roll(weight, 1, axis=1)
    manifest = registry.register(
        name=name,
        role=role,  # type: ignore[arg-type]
        model=linear_onnx(weight, np.zeros(CLASSES, np.float32)),
        input=InputSpec(name="input", features=FEATURES),
        output_name="logits",
        class_names=[f"class-{i}" for i in range(CLASSES)],
        temperature=temperature,
    )
    if activate:
        registry.set_active(name, role, manifest.version)  # type: ignore[arg-type]
    return manifest


def instance(value: float, cls: int = 0) -> list[float]:
    """One input whose logit for `cls` is scale·value and 0 elsewhere."""
    row = [0.0] * FEATURES
    row[cls] = value
    return row


def make_tiny_registry(root: Path) -> ModelRegistry:
    registry = ModelRegistry(root)
    register_linear(registry, name="tiny", role="student", scale=4.0)
    register_linear(registry, name="tiny-teacher", role="teacher", scale=8.0)
    return registry
