"""Threshold retuning: choose τ from recent traffic and its teacher-observed pairs.

Modes (METRICS.md "Choosing τ", math in `service.routing.threshold`):
- budget: τ = the confidence quantile that sends `budget` of the traffic to the teacher;
- guarantee: the smallest teacher share with P(ŷs ≠ ŷt | c ≥ τ) ≤ ε at confidence 1 - δ.

Confidences are taken at the student's serving temperature now in force: rows served at
another T (before a recalibration) are rescored from their stored probabilities, because
τ will be compared with confidences at the current T. The body changes nothing: the
runner sets `fallback_threshold` and records the rest of the result with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Engine

from service.errors import UnprocessableError
from service.jobs.context import JobContext
from service.jobs.recalibrate import options_from_params, serving_temperature
from service.persistence.samples import (
    Scope,
    ShadowPairs,
    Traffic,
    serving,
    shadow_pairs,
    traffic,
)
from service.routing.threshold import (
    CURVE_SHARES,
    DEFAULT_STEP,
    CurvePoint,
    Sample,
    budget_threshold,
    cost_quality_curve,
    guarantee_threshold,
    served_flip_risk,
)


@dataclass(frozen=True)
class RetuneOptions:
    mode: Literal["budget", "guarantee"] = "budget"
    budget: float = 0.2  # budget mode: share of traffic the teacher may answer
    epsilon: float = 0.05  # guarantee mode: allowed P(ŷs ≠ ŷt | served by the student)
    delta: float = 0.05  # ... with probability at least 1 - delta; also the bound's level
    window_s: float = 86_400.0  # how far back to read traffic
    min_pairs: int = 200  # fewer teacher-observed pairs → the job fails
    step: float = DEFAULT_STEP  # guarantee mode: teacher-share resolution of the scan
    temperature: float | None = None  # the T_s in force (default: serving state, manifest)
    fallback_threshold: float | None = None  # the τ in force (default: serving state, settings)

    def __post_init__(self) -> None:
        checks = {
            "budget": 0.0 <= self.budget <= 1.0,
            "epsilon": 0.0 < self.epsilon < 1.0,
            "delta": 0.0 < self.delta < 1.0,
            "window_s": self.window_s > 0,
            "min_pairs": self.min_pairs >= 1,
            "step": 0.0 < self.step <= 0.5,
            "temperature": self.temperature is None or 0.05 <= self.temperature <= 20.0,
            "fallback_threshold": self.fallback_threshold is None
            or 0.0 <= self.fallback_threshold <= 1.0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"retune parameter(s) out of range: {bad}")


def run(ctx: JobContext) -> dict[str, Any]:
    options = options_from_params(RetuneOptions, ctx.params)
    manifest = ctx.registry.active_manifest(ctx.model, "student")
    temperature = serving_temperature(ctx, manifest, options.temperature)
    scope = Scope(
        ctx.model, manifest.version, ctx.now - options.window_s, ctx.now, manifest.temperature
    )
    ctx.report(0.05, "reading traffic and teacher-observed pairs")
    with ctx.database.connect() as connection:
        seen = traffic(connection, scope, temperature=temperature)
        pairs = shadow_pairs(connection, scope, temperature=temperature)
        state = serving(connection, ctx.model)
    previous = options.fallback_threshold
    if previous is None:
        previous = (
            ctx.settings.routing.fallback_threshold if state is None else state.fallback_threshold
        )
    if len(pairs) < options.min_pairs:
        raise UnprocessableError(
            f"too few teacher-observed pairs to retune {ctx.model} version "
            f"{manifest.version}: {len(pairs)} since {scope.start:.0f} "
            f"(need {options.min_pairs})"
        )
    ctx.report(0.4, f"choosing τ ({options.mode}) on {len(pairs)} pairs, {len(seen)} requests")
    all_traffic = Sample.of(seen.confidence)
    chosen = _choose(options, pairs, all_traffic)
    ctx.report(0.8, "drawing the cost-quality curve")
    curve = _curve(pairs, all_traffic, extra=(chosen["fallback_threshold"], previous))
    mode_keys: dict[str, Any] = (
        {"budget": options.budget}
        if options.mode == "budget"
        else {"epsilon": options.epsilon, "delta": options.delta}
    )
    return {
        "mode": options.mode,
        **mode_keys,
        **chosen,
        "previous_fallback_threshold": previous,
        "realised_teacher_share": seen.realised_teacher_share,
        "version": manifest.version,
        "temperature": temperature,
        "n_pairs": len(pairs),
        "n_requests": len(seen),
        "window": {"start": scope.start, "end": scope.end},
        "curve": curve,
    }


def _choose(options: RetuneOptions, pairs: ShadowPairs, all_traffic: Sample) -> dict[str, Any]:
    """τ, its expected teacher share and the (1 - δ) upper bound on the served flip rate."""
    if options.mode == "guarantee":
        choice = guarantee_threshold(
            pairs.confidence, pairs.flip, pairs.weight, options.epsilon, options.delta,
            traffic=all_traffic, step=options.step,
        )  # fmt: skip
        tau, share, bound, rate = (
            choice.threshold, choice.teacher_share, choice.bound, choice.flip_rate
        )  # fmt: skip
    else:
        tau = budget_threshold(all_traffic.confidence, None, options.budget)
        risk = served_flip_risk(pairs.confidence, pairs.flip, pairs.weight, tau, options.delta)
        share, bound, rate = all_traffic.teacher_share(tau), risk.upper, risk.rate
    return {
        "fallback_threshold": tau,
        "expected_teacher_share": share,
        "bound": bound,
        "served_flip_rate": None if rate != rate else rate,  # NaN: nothing served
    }


def _curve(
    pairs: ShadowPairs, all_traffic: Sample, extra: tuple[float, ...] = ()
) -> list[dict[str, Any]]:
    points: list[CurvePoint] = cost_quality_curve(
        pairs.confidence, pairs.student_label, pairs.teacher_label, pairs.weight,
        labels=pairs.label, traffic=all_traffic, shares=CURVE_SHARES, thresholds=extra,
    )  # fmt: skip
    return [point._asdict() for point in points]


def cost_quality(
    database: Engine,
    model: str,
    since: float,
    until: float,
    *,
    version: str | None = None,
    temperature: float | None = None,
    default_temperature: float = 1.0,
) -> list[dict[str, Any]]:
    """The cost-quality curve of the traffic of `model` created in [since, until).

    One point per 5% of teacher share: threshold, teacher_share, agreement (served answer =
    teacher's), served_flip_rate, flips_recovered, and, where labelled pairs exist,
    accuracy and gap_recovered. `version` limits it to one student version; `temperature`
    rescores confidences at that T (rows with no recorded T count as `default_temperature`).
    [] when no teacher output was observed in the range.
    """
    scope = Scope(model, version, since, until, default_temperature)
    with database.connect() as connection:
        seen: Traffic = traffic(connection, scope, temperature=temperature)
        pairs = shadow_pairs(connection, scope, temperature=temperature)
    if len(pairs) == 0 or len(seen) == 0:
        return []
    return _curve(pairs, Sample.of(seen.confidence))
