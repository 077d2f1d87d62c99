"""Pure numpy helpers on class probabilities (no HTTP, SQL or Prometheus here)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float32]


def softmax(logits: Array, temperature: float = 1.0) -> Array:
    """Row-wise softmax of logits / T, stable against large logits."""
    z = logits / np.float32(temperature) if temperature != 1.0 else logits
    # z - max allocates a fresh array, so exponentiating it in place is safe.
    shifted = z - z.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    out: Array = shifted.astype(np.float32, copy=False)
    return out


def normalized_entropy(probs: Array) -> Array:
    """H = -Σ p ln p / ln K, in [0, 1]; 0 log 0 is taken as 0."""
    k = probs.shape[1]
    safe = np.where(probs > 0, probs, 1.0)
    h = -(probs * np.log(safe)).sum(axis=1) / np.log(k)
    out: Array = np.clip(h, 0.0, 1.0).astype(np.float32, copy=False)
    return out


def all_finite(values: Array) -> bool:
    return bool(np.isfinite(values).all())
