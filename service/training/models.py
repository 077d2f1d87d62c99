"""The model family the bundled demo and the re-distillation job train: plain MLPs."""

from __future__ import annotations

from collections.abc import Sequence

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
