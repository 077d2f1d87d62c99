"""The distillation loss against numbers computable by hand, and the trainers' contracts."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.training.distill import distill, kd_loss, torch_threads, train_classifier
from service.training.models import MLP


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: one thread avoids pool start-up and contention on busy CI hosts."""
    with torch_threads(1):
        yield


def _batch(n: int = 12, k: int = 5, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn((n, k), generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn((n, k), generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, k, (n,), generator=gen)
    labels[::3] = -1  # every third row is unlabelled logged traffic
    return student, teacher, labels


def _soft(student: Tensor, teacher: Tensor, t: float) -> Tensor:
    """Per-row T² · KL(p_t ‖ p_s), written out from the definition."""
    p_t, p_s = torch.softmax(teacher / t, 1), torch.softmax(student / t, 1)
    return t * t * (p_t * (p_t.log() - p_s.log())).sum(1)


def test_loss_is_invariant_to_a_constant_added_to_any_logit_row() -> None:
    student, teacher, labels = _batch()
    gen = torch.Generator().manual_seed(1)
    shift_s = torch.randn((len(student), 1), generator=gen, dtype=torch.float64) * 50
    shift_t = torch.randn((len(student), 1), generator=gen, dtype=torch.float64) * 50
    before = kd_loss(student, teacher, labels, temperature=3.0, alpha=0.4)
    after = kd_loss(student + shift_s, teacher + shift_t, labels, temperature=3.0, alpha=0.4)
    assert after.item() == pytest.approx(before.item(), abs=1e-10)


def test_soft_term_is_t_squared_times_kl_on_a_hand_example() -> None:
    student = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[3.0, 1.0, 0.0]], dtype=torch.float64)
    t = 2.0
    p_t = [math.exp(v / t) for v in (3.0, 1.0, 0.0)]
    p_s = [math.exp(v / t) for v in (1.0, 2.0, 3.0)]
    p_t, p_s = [v / sum(p_t) for v in p_t], [v / sum(p_s) for v in p_s]
    kl = sum(a * math.log(a / b) for a, b in zip(p_t, p_s, strict=True))

    loss = kd_loss(student, teacher, torch.tensor([-1]), temperature=t)

    assert loss.item() == pytest.approx(t * t * kl, rel=1e-12)
    # d/ds [T² KL] = T (p_s - p_t): the T² factor cancels the 1/T² the softened
    # softmax puts on the gradient, so its size does not collapse as T grows.
    torch.autograd.backward(loss)
    assert student.grad is not None
    expected = [t * (b - a) for a, b in zip(p_t, p_s, strict=True)]
    assert student.grad[0].tolist() == pytest.approx(expected, rel=1e-10)


def test_alpha_one_is_cross_entropy_and_alpha_zero_is_pure_distillation() -> None:
    student, teacher, labels = _batch()
    labels = labels.clamp(min=0)  # all rows labelled
    ce = F.cross_entropy(student, labels)
    assert kd_loss(student, teacher, labels, temperature=4.0, alpha=1.0).item() == pytest.approx(
        ce.item(), rel=1e-12
    )
    soft = _soft(student, teacher, 4.0).mean()
    assert kd_loss(student, teacher, labels, temperature=4.0, alpha=0.0).item() == pytest.approx(
        soft.item(), rel=1e-12
    )


def test_unlabelled_rows_contribute_only_the_soft_term() -> None:
    student, teacher, labels = _batch()
    t, alpha = 2.5, 0.7
    unl, lab = labels < 0, labels >= 0
    n_unl, n_lab = int(unl.sum()), int(lab.sum())
    assert n_unl > 0
    assert n_lab > 0
    unlabelled_only = kd_loss(student[unl], teacher[unl], labels[unl], temperature=t, alpha=alpha)
    # Unlabelled rows: pure soft loss, whatever alpha is.
    assert unlabelled_only.item() == pytest.approx(_soft(student[unl], teacher[unl], t).mean())
    assert unlabelled_only.item() == pytest.approx(
        kd_loss(student[unl], teacher[unl], labels[unl], temperature=t, alpha=0.0).item()
    )
    labelled_only = kd_loss(student[lab], teacher[lab], labels[lab], temperature=t, alpha=alpha)
    hard = F.cross_entropy(student[lab], labels[lab])
    soft = _soft(student[lab], teacher[lab], t).mean()
    assert labelled_only.item() == pytest.approx((alpha * hard + (1 - alpha) * soft).item())
    # A mixed batch is the row-weighted mean of the two.
    mixed = kd_loss(student, teacher, labels, temperature=t, alpha=alpha)
    expected = (n_lab * labelled_only + n_unl * unlabelled_only) / len(labels)
    assert mixed.item() == pytest.approx(expected.item(), rel=1e-12)


