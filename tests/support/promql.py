"""The PromQL that kdguard ships: every dashboard target and every rule, and their selectors.

Shared by the structural checks (tests/unit/test_dashboards.py, test_alert_rules.py) and
the live check against a real Prometheus (tests/integration/test_prometheus_live.py).
Selectors are found with a pattern that knows this project's expressions (metric names
start with `kdguard_`, `kdguard:` for recording rules, or are Prometheus's `up`), not with
a general PromQL parser: Prometheus itself parses them in the live test.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from service.monitoring.instruments import build_instruments

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = REPO_ROOT / "grafana" / "dashboards"
RULES_FILE = REPO_ROOT / "grafana" / "rules" / "kdguard.rules.yml"
RULE_TESTS = REPO_ROOT / "grafana" / "rules" / "tests"

_SELECTOR = re.compile(
    r"(?<![A-Za-z0-9_:])(?P<name>kdguard[_:][A-Za-z0-9_:]*|up)(?![A-Za-z0-9_:(])"
    r"(?P<matchers>\{[^}]*\})?"
)
_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')
# Grafana's built-in variables, and `$name` / `${name}` dashboard variables.
_VARIABLE = re.compile(r"\$\{?(__[a-z_]+|[A-Za-z_][A-Za-z0-9_]*)\}?")


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str
    value: str

    def text(self) -> str:
        return f'{self.label}{self.op}"{self.value}"'


@dataclass(frozen=True)
class Selector:
    name: str
    matchers: tuple[Matcher, ...]

    def text(self, without: frozenset[Matcher] = frozenset()) -> str:
        kept = [m.text() for m in self.matchers if m not in without]
        return f"{self.name}{{{', '.join(kept)}}}" if kept else self.name


@dataclass(frozen=True)
class Expression:
    """One PromQL expression kdguard ships, and where it comes from."""

    where: str  # "dashboard kdguard-overview / panel title", "rule KdguardDown", ...
    expr: str
    kind: str  # "panel", "variable", "record" or "alert"


def selectors(expr: str) -> list[Selector]:
    found = []
    for match in _SELECTOR.finditer(expr):
        body = (match.group("matchers") or "{}")[1:-1]
        matchers = tuple(Matcher(*m.groups()) for m in _MATCHER.finditer(body))
        if "".join(m.group(0) for m in _MATCHER.finditer(body)).strip() != body.strip():
            raise ValueError(f"cannot read the matchers of {match.group(0)!r}")
        found.append(Selector(match.group("name"), matchers))
    return found


def variables(expr: str) -> set[str]:
    return set(_VARIABLE.findall(expr))


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace `$name`, `${name}` and Grafana's `$__...` variables with `values`."""

    def value(match: re.Match[str]) -> str:
        return values[match.group(1)]

    return _VARIABLE.sub(value, expr)


def dashboards() -> dict[str, dict[str, Any]]:
    """Every dashboard JSON by file name."""
    return {
        path.name: json.loads(path.read_text()) for path in sorted(DASHBOARD_DIR.glob("*.json"))
    }


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def label_values_query(definition: str) -> tuple[str, str]:
    """`label_values(selector, label)` → (selector, label)."""
    match = re.fullmatch(r"label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\)", definition)
    if match is None:
        raise ValueError(f"not a label_values query: {definition!r}")
    return match.group(1).strip(), match.group(2)


def dashboard_expressions() -> list[Expression]:
    out = []
    for name, dashboard in dashboards().items():
        for panel in panels(dashboard):
            for target in panel.get("targets", []):
                where = f"{name} / {panel['title']} / {target['refId']}"
                out.append(Expression(where, target["expr"], "panel"))
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":
                selector, _ = label_values_query(variable["definition"])
                out.append(Expression(f"{name} / ${variable['name']}", selector, "variable"))
    return out


def rules() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES_FILE.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def rule_expressions() -> list[Expression]:
    return [
        Expression(
            f"rule {rule.get('alert') or rule['record']}",
            rule["expr"],
            "alert" if "alert" in rule else "record",
        )
        for rule in rules()
    ]


@functools.cache
def exported_names() -> dict[str, str]:
    """Every sample name kdguard's instruments can export → its metric family."""
    registry = CollectorRegistry()
    build_instruments(registry)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    return {
        f"{family.name}{suffix}": family.name
        for family in registry.collect()
        for suffix in suffixes[family.type]
    }


def family_of(sample_name: str) -> str:
    return exported_names()[sample_name]
