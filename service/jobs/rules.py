"""Trigger rules: when do stored metric windows call for an action?

A rule fires when, on its monitoring window length,
- its newest `consecutive` eligible windows all cross (eligible: complete, enough
  effective samples, matured when the rule asks for it);
- it is armed: it has never fired, or since its last firing an eligible window newer than
  that firing's evidence did *not* cross (hysteresis: one long excursion fires once, not
  once per window);
- its cooldown since the last firing has passed;
- none of its `unless_alerting` metrics is in alert on its newest window.
Whether a job may be created (one open job per rule and model) is the database's call.
The functions here are pure: windows in, decision out.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.settings import TriggerRule

_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}

WindowRow = Mapping[str, Any]
"""A stored metric window as a mapping (see `persistence.loop.recent_windows`)."""


@dataclass(frozen=True)
class Decision:
    fire: bool
    why: str
    evidence: tuple[WindowRow, ...] = ()


def statistic(rule: TriggerRule, window: WindowRow) -> float:
    """The number of `window` the rule compares (NaN when the window has none)."""
    if rule.statistic == "alert":
        return 1.0 if window["state"] == "alert" else 0.0
    value = window[rule.statistic]
    return math.nan if value is None else float(value)


def bound(rule: TriggerRule, window: WindowRow) -> float:
    """What the statistic is compared with: the rule's value or the window's threshold."""
    if rule.value is not None:
        return rule.value
    threshold = window["threshold"]
    return math.nan if threshold is None else float(threshold)


def crosses(rule: TriggerRule, window: WindowRow) -> bool:
    value, limit = statistic(rule, window), bound(rule, window)
    if math.isnan(value) or math.isnan(limit):
        return False
    return _COMPARE[rule.comparison](value, limit)


def eligible(rule: TriggerRule, window: WindowRow, now: float) -> bool:
    return (
        window["window_end"] <= now
        and window["n_eff"] >= rule.min_samples
        and window["state"] != "insufficient"
        and (window["matured"] or not rule.matured_only)
    )


def decide(
    rule: TriggerRule,
    windows: Sequence[WindowRow],
    *,
    now: float,
    last_fired_at: float | None = None,
    last_evidence_start: float | None = None,
    alerting: Mapping[str, bool] | None = None,
) -> Decision:
    """Should `rule` fire now? `windows`: its metric's stored windows, newest first."""
    vetoes = [m for m in rule.unless_alerting if (alerting or {}).get(m, False)]
    if vetoes:
        return Decision(False, f"vetoed: {', '.join(vetoes)} in alert")
    usable = [w for w in windows if eligible(rule, w, now)]
    if len(usable) < rule.consecutive:
        return Decision(False, f"{len(usable)} eligible windows, needs {rule.consecutive}")
    run = usable[: rule.consecutive]
    if not all(crosses(rule, w) for w in run):
        return Decision(False, "not crossing")
    if last_fired_at is not None:
        if now - last_fired_at < rule.cooldown_s:
            return Decision(False, f"cooling down until {last_fired_at + rule.cooldown_s:.0f}")
        since = [w for w in usable if w["window_start"] > (last_evidence_start or -math.inf)]
        if all(crosses(rule, w) for w in since):
            return Decision(False, "disarmed: has not cleared since it last fired")
    return Decision(True, f"{rule.consecutive} windows {rule.comparison} threshold", tuple(run))


def evidence_json(rule: TriggerRule, decision: Decision) -> dict[str, Any]:
    """What a firing stores: the rule as configured and the window rows that fired it."""
    return {
        "rule": rule.model_dump(mode="json"),
        "why": decision.why,
        "windows": [dict(w) for w in decision.evidence],
        "newest_window_start": max((w["window_start"] for w in decision.evidence), default=None),
    }