def test_shuffling_rows_together_keeps_the_loss_and_misaligning_them_changes_it() -> None:
    student, teacher, labels = _batch(n=20)
    order = torch.randperm(20, generator=torch.Generator().manual_seed(3))
    base = kd_loss(student, teacher, labels).item()
    assert kd_loss(student[order], teacher[order], labels[order]).item() == pytest.approx(
        base, rel=1e-12
    )
    assert kd_loss(student, teacher[order], labels).item() != pytest.approx(base, rel=1e-3)


@pytest.mark.parametrize(
    ("labels", "kwargs"),
    [
        (torch.tensor([0, 5]), {}),  # class 5 does not exist with K = 3
        (torch.tensor([0, -2]), {}),
        (torch.tensor([0, 1]), {"temperature": 0.0}),
        (torch.tensor([0, 1]), {"alpha": 1.5}),
        (torch.tensor([0, 1]), {"alpha": torch.tensor([0.5, 1.2])}),
        (torch.tensor([0, 1]), {"alpha": torch.tensor([0.5])}),
        (torch.tensor([0, 1]), {"weights": torch.tensor([1.0, -1.0])}),
        (torch.tensor([0, 1]), {"weights": torch.tensor([0.0, 0.0])}),
        (torch.tensor([0, 1]), {"weights": torch.tensor([1.0, math.inf])}),
    ],
)
def test_bad_arguments_are_refused(labels: Tensor, kwargs: dict[str, Any]) -> None:
    logits = torch.zeros((2, 3))
    with pytest.raises(ValueError, match=r"labels|temperature|alpha|weights"):
        kd_loss(logits, logits, labels, **kwargs)


def _soft_gradient(student: Tensor, teacher: Tensor, t: float) -> Tensor:
    leaf = student.detach().clone().requires_grad_(True)
    unlabelled = torch.full((len(student),), -1)
    torch.autograd.backward(kd_loss(leaf, teacher, unlabelled, temperature=t))
    assert leaf.grad is not None
    return leaf.grad


def test_t_squared_keeps_the_soft_gradient_from_vanishing_as_t_grows() -> None:
    """As T grows, T·(p_s - p_t) tends to ((s - mean s) - (t - mean t)) / K, so with the
    T² factor the soft gradient converges to that limit, with an error shrinking as 1/T.
    (Without the factor it would shrink as 1/T² and drown under the hard term.)"""
    student, teacher, _ = _batch(n=6, k=5)
    n, k = student.shape
    centred = (student - student.mean(1, keepdim=True)) - (teacher - teacher.mean(1, keepdim=True))
    limit = centred / (k * n)  # the loss is a mean over n rows
    errors = [
        float((_soft_gradient(student, teacher, t) - limit).abs().max() / limit.abs().max())
        for t in (100.0, 1_000.0, 10_000.0)
    ]
    assert errors[0] < 0.1  # already close to the limit: the gradient has not vanished
    assert errors[1] / errors[0] == pytest.approx(0.1, rel=0.05)
    assert errors[2] / errors[1] == pytest.approx(0.1, rel=0.05)


def test_per_row_alpha_mixes_each_row_by_its_own_weight() -> None:
    student, teacher, labels = _batch()
    labels = labels.clamp(min=0)  # all rows labelled
    t = 3.0
    constant = torch.full((len(labels),), 0.25, dtype=torch.float64)
    assert kd_loss(student, teacher, labels, temperature=t, alpha=constant).item() == (
        pytest.approx(kd_loss(student, teacher, labels, temperature=t, alpha=0.25).item())
    )
    # alpha 1 on even rows, 0 on odd rows: CE on the even rows, soft loss on the odd ones.
    alternate = (torch.arange(len(labels)) % 2 == 0).to(torch.float64)
    hard = F.cross_entropy(student, labels, reduction="none")
    soft = _soft(student, teacher, t)
    expected = torch.where(alternate > 0, hard, soft).mean()
    got = kd_loss(student, teacher, labels, temperature=t, alpha=alternate)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)


def test_integer_weights_count_a_row_that_many_times() -> None:
    student, teacher, labels = _batch(n=9)
    weights = torch.tensor([1, 2, 0, 3, 1, 1, 2, 1, 4], dtype=torch.float64)
    repeated = torch.repeat_interleave(torch.arange(9), weights.long())
    expected = kd_loss(student[repeated], teacher[repeated], labels[repeated], alpha=0.3)
    got = kd_loss(student, teacher, labels, alpha=0.3, weights=weights)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    ones = torch.ones(9, dtype=torch.float64)
    assert kd_loss(student, teacher, labels, weights=ones).item() == pytest.approx(
        kd_loss(student, teacher, labels).item(), rel=1e-12
    )


