"""ONNX export of a trained model, and the parity check that guards it."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch
from torch import nn

from service.training.models import predict_logits

OPSET = 17


def export_onnx(
    model: nn.Module,
    features: int,
    *,
    input_name: str = "input",
    output_name: str = "logits",
) -> bytes:
    """ONNX bytes of `model` (float32 [batch, features] → logits) with a dynamic batch axis.

    The model is left in eval mode. Uses the TorchScript-based exporter: torch 2.13's
    default dynamo exporter needs onnxscript, which we do not ship. It writes to a
    temporary file because torch 2.13 types `f` as a path (file objects are undocumented).
    """
    model.eval()
    example = torch.zeros((1, features), dtype=torch.float32)
    # The legacy exporter warns that it is deprecated on every call; under pytest's
    # warnings-as-errors that would fail the export itself, and the warning is no news.
    with tempfile.TemporaryDirectory(prefix="kdguard-export-") as folder:
        path = Path(folder) / "model.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (example,),
                path,
                dynamo=False,
                input_names=[input_name],
                output_names=[output_name],
                dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                opset_version=OPSET,
            )
        data = path.read_bytes()
    onnx.checker.check_model(onnx.load_model_from_string(data))
    return data


def onnx_logits(onnx_bytes: bytes, x: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """The first output of a one-input ONNX model for float32 inputs `x`, on the CPU."""
    inputs = np.ascontiguousarray(x, dtype=np.float32)
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    (onnx_input,) = session.get_inputs()
    return np.asarray(session.run(None, {onnx_input.name: inputs})[0], dtype=np.float32)


def onnx_parity(model: nn.Module, onnx_bytes: bytes, x: npt.NDArray[Any]) -> float:
    """Largest |torch logits - ONNX Runtime logits| over every entry for inputs `x`."""
    inputs = np.ascontiguousarray(x, dtype=np.float32)
    got = onnx_logits(onnx_bytes, inputs).astype(np.float64)
    expected = predict_logits(model, torch.tensor(inputs)).numpy().astype(np.float64)
    if got.shape != expected.shape:
        raise ValueError(f"ONNX output shape {got.shape} differs from torch {expected.shape}")
    return float(np.max(np.abs(got - expected))) if got.size else 0.0
