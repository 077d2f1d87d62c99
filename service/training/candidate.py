"""A candidate student for re-distillation: its starting point, the recipe, its export."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from service.training.distill import Progress, distill
from service.training.export import export_onnx, onnx_parity
from service.training.models import (
    MLP,
    load_weight_arrays,
    mlp_from_architecture,
    predict_logits,
)
from service.training.recipe import (
    annealed_temperatures,
    class_balance_weights,
    confidence_alphas,
)


@dataclass(frozen=True)
class Recipe:
    """How a candidate is trained (defaults: the issue's default recipe).

    `final_temperature` anneals T geometrically from `temperature` over the epochs;
    `confidence_weighting` replaces the fixed alpha on labelled rows with
    `recipe.confidence_alphas`; `class_balancing` weighs rows by `class_balance_weights`.
    """

    temperature: float = 2.0
    final_temperature: float | None = None
    alpha: float = 0.5
    confidence_weighting: bool = False
    class_balancing: bool = False
    epochs: int = 40
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    seed: int = 0


def initial_student(
    spec: Mapping[str, Any], weights: Mapping[str, npt.ArrayLike] | None, *, seed: int
) -> MLP:
    """The architecture `spec` with `weights` loaded (warm start), or freshly initialised
    from `seed` when there are none. Leaves the global RNG as it found it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = mlp_from_architecture(spec)
    if weights is not None:
        load_weight_arrays(model, weights)
    model.eval()
    return model


def train_student(
    student: MLP,
    x: npt.ArrayLike,
    teacher_logits: npt.ArrayLike,
    labels: npt.ArrayLike,
    recipe: Recipe,
    progress: Progress | None = None,
) -> list[float]:
    """Distil `teacher_logits` (log-probabilities are fine) into `student`, in place.

    Row i of `x`, `teacher_logits` and `labels` (-1: unlabelled) is one example.
    Returns the mean loss of each epoch.
    """
    z, y = np.asarray(teacher_logits, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    alpha: float | npt.NDArray[np.float64] = recipe.alpha
    if recipe.confidence_weighting:
        alpha = confidence_alphas(z, y, recipe.alpha)
    return distill(
        student,
        z,
        np.asarray(x, dtype=np.float32),
        y,
        temperature=annealed_temperatures(
            recipe.temperature, recipe.final_temperature, recipe.epochs
        ),
        alpha=alpha,
        weights=class_balance_weights(z, y) if recipe.class_balancing else None,
        epochs=recipe.epochs,
        lr=recipe.lr,
        batch_size=recipe.batch_size,
        seed=recipe.seed,
        weight_decay=recipe.weight_decay,
        progress=progress,
    )


def logits_of(model: MLP, x: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """The model's logits for float32 inputs x, as numpy."""
    inputs = torch.tensor(np.asarray(x, dtype=np.float32))
    return predict_logits(model, inputs).numpy()


def export_student(
    model: MLP, *, input_name: str, output_name: str, probe: npt.ArrayLike
) -> tuple[bytes, float]:
    """ONNX bytes of `model` and max |torch - ONNX Runtime| over the logits of `probe`."""
    data = export_onnx(model, model.features, input_name=input_name, output_name=output_name)
    return data, onnx_parity(model, data, np.asarray(probe, dtype=np.float32))
