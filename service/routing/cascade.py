"""Pure cascade decisions: who answers and what to shadow (π: `records.inclusion_probability`)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

BoolArray = npt.NDArray[np.bool_]


def needs_teacher(confidence: npt.NDArray[np.float32], threshold: float) -> BoolArray:
    """Rows whose student confidence is below τ go to the teacher.

    A NaN confidence (a broken student output) compares False with everything, so it is
    sent to the teacher explicitly rather than served.
    """
    return np.asarray(~(confidence >= threshold))


def sample_shadow(low: BoolArray, shadow_rate: float, rng: np.random.Generator) -> BoolArray:
    """Confident rows drawn for a shadow teacher call with probability π₀ each."""
    if shadow_rate <= 0.0:
        return np.zeros_like(low)
    if shadow_rate >= 1.0:
        return ~low
    return np.asarray(~low & (rng.random(low.shape[0]) < shadow_rate))
