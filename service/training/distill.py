"""Knowledge distillation: the loss, a plain classifier trainer and the KD trainer.

Both trainers take whole in-memory arrays and shuffle *indices*, so every row's input,
teacher logits and label are always looked up with the same index and stay aligned:
row i of `x`, row i of `teacher_logits` and entry i of `labels` describe one example.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ArrayLike = Tensor | npt.NDArray[Any]
Progress = Callable[[int, int, float], None]
"""Called after each epoch with (epoch, total epochs, mean training loss)."""

UNLABELLED = -1
"""Label value for rows that only have a teacher's soft targets (logged traffic)."""


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 2.0,
    alpha: float | Tensor = 0.5,
    weights: Tensor | None = None,
) -> Tensor:
    """Mean distillation loss over rows (Hinton et al., 2015).

    soft = T² · KL(softmax(t/T) ‖ softmax(s/T)) per row. Labelled rows (label ≥ 0) get
    alpha · CE(s, y) + (1 - alpha) · soft; unlabelled rows (label -1) get soft alone.
    The T² factor keeps the soft term's gradient the same order of magnitude as the hard
    term's whatever T is (the soft gradient shrinks as 1/T²).

    `alpha` may be one value per row; with `weights` (≥ 0, one per row) the mean is
    Σ w·loss / Σ w instead of the plain mean.
    """
    _check_kd_args(student_logits, teacher_logits, labels, temperature, alpha, weights)
    t = temperature
    # log-probabilities on both sides: stable, and log_softmax makes the loss invariant
    # to adding a constant to any row of either logit matrix.
    log_student = F.log_softmax(student_logits / t, dim=1)
    log_teacher = F.log_softmax(teacher_logits / t, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="none", log_target=True).sum(1)
    soft = (t * t) * kl
    labelled = labels >= 0
    # Unlabelled rows are clamped to class 0 only so cross_entropy accepts them;
    # torch.where then discards that value (and its gradient).
    hard = F.cross_entropy(student_logits, labels.clamp(min=0), reduction="none")
    per_row = torch.where(labelled, alpha * hard + (1.0 - alpha) * soft, soft)
    if weights is None:
        return per_row.mean()
    w = weights.to(per_row.dtype)
    return (w * per_row).sum() / w.sum()


def train_classifier(
    model: nn.Module,
    x: ArrayLike,
    y: ArrayLike,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 0.0,
    progress: Progress | None = None,
) -> list[float]:
    """Train `model` with cross-entropy and Adam; returns the mean loss of each epoch."""
    inputs, targets = _float_tensor(x), _long_tensor(y)
    _check_rows(inputs, targets=targets)
    if targets.min() < 0:
        raise ValueError("train_classifier needs a label for every row")

    def batch_loss(index: Tensor, _epoch: int) -> Tensor:
        return F.cross_entropy(model(inputs[index]), targets[index])

    return _fit(
        model,
        len(inputs),
        batch_loss,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        weight_decay=weight_decay,
        progress=progress,
    )


