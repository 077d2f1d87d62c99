"""Trigger rules: consecutive windows, eligibility, cooldown, hysteresis, vetoes."""

from __future__ import annotations

from typing import Any

from service.jobs.rules import decide, evidence_json
from service.settings import TriggerRule

HOUR = 3600.0


def rule(**overrides: Any) -> TriggerRule:
    base: dict[str, Any] = {
        "name": "gap", "metric": "accuracy_gap", "statistic": "ci_low", "comparison": ">",
        "consecutive": 2, "cooldown_s": 2 * HOUR, "action": "redistill", "min_samples": 100,
    }  # fmt: skip
    return TriggerRule(**{**base, **overrides})


def window(k: int, ci_low: float, **overrides: Any) -> dict[str, Any]:
    """The k-th hourly window (k = 0 is the oldest), complete by t = (k + 1) hours."""
    return {
        "id": k, "metric": "accuracy_gap", "window": "1h", "window_start": k * HOUR,
        "window_end": (k + 1) * HOUR, "value": ci_low + 0.01, "ci_low": ci_low,
        "ci_high": ci_low + 0.02, "n": 500, "n_eff": 400.0, "threshold": 0.02,
        "state": "alert" if ci_low > 0.02 else "ok", "label_completeness": 0.9, "matured": True,
    } | overrides  # fmt: skip


def history(*ci_lows: float, **overrides: Any) -> list[dict[str, Any]]:
    """Windows oldest → newest given, returned newest first (as the store returns them)."""
    return [window(k, v, **overrides) for k, v in enumerate(ci_lows)][::-1]


def test_fires_after_the_stated_number_of_consecutive_crossings() -> None:
    r = rule()
    assert not decide(r, history(0.0, 0.03), now=10 * HOUR).fire  # one crossing
    decision = decide(r, history(0.0, 0.03, 0.04), now=10 * HOUR)
    assert decision.fire and [w["id"] for w in decision.evidence] == [2, 1]
    assert not decide(r, history(0.03, 0.0, 0.04), now=10 * HOUR).fire  # not consecutive


def test_compares_with_the_windows_own_threshold_or_the_rules_value() -> None:
    assert decide(rule(), history(0.03, 0.03), now=10 * HOUR).fire  # 0.03 > 0.02
    assert not decide(rule(value=0.05), history(0.03, 0.03), now=10 * HOUR).fire
    assert decide(rule(comparison="<", value=0.05), history(0.03, 0.03), now=10 * HOUR).fire


def test_windows_that_are_incomplete_small_or_unmatured_do_not_count() -> None:
    windows = history(0.03, 0.03)
    assert not decide(rule(), windows, now=1.5 * HOUR).fire  # the newest is still filling
    assert not decide(rule(), history(0.03, 0.03, n_eff=50.0), now=10 * HOUR).fire
    unmatured = history(0.03, 0.03, matured=False)
    assert not decide(rule(), unmatured, now=10 * HOUR).fire
    assert decide(rule(matured_only=False), unmatured, now=10 * HOUR).fire


def test_cooldown_holds_the_rule_back_after_a_firing() -> None:
    windows = history(0.03, 0.03, 0.0, 0.03, 0.03)
    fired_at, evidence_start = 4.5 * HOUR, 1 * HOUR
    held = decide(rule(), windows, now=5.5 * HOUR, last_fired_at=fired_at,
                  last_evidence_start=evidence_start)  # fmt: skip
    assert not held.fire and "cooling down" in held.why
    assert decide(rule(), windows, now=fired_at + 2 * HOUR + 1, last_fired_at=fired_at,
                  last_evidence_start=evidence_start).fire  # fmt: skip


def test_hysteresis_one_long_excursion_fires_once() -> None:
    r = rule(cooldown_s=0.0)
    windows = history(0.03, 0.03, 0.03, 0.03, 0.03)  # never clears
    first = decide(r, windows[3:], now=10 * HOUR)
    assert first.fire
    newest = max(w["window_start"] for w in first.evidence)
    later = decide(r, windows, now=10 * HOUR, last_fired_at=2 * HOUR, last_evidence_start=newest)
    assert not later.fire and "disarmed" in later.why
    cleared = history(0.03, 0.03, 0.0, 0.03, 0.03)  # window 2 cleared: re-armed
    assert decide(r, cleared, now=10 * HOUR, last_fired_at=2 * HOUR,
                  last_evidence_start=newest).fire  # fmt: skip


def test_a_metric_in_alert_can_veto_a_rule() -> None:
    ece = rule(name="miscalibrated", metric="ece", unless_alerting=["accuracy_gap"])
    windows = history(0.03, 0.03)
    assert decide(ece, windows, now=10 * HOUR, alerting={"accuracy_gap": False}).fire
    vetoed = decide(ece, windows, now=10 * HOUR, alerting={"accuracy_gap": True})
    assert not vetoed.fire and "vetoed" in vetoed.why


def test_alert_statistic_reads_the_window_state() -> None:
    r = rule(statistic="alert", comparison=">=", value=1.0)
    assert decide(r, history(0.03, 0.03), now=10 * HOUR).fire
    assert not decide(r, history(0.03, 0.01), now=10 * HOUR).fire


def test_evidence_names_the_rule_and_its_windows() -> None:
    r = rule()
    decision = decide(r, history(0.03, 0.03), now=10 * HOUR)
    evidence = evidence_json(r, decision)
    assert evidence["rule"]["name"] == "gap" and len(evidence["windows"]) == 2
    assert evidence["newest_window_start"] == 1 * HOUR
