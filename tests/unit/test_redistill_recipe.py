"""The re-distillation recipe's numpy pieces and the job's options, by hand-checkable cases."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from service.jobs.redistill_options import RedistillOptions
from service.training.recipe import (
    PROB_FLOOR,
    annealed_temperatures,
    average_teacher_logits,
    class_balance_weights,
    confidence_alphas,
    logits_from_probs,
    logits_from_teacher,
    time_split,
)
from service.training.temperature import log_softmax


def _softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(z))


def test_logged_probabilities_become_logits_that_give_them_back() -> None:
    q = np.array([[0.7, 0.2, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25]])
    z = logits_from_probs(q.astype(np.float16))
    assert np.isfinite(z).all()
    assert z[0, 3] == pytest.approx(math.log(PROB_FLOOR))  # a stored 0 is floored, not -inf
    assert np.allclose(_softmax(z), q, atol=1e-3)  # float16 storage and the floor
    with pytest.raises(ValueError, match="non-negative"):
        logits_from_probs(np.array([[1.1, -0.1]]))


def test_a_teacher_run_here_gives_the_same_targets_as_its_logged_output() -> None:
    z = np.array([[4.0, 1.0, -2.0], [0.0, 3.0, 3.5]])
    t = 1.7
    logged = logits_from_probs(_softmax(z / t).astype(np.float16))
    run = logits_from_teacher(z, t)
    # Equal up to a per-row constant (none here: both are normalised log-probabilities).
    assert np.allclose(run, logged, atol=2e-3)
    assert np.allclose(_softmax(run), _softmax(z / t), atol=1e-12)


def test_averaging_teacher_versions_averages_their_probabilities() -> None:
    a = log_softmax(np.array([[3.0, 0.0, -1.0], [0.0, 0.0, 5.0]]))
    b = log_softmax(np.array([[0.0, 2.0, 0.0], [1.0, 1.0, 1.0]]))
    mean = average_teacher_logits([a, b])
    assert np.allclose(np.exp(mean), (np.exp(a) + np.exp(b)) / 2, atol=1e-12)
    assert np.allclose(average_teacher_logits([a, a]), a, atol=1e-12)
    # Log-probabilities far below exp's range still average exactly (no underflow to 0).
    far = average_teacher_logits([a - 1000.0, b - 1000.0])
    assert np.allclose(far, mean - 1000.0, atol=1e-9)
    with pytest.raises(ValueError, match="no teacher outputs"):
        average_teacher_logits([])


def test_temperature_annealing_is_geometric_from_start_to_final() -> None:
    assert annealed_temperatures(2.0, None, 3) == [2.0, 2.0, 2.0]
    schedule = annealed_temperatures(8.0, 1.0, 4)
    assert schedule == pytest.approx([8.0, 4.0, 2.0, 1.0])
    assert annealed_temperatures(4.0, 1.0, 1) == [4.0]
    with pytest.raises(ValueError, match="positive"):
        annealed_temperatures(2.0, 0.0, 3)


def test_confidence_weighting_leans_on_the_label_where_the_teacher_is_wrong() -> None:
    teacher = np.log(np.array([[1.0 - 2e-9, 1e-9, 1e-9], [0.5, 0.5, 1e-12], [0.2, 0.3, 0.5]]))
    labels = np.array([0, 2, -1])
    alphas = confidence_alphas(teacher, labels, alpha=0.3)
    # q[y] ≈ 1 → alpha; q[y] ≈ 0 → 1 (the label alone); unlabelled rows keep alpha.
    assert alphas == pytest.approx([0.3, 1.0, 0.3], abs=1e-8)
    assert confidence_alphas(teacher, labels, alpha=1.0) == pytest.approx([1.0, 1.0, 1.0])


def test_class_balancing_gives_each_class_the_same_total_weight() -> None:
    teacher = np.log(np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.6, 0.4]]))
    labels = np.array([0, -1, -1, 1])  # classes: 0 (label), 0 (teacher), 1, 1 (label)
    weights = class_balance_weights(teacher, labels)
    assert weights == pytest.approx([1.0, 1.0, 1.0, 1.0])
    skewed = class_balance_weights(teacher, np.array([0, 0, 0, 1]))
    assert skewed == pytest.approx([4 / 6, 4 / 6, 4 / 6, 2.0])
    assert skewed.mean() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("n", "sizes"),
    [
        (809, {"train": 566, "calibration": 81, "gate": 162}),
        (10, {"train": 7, "calibration": 1, "gate": 2}),
    ],
)
def test_the_time_split_keeps_the_newest_rows_for_the_gate(n: int, sizes: dict[str, int]) -> None:
    split = time_split(n, gate_fraction=0.2, calibration_fraction=0.1)
    assert split.sizes() == sizes
    assert split.train.start == 0 and split.gate.stop == n
    assert split.train.stop == split.calibration.start
    assert split.calibration.stop == split.gate.start


def test_options_default_to_the_recipe_of_the_issue() -> None:
    options = RedistillOptions.from_params({})
    assert (options.kd_temperature, options.alpha, options.gate_fraction) == (2.0, 0.5, 0.2)
    assert options.temperature is None and options.teacher_targets == "logged"
    knobs = (
        options.kd_temperature_final,
        options.confidence_weighting,
        options.class_balancing,
        options.average_teacher_versions,
    )
    assert knobs == (None, False, False, False)  # every knob off by default
    assert options.warm_start is True


def test_options_take_json_values() -> None:
    options = RedistillOptions.from_params(
        {"temperature": 2, "kd_temperature_final": None, "hidden": [32, 16], "epochs": 5}
    )
    assert options.temperature == 2.0 and isinstance(options.temperature, float)
    assert options.hidden == (32, 16)
    assert options.as_dict()["hidden"] == [32, 16]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"zeta": 1, "alpha": 0.2, "beta": 2}, "unknown re-distillation options: beta, zeta"),
        ({"epochs": True}, "'epochs'"),
        ({"epochs": 2.0}, "'epochs'"),
        ({"warm_start": "yes"}, "'warm_start'"),
        ({"kd_temperature": math.nan}, "'kd_temperature'"),
        ({"hidden": [16, "8"]}, "'hidden'"),
        ({"teacher_targets": "all"}, "'teacher_targets'"),
        ({"kd_temperature": 0}, "kd_temperature must be > 0"),
        ({"gate_fraction": 0.4, "calibration_fraction": 0.2}, "leave half the rows"),
        ({"min_rows": 5}, "min_rows"),
        ({"temperature": 50.0}, r"temperature must be in \[0.05, 20\]"),
    ],
)
def test_bad_options_are_refused_by_name(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RedistillOptions.from_params(params)