def distill(
    student: nn.Module,
    teacher_logits: ArrayLike,
    x: ArrayLike,
    labels: ArrayLike,
    *,
    temperature: float | Sequence[float],
    alpha: float | ArrayLike,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 0.0,
    weights: ArrayLike | None = None,
    progress: Progress | None = None,
) -> list[float]:
    """Distil precomputed teacher logits into `student` with `kd_loss` and Adam.

    `teacher_logits[i]`, `x[i]` and `labels[i]` must describe the same example (-1 where
    no label is known); so must `alpha[i]` and `weights[i]` when they are given per row.
    Batches are drawn by shuffled index, so every per-row array stays aligned.
    `temperature` is one value, or one per epoch (a schedule, e.g. annealing).
    Returns the mean loss of each epoch.
    """
    inputs, soft, hard = _float_tensor(x), _float_tensor(teacher_logits), _long_tensor(labels)
    _check_rows(inputs, targets=hard, logits=soft)
    schedule = _schedule(temperature, epochs)
    row_alpha = None if isinstance(alpha, float | int) else _float_tensor(alpha)
    row_weights = None if weights is None else _float_tensor(weights)
    for name, values in (("alpha", row_alpha), ("weights", row_weights)):
        if values is not None and values.shape != (len(inputs),):
            raise ValueError(f"{name} must have one value per row ({len(inputs)})")

    def batch_loss(index: Tensor, epoch: int) -> Tensor:
        return kd_loss(
            student(inputs[index]),
            soft[index],
            hard[index],
            temperature=schedule[epoch - 1],
            alpha=float(alpha) if row_alpha is None else row_alpha[index],
            weights=None if row_weights is None else row_weights[index],
        )

    return _fit(
        student,
        len(inputs),
        batch_loss,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        weight_decay=weight_decay,
        progress=progress,
    )


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block with torch's intra-op thread count set to `count`, then restore it.

    The setting is process-wide, so this is for offline jobs, not concurrent callers.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _fit(
    model: nn.Module,
    rows: int,
    batch_loss: Callable[[Tensor, int], Tensor],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float,
    progress: Progress | None,
) -> list[float]:
    """The shared minibatch loop: shuffle indices with a seeded generator, Adam steps.

    `batch_loss(index, epoch)` gets the batch's row indices and the 1-based epoch.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0 or weight_decay < 0:
        raise ValueError("epochs and batch_size must be ≥ 1, lr > 0 and weight_decay ≥ 0")
    shuffler = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    history: list[float] = []
    # fork_rng: seed whatever draws from the global RNG without leaking that into callers.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        for epoch in range(1, epochs + 1):
            order = torch.randperm(rows, generator=shuffler)
            total = 0.0
            for start in range(0, rows, batch_size):
                index = order[start : start + batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = batch_loss(index, epoch)
                torch.autograd.backward(loss)  # typed, unlike Tensor.backward
                optimizer.step()
                total += float(loss.item()) * len(index)
            history.append(total / rows)
            if progress is not None:
                progress(epoch, epochs, history[-1])
    model.eval()
    return history


def _schedule(temperature: float | Sequence[float], epochs: int) -> list[float]:
    if isinstance(temperature, float | int):
        return [float(temperature)] * max(epochs, 0)
    schedule = [float(t) for t in temperature]
    if len(schedule) != epochs:
        raise ValueError(f"a temperature schedule needs one value per epoch ({epochs})")
    return schedule


def _float_tensor(a: ArrayLike) -> Tensor:
    if isinstance(a, Tensor):
        return a.detach().to(torch.float32)
    # torch.tensor copies, so read-only numpy arrays are fine (as_tensor would warn).
    return torch.tensor(np.asarray(a), dtype=torch.float32)


def _long_tensor(a: ArrayLike) -> Tensor:
    if isinstance(a, Tensor):
        return a.detach().to(torch.int64)
    return torch.tensor(np.asarray(a), dtype=torch.int64)


def _check_rows(inputs: Tensor, *, targets: Tensor, logits: Tensor | None = None) -> None:
    if inputs.ndim != 2 or len(inputs) == 0:
        raise ValueError(f"x must be a non-empty [n, features] matrix, got {tuple(inputs.shape)}")
    if targets.shape != (len(inputs),):
        raise ValueError(f"labels must have shape ({len(inputs)},), got {tuple(targets.shape)}")
    if logits is not None and (logits.ndim != 2 or len(logits) != len(inputs)):
        raise ValueError(f"teacher logits must be [{len(inputs)}, K], got {tuple(logits.shape)}")


def _check_kd_args(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor,
    temperature: float,
    alpha: float | Tensor,
    weights: Tensor | None,
) -> None:
    if student.ndim != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} logits "
            "must be the same [n, K] shape"
        )
    if labels.shape != (student.shape[0],):
        raise ValueError(f"labels must have shape ({student.shape[0]},)")
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64, got {labels.dtype}")
    if labels.numel() and (labels.min() < UNLABELLED or labels.max() >= student.shape[1]):
        raise ValueError(f"labels must be -1 (unlabelled) or in [0, {student.shape[1]})")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = student.shape[0]
    if isinstance(alpha, Tensor):
        if alpha.shape != (n,):
            raise ValueError(f"a per-row alpha must have shape ({n},), got {tuple(alpha.shape)}")
        if alpha.numel() and not bool(((alpha >= 0) & (alpha <= 1)).all()):
            raise ValueError("alpha must be in [0, 1] on every row")
    elif not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if weights is not None:
        if weights.shape != (n,):
            raise ValueError(f"weights must have shape ({n},), got {tuple(weights.shape)}")
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError("weights must be finite and non-negative")
        if n and not float(weights.sum()) > 0:
            raise ValueError("weights must not all be zero")
