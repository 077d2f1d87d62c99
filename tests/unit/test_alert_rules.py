"""The Prometheus rules: promtool's own checks and unit tests, and what every alert carries.

`promtool check rules` and `promtool test rules` are the real tools (Debian's prometheus
package); the rest checks what they cannot: each alert has a runbook that exists in the
README, is unit-tested both firing and quiet, and reads metrics the service exports.
"""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest
import yaml

from tests.support.prometheus import require_binary
from tests.support.promql import (
    REPO_ROOT,
    RULE_TESTS,
    RULES_FILE,
    exported_names,
    rule_expressions,
    rules,
    selectors,
)

README = REPO_ROOT / "README.md"
ALERTS = [rule for rule in rules() if "alert" in rule]


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = require_binary("promtool")
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )


def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", str(RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_unit_tests() -> None:
    files = sorted(str(path) for path in RULE_TESTS.glob("*.yml"))
    assert files
    result = _promtool("test", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr


def _readme_anchors() -> set[str]:
    """GitHub's anchors for the README's headings."""
    anchors = set()
    for line in README.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("alert", ALERTS, ids=[a["alert"] for a in ALERTS])
def test_every_alert_has_a_severity_a_summary_and_a_runbook_in_the_readme(
    alert: dict[str, Any],
) -> None:
    assert alert["labels"]["severity"] in {"page", "ticket"}
    annotations = alert["annotations"]
    assert annotations["summary"] and annotations["description"]
    page, _, anchor = annotations["runbook_url"].partition("#")
    assert page == "README.md"
    assert anchor in _readme_anchors(), f"README has no section #{anchor}"


def _rule_tests() -> list[dict[str, Any]]:
    return [
        case
        for path in RULE_TESTS.glob("*.yml")
        for group in yaml.safe_load(path.read_text())["tests"]
        for case in group.get("alert_rule_test", [])
    ]


@pytest.mark.parametrize("alert", ALERTS, ids=[a["alert"] for a in ALERTS])
def test_every_alert_is_unit_tested_firing_and_quiet(alert: dict[str, Any]) -> None:
    cases = [case for case in _rule_tests() if case["alertname"] == alert["alert"]]
    assert any(case["exp_alerts"] for case in cases), "no case where it fires"
    assert any(not case["exp_alerts"] for case in cases), "no case where it stays quiet"


def test_the_alerts_the_service_needs_are_there() -> None:
    exprs = {alert["alert"]: alert["expr"] for alert in ALERTS}
    wanted = {
        "student errors": "server_error",
        "teacher circuit open": "kdguard_teacher_circuit_state",
        "shadow drop rate": "kdguard:shadow_drops",
        "latency SLO burn": "latency_slo_misses",
        "flip rate": "kdguard_flip_rate_threshold",
        "accuracy gap": "kdguard_accuracy_gap_threshold",
        "entropy drift": "kdguard_entropy_drift_js_threshold",
        "ECE": "kdguard_ece_threshold",
        "failed jobs": 'status="failed"',
        "rollout stuck": "kdguard_rollout_stage",
    }
    recorded = {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}
    for what, needle in wanted.items():
        expanded = [
            expr + " ".join(recorded.get(s.name, "") for s in selectors(expr))
            for expr in exprs.values()
        ]
        assert any(needle in expr for expr in expanded), f"no alert on {what}"


def test_rules_read_existing_metrics_through_rates() -> None:
    known = set(exported_names()) | {"up"}
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    for expression in rule_expressions():
        for selector in selectors(expression.expr):
            assert selector.name in known | recorded, f"{expression.where}: {selector.name}"
            if selector.name.endswith(("_total", "_bucket", "_count")):
                pattern = rf"(rate|increase)\({re.escape(selector.name)}(\{{[^}}]*\}})?\["
                assert re.search(pattern, expression.expr), (
                    f"{expression.where}: {selector.name} must be read through a rate"
                )
