"""Recalibration: fit the student's serving temperature on recent data (METRICS.md "Actions").

T minimises the NLL over log T ∈ [ln 0.05, ln 20] on matured labelled predictions (those
whose labels the label check keeps, `jobs.label_check`), or, with too few labels, the
cross-entropy to the teacher's probabilities on teacher-observed traffic (each row
weighted by 1/π so the fit speaks for all traffic). The rows are split
80/20 at random: fit on 80, judge on 20. The new T is accepted only if the held-out NLL
improves and the held-out ECE (15 equal-width bins) does not worsen; with the teacher as
the reference, NLL is the cross-entropy to q and ECE compares confidence with q[ŷs], the
teacher's probability that the student's answer is right.

The body changes nothing: the runner activates an accepted `temperature` for `version`
and records it in the temperature history.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeVar

import numpy as np

from service.errors import UnprocessableError
from service.jobs.context import JobContext
from service.jobs.label_check import LabelPolicy, check_labels
from service.monitoring.metrics import (
    CELLS,
    CalibrationStats,
    confidence_bin,
    expected_calibration_error,
)
from service.persistence.samples import (
    FloatArray,
    IntArray,
    LabelledSample,
    Maturity,
    Scope,
    matured_labelled,
    serving,
    shadow_pairs,
)
from service.registry import Manifest
from service.training.temperature import DEFAULT_BOUNDS, fit_temperature, golden_section
from service.training.temperature import log_softmax as log_softmax_at
from service.training.temperature import nll as nll_at

Options = TypeVar("Options")


def options_from_params(cls: type[Options], params: Mapping[str, Any]) -> Options:
    """Build a frozen options dataclass from job params, checking names and types.

    Unknown keys and values of the wrong type are a ValueError naming them; an int is
    accepted where a float is expected, a two-item list where a pair is.
    """
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} parameter(s): {unknown}; known: {sorted(names)}")
    values = {}
    for key, value in params.items():
        if not _matches(value, hints[key]):
            raise ValueError(f"parameter {key!r} must be {_describe(hints[key])}, got {value!r}")
        values[key] = tuple(value) if isinstance(value, list) else value
    options: Options = cls(**values)
    return options


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is Literal:
        return value in args
    if origin is tuple:
        return (
            isinstance(value, list | tuple)
            and len(value) == len(args)
            and all(_matches(v, a) for v, a in zip(value, args, strict=True))
        )
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    return hint.__name__ if type(hint) is type else str(hint).replace("typing.", "")


@dataclass(frozen=True)
class RecalibrateOptions:
    window_s: float = 7 * 86_400.0  # how far back to read predictions
    bucket_s: float = 3_600.0  # windows whose maturity decides whether their labels count
    min_labels: int = 200  # fewer matured labels → fit to the teacher instead
    min_pairs: int = 200  # fewer teacher-observed pairs too → the job fails
    holdout: float = 0.2
    seed: int = 0
    bounds: tuple[float, float] = DEFAULT_BOUNDS
    max_rows: int = 200_000  # newest rows used at most
    temperature: float | None = None  # the T_s in force (default: serving state, manifest)

    def __post_init__(self) -> None:
        low, high = self.bounds
        checks = {
            "window_s": self.window_s > 0,
            "bucket_s": self.bucket_s > 0,
            "min_labels": self.min_labels >= 2,
            "min_pairs": self.min_pairs >= 2,
            "holdout": 0.0 < self.holdout < 1.0,
            "bounds": DEFAULT_BOUNDS[0] <= low < high <= DEFAULT_BOUNDS[1],
            "max_rows": self.max_rows >= 2,
            "temperature": self.temperature is None
            or DEFAULT_BOUNDS[0] <= self.temperature <= DEFAULT_BOUNDS[1],
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"recalibration parameter(s) out of range: {bad}")


class Judgement(NamedTuple):
    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float


def run(ctx: JobContext) -> dict[str, Any]:
    options = options_from_params(RecalibrateOptions, ctx.params)
    manifest = ctx.registry.active_manifest(ctx.model, "student")
    current = serving_temperature(ctx, manifest, options.temperature)
    scope = Scope(
        ctx.model, manifest.version, ctx.now - options.window_s, ctx.now, manifest.temperature
    )
    monitoring = ctx.settings.monitoring
    maturity = Maturity(
        options.bucket_s, monitoring.label_completeness_target, monitoring.label_delay_horizon_s
    )
    rng = np.random.default_rng(options.seed)
    ctx.report(0.05, "reading matured labelled predictions")
    with ctx.database.connect() as connection:
        labelled = matured_labelled(connection, scope, maturity, limit=options.max_rows)
        labelled, label_check = _checked(ctx, labelled, manifest.num_classes)
        if len(labelled) >= options.min_labels:
            source = "labels"
            ctx.report(0.4, f"fitting T on {len(labelled)} matured labels")
            fit, hold = _split(len(labelled), options.holdout, rng)
            judgement = _with_labels(labelled.logits, labelled.labels, fit, hold, current, options)
        else:
            ctx.report(0.2, f"{len(labelled)} matured labels: reading teacher-observed traffic")
            pairs = shadow_pairs(connection, scope, with_probs=True)
            if len(pairs) < options.min_pairs:
                raise UnprocessableError(
                    f"too few samples to recalibrate {ctx.model} version {manifest.version}: "
                    f"{len(labelled)} matured labels (need {options.min_labels}; "
                    f"{label_check['labels'] - label_check['used']} left out by the label "
                    f"check) and "
                    f"{len(pairs)} teacher-observed pairs (need {options.min_pairs}) since "
                    f"{scope.start:.0f}"
                )
            source = "teacher"
            ctx.report(0.4, f"fitting T to the teacher on {len(pairs)} pairs")
            assert pairs.student_logits is not None and pairs.teacher_probs is not None
            fit, hold = _split(len(pairs), options.holdout, rng)
            targets = pairs.teacher_probs / pairs.teacher_probs.sum(axis=1, keepdims=True)
            judgement = _with_teacher(
                pairs.student_logits, targets, pairs.weight, fit, hold, current, options
            )
    ctx.report(0.9, "judging the fit on held-out rows")
    reason = _rejection(judgement)
    accepted = reason is None
    return {
        "accepted": accepted,
        "version": manifest.version,
        "temperature": judgement.temperature if accepted else current,
        "previous_temperature": current,
        "fitted_temperature": judgement.temperature,
        "source": source,
        "n_fit": len(fit),
        "n_holdout": len(hold),
        "nll_before": judgement.nll_before,
        "nll_after": judgement.nll_after,
        "ece_before": judgement.ece_before,
        "ece_after": judgement.ece_after,
        "reason": reason,
        "label_check": label_check,
        "window": {"start": scope.start, "end": scope.end},
        "matured_windows": labelled.matured_buckets,
        "windows": labelled.buckets,
    }


def serving_temperature(ctx: JobContext, manifest: Manifest, given: float | None) -> float:
    """The student's T_s now: as passed, else the serving state's for this version, else
    the manifest's."""
    if given is not None:
        return given
    with ctx.database.connect() as connection:
        state = serving(connection, ctx.model)
    if state is not None and state.student_version == manifest.version:
        return state.temperature
    return manifest.temperature


