"""Where a re-distilled candidate starts: the serving student's own weights, or fresh.

Warm start needs the incumbent's trained weights (`weights.npz` in its registry version)
and its architecture (`metadata["architecture"]`). The weights are checked against the
serving ONNX before use; whatever is missing or off, the candidate starts from scratch
and the run manifest says why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from service.jobs.redistill_options import RedistillOptions
from service.registry import Manifest, ModelRegistry
from service.registry.store import WEIGHTS_FILE
from service.training.candidate import initial_student, logits_of
from service.training.models import MLP

Logits = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]

DEFAULT_HIDDEN = (32,)
"""The student's hidden layers when the incumbent does not say what it was."""
WARM_START_TOLERANCE = 1e-3
"""Largest |Δ logit| between the stored weights and the serving ONNX they claim to be."""


def starting_point(
    registry: ModelRegistry,
    incumbent: Manifest,
    serving_logits: Logits,
    probe: npt.NDArray[np.float32],
    options: RedistillOptions,
) -> tuple[MLP, dict[str, Any]]:
    """The incumbent's own weights when it has them and they reproduce its ONNX on
    `probe`; else a fresh model of its architecture (or `options.hidden`, or the default).
    Returns the model and a description of the start for the run manifest."""
    spec, reason = architecture_for(incumbent, options)
    if reason is None and not options.warm_start:
        reason = "warm start turned off"
    if reason is None:
        student, reason, gap = _warm(registry, incumbent, spec, serving_logits, probe, options)
        if student is not None:
            source = f"{incumbent.name}/{incumbent.version}"
            start = {"weights": True, "from": source, "architecture": spec}
            return student, start | {"max_abs_logit_diff": gap}
    fresh = initial_student(spec, None, seed=options.seed)
    note = f"trained from scratch: {reason}"
    return fresh, {"weights": False, "from": None, "architecture": spec, "note": note}


def _warm(
    registry: ModelRegistry,
    incumbent: Manifest,
    spec: dict[str, Any],
    serving_logits: Logits,
    probe: npt.NDArray[np.float32],
    options: RedistillOptions,
) -> tuple[MLP | None, str | None, float | None]:
    """(the incumbent's network, None, |Δ logit|) or (None, why not, ...)."""
    source = f"{incumbent.name}/{incumbent.version}"
    arrays = registry.load_weights(incumbent)
    if arrays is None:
        return None, f"{source} was stored without {WEIGHTS_FILE}", None
    try:
        student = initial_student(spec, arrays, seed=options.seed)
    except ValueError as exc:
        return None, f"{source}'s weights do not fit its architecture: {exc}", None
    gap = float(np.max(np.abs(logits_of(student, probe) - serving_logits(probe))))
    if gap <= WARM_START_TOLERANCE:
        return student, None, gap
    return None, f"{source}'s weights differ from its ONNX by {gap:.2e}", gap


def architecture_for(
    incumbent: Manifest, options: RedistillOptions
) -> tuple[dict[str, Any], str | None]:
    """The candidate's architecture, and why it cannot be the incumbent's (None: it is)."""
    stored = incumbent.metadata.get("architecture")
    asked = None if options.hidden is None else list(options.hidden)
    if isinstance(stored, dict) and asked in (None, stored.get("hidden")):
        return dict(stored), None
    spec = {
        "family": "mlp",
        "features": incumbent.input.features,
        "hidden": asked or list(DEFAULT_HIDDEN),
        "classes": incumbent.num_classes,
    }
    if isinstance(stored, dict):
        return spec, f"hidden={asked} differs from the incumbent's {stored.get('hidden')}"
    return spec, f"{incumbent.name}/{incumbent.version} records no architecture"
