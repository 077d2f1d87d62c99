"""The model family the bundled demo and the re-distillation job train: plain MLPs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn


class MLP(nn.Module):
    """Linear+ReLU stack mapping float32 [n, features] to logits [n, classes].

    Kept to Linear and ReLU on purpose: every exporter handles them exactly, and the ONNX
    graph is a chain of Gemm/Relu that ONNX Runtime runs in microseconds.
    """

    def __init__(self, features: int, hidden: Sequence[int], classes: int) -> None:
        super().__init__()
        if features < 1 or classes < 2 or any(width < 1 for width in hidden):
            raise ValueError(
                f"bad MLP shape: features={features}, hidden={list(hidden)}, classes={classes}"
            )
        self.features = features
        self.hidden = tuple(hidden)
        self.classes = classes
        layers: list[nn.Module] = []
        width = features
        for out in self.hidden:
            layers += [nn.Linear(width, out), nn.ReLU()]
            width = out
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.net(x)
        return logits


def param_count(model: nn.Module) -> int:
    """Number of trainable scalars in a model."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor, *, batch_size: int = 4096) -> Tensor:
    """Logits for all rows of x in eval mode, without building a graph."""
    was_training = model.training
    model.eval()
    try:
        # An empty x still goes through the model once so the result has K columns.
        starts = range(0, len(x), batch_size) if len(x) else range(1)
        return torch.cat([model(x[start : start + batch_size]) for start in starts])
    finally:
        model.train(was_training)


ARCHITECTURE_FAMILY = "mlp"


def architecture(model: MLP) -> dict[str, Any]:
    """A JSON description of the model's shape, stored in a manifest's metadata."""
    return {
        "family": ARCHITECTURE_FAMILY,
        "features": model.features,
        "hidden": list(model.hidden),
        "classes": model.classes,
    }


def mlp_from_architecture(spec: Mapping[str, Any]) -> MLP:
    """A freshly initialised MLP of the shape `architecture` described."""
    if spec.get("family") != ARCHITECTURE_FAMILY:
        raise ValueError(f"unknown architecture family {spec.get('family')!r}")
    features, hidden, classes = spec.get("features"), spec.get("hidden"), spec.get("classes")
    if (
        not isinstance(features, int)
        or not isinstance(classes, int)
        or not isinstance(hidden, list)
        or not all(isinstance(width, int) for width in hidden)
    ):
        raise ValueError(f"malformed architecture {dict(spec)!r}")
    return MLP(features, hidden, classes)


def weight_arrays(model: nn.Module) -> dict[str, npt.NDArray[np.float32]]:
    """The model's parameters and buffers as float32 numpy arrays, by state-dict key."""
    return {
        key: value.detach().cpu().to(torch.float32).numpy().copy()
        for key, value in model.state_dict().items()
    }


def load_weight_arrays(model: nn.Module, arrays: Mapping[str, npt.ArrayLike]) -> None:
    """Load `weight_arrays` output into a model of the same shape; ValueError otherwise."""
    state = model.state_dict()
    if set(arrays) != set(state):
        raise ValueError(f"weights hold {sorted(arrays)}, the model expects {sorted(state)}")
    loaded: dict[str, Tensor] = {}
    for key, target in state.items():
        value = torch.tensor(np.asarray(arrays[key]), dtype=target.dtype)
        if value.shape != target.shape:
            raise ValueError(
                f"weights {key!r} have shape {tuple(value.shape)}, expected {tuple(target.shape)}"
            )
        loaded[key] = value
    model.load_state_dict(loaded)