def _checked(
    ctx: JobContext, labelled: LabelledSample, num_classes: int
) -> tuple[LabelledSample, dict[str, Any]]:
    """The labelled rows the label check keeps (`jobs.label_check`), and its report."""
    check = check_labels(
        labelled.labels,
        labelled.clients,
        labelled.teacher_labels,
        num_classes=num_classes,
        policy=LabelPolicy.from_settings(ctx.settings.feedback),
    )
    if check.report["used"] < check.report["labels"]:
        ctx.report(0.1, "; ".join(check.report["notes"]))
    return labelled.take(check.keep), check.report


def _split(n: int, holdout: float, rng: np.random.Generator) -> tuple[IntArray, IntArray]:
    order = rng.permutation(n)
    n_hold = min(max(1, round(holdout * n)), n - 1)
    return order[n_hold:], order[:n_hold]


def _with_labels(
    z: FloatArray,
    y: IntArray,
    fit: IntArray,
    hold: IntArray,
    current: float,
    options: RecalibrateOptions,
) -> Judgement:
    fitted = fit_temperature(z[fit], y[fit], bounds=options.bounds)

    def ece(temperature: float) -> float:
        probs = np.exp(log_softmax_at(z[hold], temperature))
        return CalibrationStats.from_arrays(probs, y[hold]).ece()

    return Judgement(
        fitted,
        nll_at(z[hold], y[hold], current),
        nll_at(z[hold], y[hold], fitted),
        ece(current),
        ece(fitted),
    )


def _with_teacher(
    z: FloatArray,
    q: FloatArray,
    w: FloatArray,
    fit: IntArray,
    hold: IntArray,
    current: float,
    options: RecalibrateOptions,
) -> Judgement:
    """Weighted cross-entropy to q, and ECE with q[ŷs] in place of correctness."""

    def cross_entropy(rows: IntArray, temperature: float) -> float:
        per_row = -(q[rows] * log_softmax_at(z[rows], temperature)).sum(axis=1)
        return float(np.average(per_row, weights=w[rows]))

    low, high = options.bounds
    log_t = golden_section(
        lambda v: cross_entropy(fit, math.exp(v)), math.log(low), math.log(high), tol=1e-6
    )
    fitted = min(max(math.exp(log_t), low), high)

    def ece(temperature: float) -> float:
        p = np.exp(log_softmax_at(z[hold], temperature))
        c = p.max(axis=1)
        expected_correct = q[hold][np.arange(len(hold)), p.argmax(axis=1)]
        cell = confidence_bin(c)
        return expected_calibration_error(
            np.bincount(cell, weights=w[hold], minlength=CELLS),
            np.bincount(cell, weights=w[hold] * expected_correct, minlength=CELLS),
            np.bincount(cell, weights=w[hold] * c.astype(np.float32), minlength=CELLS),
        )

    return Judgement(
        fitted,
        cross_entropy(hold, current),
        cross_entropy(hold, fitted),
        ece(current),
        ece(fitted),
    )


def _rejection(judgement: Judgement) -> str | None:
    """Why the fit is rejected, or None: NLL must improve and ECE must not worsen."""
    if not judgement.nll_after < judgement.nll_before:
        return (
            f"held-out NLL did not improve ({judgement.nll_before:.6f} → {judgement.nll_after:.6f})"
        )
    if judgement.ece_after > judgement.ece_before:
        return f"held-out ECE worsened ({judgement.ece_before:.6f} → {judgement.ece_after:.6f})"
    return None
