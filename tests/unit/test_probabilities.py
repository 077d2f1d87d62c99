"""Softmax and normalised entropy against references no one here wrote."""

from __future__ import annotations

import numpy as np
from scipy.special import softmax as scipy_softmax
from scipy.stats import entropy

from service.monitoring.probabilities import normalized_entropy, softmax


def test_softmax_matches_scipy_at_any_temperature_and_survives_huge_logits() -> None:
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((500, 10)) * 5).astype(np.float32)
    for t in (0.5, 1.0, 1.283, 4.0):
        np.testing.assert_allclose(
            softmax(logits, t), scipy_softmax(logits / t, axis=1), rtol=1e-5, atol=1e-7
        )
    huge = np.array([[1e4, 0.0, -1e4]], np.float32)
    assert softmax(huge).tolist() == [[1.0, 0.0, 0.0]]


def test_normalized_entropy_matches_scipy_and_handles_zeros() -> None:
    rng = np.random.default_rng(1)
    probs = softmax((rng.standard_normal((500, 10)) * 3).astype(np.float32))
    probs[0] = 0.0
    probs[0, 3] = 1.0
    probs[1] = 0.1
    h = normalized_entropy(probs)
    np.testing.assert_allclose(h, entropy(probs, axis=1) / np.log(10), atol=1e-6)
    assert h[0] == 0.0
    assert abs(h[1] - 1.0) < 1e-6
    assert ((h >= 0.0) & (h <= 1.0)).all()
