"""The re-distillation job's options: defaults from METRICS.md and the issue, checked.

Built from a job's `params` (trigger rule, admin API, CLI): unknown keys and values of
the wrong type are refused with a `ValueError` that names them.
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

TeacherTargets = Literal["logged", "run"]


@dataclass(frozen=True)
class RedistillOptions:
    """What one re-distillation does; every field can be set through the job's params.

    `temperature` is the incumbent's serving temperature when recalibration changed it
    after registration (the runner passes it); None means the manifest's.
    """

    temperature: float | None = None
    kd_temperature: float = 2.0
    kd_temperature_final: float | None = None  # knob: anneal T geometrically to this
    alpha: float = 0.5
    confidence_weighting: bool = False  # knob: recipe.confidence_alphas on labelled rows
    class_balancing: bool = False  # knob: recipe.class_balance_weights
    average_teacher_versions: bool = False  # knob: ensemble of the teacher versions logged
    teacher_targets: TeacherTargets = "logged"  # logged outputs where recorded, or "run" all
    gate_fraction: float = 0.2  # newest share of rows: the gate set
    calibration_fraction: float = 0.1  # the share before it: the temperature fit
    min_rows: int = 200
    min_calibration_labels: int = 50  # fewer: fit T to the teacher's probabilities instead
    window_s: float | None = None  # only inputs logged in the last window_s seconds
    max_rows: int = 200_000  # the newest rows at most
    epochs: int = 40
    lr: float = 3e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    seed: int = 0
    threads: int = 1  # torch and ONNX Runtime threads; small students train fastest on one
    warm_start: bool = True
    hidden: tuple[int, ...] | None = None  # another architecture: trains from scratch
    max_parity: float = 1e-4  # largest |Δ logit| between torch and ONNX Runtime

    def __post_init__(self) -> None:
        problems = [
            message
            for ok, message in (
                (
                    self.temperature is None or 0.05 <= self.temperature <= 20,
                    "temperature must be in [0.05, 20]",
                ),
                (self.kd_temperature > 0, "kd_temperature must be > 0"),
                (
                    self.kd_temperature_final is None or self.kd_temperature_final > 0,
                    "kd_temperature_final must be > 0",
                ),
                (0.0 <= self.alpha <= 1.0, "alpha must be in [0, 1]"),
                (0.0 < self.gate_fraction < 1.0, "gate_fraction must be in (0, 1)"),
                (0.0 < self.calibration_fraction < 1.0, "calibration_fraction must be in (0, 1)"),
                (
                    self.gate_fraction + self.calibration_fraction <= 0.5,
                    "gate_fraction + calibration_fraction must leave half the rows to train on",
                ),
                (self.min_rows >= 20, "min_rows must be ≥ 20"),
                (self.min_calibration_labels >= 1, "min_calibration_labels must be ≥ 1"),
                (self.window_s is None or self.window_s > 0, "window_s must be > 0"),
                (self.max_rows >= self.min_rows, "max_rows must be ≥ min_rows"),
                (1 <= self.epochs <= 10_000, "epochs must be in [1, 10000]"),
                (0 < self.lr <= 1, "lr must be in (0, 1]"),
                (self.batch_size >= 1, "batch_size must be ≥ 1"),
                (self.weight_decay >= 0, "weight_decay must be ≥ 0"),
                (self.seed >= 0, "seed must be ≥ 0"),
                (1 <= self.threads <= 64, "threads must be in [1, 64]"),
                (self.hidden is None or all(w >= 1 for w in self.hidden), "hidden widths ≥ 1"),
                (self.max_parity > 0, "max_parity must be > 0"),
            )
            if not ok
        ]
        if problems:
            raise ValueError("bad re-distillation options: " + "; ".join(problems))

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> RedistillOptions:
        """Options from a job's params; ValueError naming unknown keys or bad types."""
        hints = get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown re-distillation options: {', '.join(unknown)}")
        return cls(**{key: _coerce(key, hints[key], value) for key, value in params.items()})

    def as_dict(self) -> dict[str, Any]:
        """JSON-able, for the run manifest."""
        out = asdict(self)
        out["hidden"] = None if self.hidden is None else list(self.hidden)
        return out


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """`value` as the field's type, or ValueError. bool is never taken for a number."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(name, inner, value)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and _is_int(value):
        return value
    if hint is float and (_is_int(value) or isinstance(value, float)) and math.isfinite(value):
        return float(value)
    if origin is Literal and value in args:
        return value
    if origin is tuple and isinstance(value, list | tuple) and all(_is_int(v) for v in value):
        return tuple(value)
    raise ValueError(f"re-distillation option {name!r}: {value!r} is not a valid {_name(hint)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _name(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return " or ".join(repr(a) for a in get_args(hint))
    if get_origin(hint) is tuple:
        return "list of integers"
    return getattr(hint, "__name__", str(hint))