class _Echo(nn.Module):
    """Logits = the input itself. Its one parameter gets a zero gradient, so Adam never
    moves anything and every epoch's loss is the loss of the same fixed logits."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.0 * self.unused


def _logged_rows(n: int = 50, k: int = 4) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(request ids, student logits as inputs, teacher logits, labels), row i about id i."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn((n, k), generator=gen) * 2
    teacher = torch.randn((n, k), generator=gen) * 3
    labels = torch.randint(0, k, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < 0.6] = -1
    return torch.arange(n), x, teacher, labels


def _epoch_losses(x: Tensor, teacher: Tensor, labels: Tensor, **kwargs: Any) -> list[float]:
    options: dict[str, Any] = {"temperature": 2.0, "alpha": 0.4, "epochs": 3, "batch_size": 7}
    return distill(_Echo(), teacher, x, labels, lr=0.1, seed=4, **(options | kwargs))


def test_a_shuffled_loader_keeps_inputs_logits_and_labels_of_one_request_together() -> None:
    """Rows joined by request id and handed over in any order train exactly as the
    aligned set: each epoch (shuffled 7-row batches) has the loss of the aligned rows."""
    ids, x, teacher, labels = _logged_rows()
    aligned = kd_loss(x, teacher, labels, temperature=2.0, alpha=0.4).item()
    # The same rows in another order (as a database may return them), kept together by id.
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(5))
    by_id = {int(i): j for j, i in enumerate(ids[order])}
    back = torch.tensor([by_id[int(i)] for i in ids])
    assert torch.equal(ids[order][back], ids)
    losses = _epoch_losses(x[order], teacher[order], labels[order])
    assert losses == pytest.approx([aligned] * 3, rel=1e-5)
    # Pairing by position after one side was reordered gives another loss: the check bites.
    misaligned = kd_loss(x, teacher[order], labels, temperature=2.0, alpha=0.4).item()
    assert misaligned != pytest.approx(aligned, rel=1e-2)
    assert _epoch_losses(x, teacher[order], labels) == pytest.approx([misaligned] * 3, rel=1e-5)


def test_per_row_alpha_and_weights_travel_with_their_rows() -> None:
    _, x, teacher, labels = _logged_rows()
    alpha = torch.linspace(0.0, 1.0, len(x))
    weights = torch.linspace(0.5, 2.0, len(x))
    expected = kd_loss(x, teacher, labels, temperature=2.0, alpha=alpha, weights=weights).item()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(6))
    # One batch holding every row: the weighted mean is then the whole set's.
    losses = _epoch_losses(
        x[order], teacher[order], labels[order], alpha=alpha[order].numpy(),
        weights=weights[order].numpy(), batch_size=len(x),
    )  # fmt: skip
    assert losses == pytest.approx([expected] * 3, rel=1e-5)


def test_a_temperature_schedule_sets_each_epochs_temperature() -> None:
    _, x, teacher, labels = _logged_rows()
    schedule = [4.0, 2.0, 1.0]
    losses = _epoch_losses(x, teacher, labels, temperature=schedule)
    expected = [kd_loss(x, teacher, labels, temperature=t, alpha=0.4).item() for t in schedule]
    assert losses == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="one value per epoch"):
        _epoch_losses(x, teacher, labels, temperature=[4.0, 2.0])


def _toy(seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((96, 6), generator=gen)
    return x, (x[:, 0] > x[:, 1]).long()


def _train_pair(x: Tensor, y: Tensor) -> Tensor:
    torch.manual_seed(0)
    teacher = MLP(6, [8], 2)
    train_classifier(teacher, x, y, epochs=3, lr=1e-2, batch_size=16, seed=5)
    student = MLP(6, [4], 2)
    labels = y.clone()
    labels[::2] = -1
    distill(
        student,
        teacher(x).detach(),
        x.numpy(),
        labels.numpy(),
        temperature=2.0,
        alpha=0.5,
        epochs=3,
        lr=1e-2,
        batch_size=16,
        seed=5,
    )
    return torch.cat([p.detach().flatten() for p in student.parameters()])


def test_trainers_are_deterministic_given_the_seed() -> None:
    x, y = _toy()
    assert torch.equal(_train_pair(x, y), _train_pair(x, y))


def test_trainers_leave_the_global_rng_and_thread_count_alone() -> None:
    x, y = _toy()
    model = MLP(6, [8], 2)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    train_classifier(model, x, y, epochs=2, lr=1e-2, batch_size=16, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.get_num_threads() == threads


def test_training_reports_progress_and_learns() -> None:
    x, y = _toy()
    seen: list[tuple[int, int, float]] = []
    model = MLP(6, [16], 2)
    history = train_classifier(
        model,
        x,
        y,
        epochs=20,
        lr=1e-2,
        batch_size=32,
        seed=0,
        progress=lambda e, total, loss: seen.append((e, total, loss)),
    )
    assert [(e, total) for e, total, _ in seen] == [(e, 20) for e in range(1, 21)]
    assert history == [loss for _, _, loss in seen]
    assert history[-1] < history[0] / 2
    assert not model.training


def test_torch_threads_restores_the_previous_count() -> None:
    before = torch.get_num_threads()
    with torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
