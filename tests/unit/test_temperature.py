"""Temperature scaling recovers known temperatures and respects its bounds."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest

from service.training.temperature import (
    fit_temperature,
    golden_section,
    log_softmax,
    nll,
    soft_cross_entropy,
)

Array = npt.NDArray[np.float64]


def _synthetic(true_t: float, n: int = 20_000, k: int = 10, seed: int = 0) -> tuple[Array, Array]:
    """Logits z and labels drawn from softmax(z / true_t): a model whose best T is known."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 3.0, size=(n, k))
    probs = np.exp(log_softmax(z, true_t))
    # Inverse-CDF sampling, one uniform draw per row.
    labels = (probs.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1)
    return z, np.minimum(labels, k - 1)


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_recovers_a_known_temperature_from_labels(true_t: float) -> None:
    z, y = _synthetic(true_t)
    fitted = fit_temperature(z, y)
    assert fitted == pytest.approx(true_t, rel=0.05)
    assert nll(z, y, fitted) <= nll(z, y, true_t) + 1e-12  # it is the in-sample optimum


@pytest.mark.parametrize("true_t", [0.3, 1.7, 6.0])
def test_target_probs_mode_recovers_the_temperature_exactly(true_t: float) -> None:
    z, _ = _synthetic(1.0, n=2_000)
    teacher_probs = np.exp(log_softmax(z, true_t))
    fitted = fit_temperature(z, target_probs=teacher_probs)
    # Cross-entropy to q is minimised exactly where softmax(z / T) = q.
    assert fitted == pytest.approx(true_t, rel=1e-5)
    assert soft_cross_entropy(z, teacher_probs, fitted) <= soft_cross_entropy(z, teacher_probs, 1.0)


def test_bounds_are_respected_at_both_ends() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0.0, 1.0, size=(2_000, 5))
    always_right = z.argmax(axis=1)  # wants T → 0: infinitely confident is best
    coin_flip = rng.integers(0, 5, size=2_000)  # labels ignore z: wants T → ∞
    low = fit_temperature(z, always_right, bounds=(0.5, 3.0))
    high = fit_temperature(z, coin_flip, bounds=(0.5, 3.0))
    assert 0.5 <= low <= 0.5 * (1 + 1e-5)
    assert 3.0 * (1 - 1e-5) <= high <= 3.0
    assert 0.05 <= fit_temperature(z, always_right) <= 0.06


def test_nll_matches_a_hand_computation() -> None:
    z = np.array([[0.0, math.log(3.0)]])  # softmax at T = 1: (1/4, 3/4)
    assert nll(z, np.array([1]), 1.0) == pytest.approx(-math.log(0.75))
    assert nll(z, np.array([0]), 1.0) == pytest.approx(-math.log(0.25))
    # At T = 2 the logits halve: softmax = (1, sqrt 3) / (1 + sqrt 3).
    assert nll(z, np.array([0]), 2.0) == pytest.approx(math.log(1 + math.sqrt(3.0)))


def test_golden_section_finds_the_minimum_of_a_parabola() -> None:
    found = golden_section(lambda v: (v - 0.3) ** 2, -2.0, 5.0, tol=1e-9)
    assert found == pytest.approx(0.3, abs=1e-8)


def test_argument_errors() -> None:
    z = np.zeros((3, 2))
    y = np.array([0, 1, 0])
    with pytest.raises(ValueError, match="not both"):
        fit_temperature(z, y, target_probs=np.full((3, 2), 0.5))
    with pytest.raises(ValueError, match="labels or target_probs"):
        fit_temperature(z)
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature(z, y, bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        fit_temperature(z, np.array([0, 2, 1]))
    with pytest.raises(ValueError, match="finite"):
        fit_temperature(np.array([[0.0, np.nan]]), np.array([0]))
    with pytest.raises(ValueError, match="sum to 1"):
        fit_temperature(z, target_probs=np.full((3, 2), 0.2))
