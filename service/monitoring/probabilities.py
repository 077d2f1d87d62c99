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
    # p·ln(max(p, tiny)) is exactly 0 where p is 0, with no NaN to mask afterwards.
    logs = np.log(np.maximum(probs, np.float32(1e-30)))
    h = np.einsum("ij,ij->i", probs, logs)
    h *= np.float32(-1.0 / np.log(probs.shape[1]))
    out: Array = np.minimum(h, np.float32(1.0), out=h)
    return out
