"""The Grafana dashboards and their provisioning, checked without Grafana.

Grafana itself is not installable here, so the JSON is checked for what Grafana needs and
what the dashboards promise: schema version, unique ids, the datasource variable on every
panel and target, the `model`/`version` variables, panels laid out on the 24-column grid,
metric names that the service exports, counters read through rates, histograms through
`histogram_quantile` (or as heatmap buckets). tests/integration/test_prometheus_live.py
runs every expression against a real Prometheus.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.support.promql import (
    REPO_ROOT,
    dashboard_expressions,
    dashboards,
    exported_names,
    panels,
    rules,
    selectors,
    variables,
)

GRAFANA_BUILTINS = {"__rate_interval", "__range", "__interval"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _builder() -> ModuleType:
    path = REPO_ROOT / "scripts" / "build_dashboards.py"
    spec = importlib.util.spec_from_file_location("build_dashboards", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_committed_json_and_readme_table_are_what_the_builder_writes() -> None:
    for path, content in _builder().rendered().items():
        assert path.read_text() == content, (
            f"{path.relative_to(REPO_ROOT)} is stale: run `python scripts/build_dashboards.py`"
        )


def test_the_three_boards_exist_with_unique_uids_and_titles() -> None:
    boards = dashboards()
    uids = {board["uid"] for board in boards.values()}
    assert uids == {"kdguard-overview", "kdguard-quality", "kdguard-loop"}
    assert len({board["title"] for board in boards.values()}) == len(boards)


@pytest.mark.parametrize("name", sorted(dashboards()))
def test_dashboard_structure(name: str) -> None:
    board = dashboards()[name]
    assert board["schemaVersion"] >= 36
    assert board["uid"] and len(board["uid"]) <= 40
    all_panels = panels(board)
    ids = [panel["id"] for panel in all_panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    _assert_grid(all_panels)
    variables_by_name = {v["name"]: v for v in board["templating"]["list"]}
    assert variables_by_name["datasource"]["type"] == "datasource"
    assert variables_by_name["datasource"]["query"] == "prometheus"
    for required in ("model", "version"):
        variable = variables_by_name[required]
        assert variable["type"] == "query"
        assert variable["datasource"] == DATASOURCE
    for panel in all_panels:
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["description"], panel
        assert panel["datasource"] == DATASOURCE, panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]
            unknown = variables(target["expr"]) - set(variables_by_name) - GRAFANA_BUILTINS
            assert not unknown, f"{panel['title']}: undefined variables {unknown}"


def _assert_grid(all_panels: list[dict[str, Any]]) -> None:
    taken: set[tuple[int, int]] = set()
    for panel in all_panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_every_metric_a_dashboard_reads_is_exported_or_recorded() -> None:
    known = set(exported_names()) | {rule["record"] for rule in rules() if "record" in rule}
    for expression in dashboard_expressions():
        for selector in selectors(expression.expr):
            assert selector.name in known, f"{expression.where}: {selector.name} does not exist"


def test_counters_are_read_as_rates_and_histograms_as_quantiles_or_heatmaps() -> None:
    for name, board in dashboards().items():
        for panel in panels(board):
            for target in panel.get("targets", []):
                _assert_aggregatable(f"{name} / {panel['title']}", target)


def _assert_aggregatable(where: str, target: dict[str, Any]) -> None:
    expr = target["expr"]
    for selector in selectors(expr):
        name = selector.name
        if name.endswith(("_total", "_bucket", "_count", "_sum")):
            # a counter is only meaningful as a rate: never a raw, per-replica value
            pattern = rf"(rate|increase)\({re.escape(name)}(\{{[^}}]*\}})?\["
            assert re.search(pattern, expr), f"{where}: {name} is not read through a rate"
        if name.endswith("_bucket"):
            one_bucket = any(m.label == "le" and m.op == "=" for m in selector.matchers)
            assert (
                "histogram_quantile(" in expr or target.get("format") == "heatmap" or one_bucket
            ), f"{where}: buckets go through histogram_quantile, a heatmap, or one le (an SLI)"
            assert one_bucket or re.search(r"by \((le|[^)]*, le|le, [^)]*)\)", expr), (
                f"{where}: buckets must be summed by le (across replicas)"
            )


def test_the_issue_panels_are_there() -> None:
    titles = {
        board["uid"]: " | ".join(p["title"].lower() for p in panels(board))
        for board in dashboards().values()
    }
    for uid, words in {
        "kdguard-overview": ["requests", "served-by mix", "teacher share vs budget", "latency",
                             "non-ok", "degraded", "shadow sampled and dropped"],
        "kdguard-quality": ["flip rate with 95% ci", "accuracy gap with 95% ci", "completeness",
                            "entropy drift and its threshold", "ece with its threshold",
                            "student confidence", "student entropy", "temperature and τ"],
        "kdguard-loop": ["trigger firings", "jobs by kind and status", "rollout stage",
                         "promotion gate", "active versions"],
    }.items():  # fmt: skip
        for word in words:
            assert word in titles[uid], f"{uid} has no {word!r} panel"


def test_provisioning_points_grafana_at_the_dashboards_and_a_prometheus_datasource() -> None:
    provisioning = REPO_ROOT / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "kdguard.yml").read_text())
    (prometheus,) = datasources["datasources"]
    assert prometheus["type"] == "prometheus"
    assert prometheus["url"] == "${PROMETHEUS_URL}"  # set by compose (tests/unit/test_deploy.py)
    providers = yaml.safe_load((provisioning / "dashboards" / "kdguard.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    mounted = Path(provider["options"]["path"])
    compose = yaml.safe_load((REPO_ROOT / "deploy" / "docker-compose.yml").read_text())
    volumes = compose["services"]["grafana"]["volumes"]
    assert any(
        v.split(":")[1] == str(mounted) and v.split(":")[0].endswith("grafana/dashboards")
        for v in volumes
    ), f"compose does not mount grafana/dashboards at {mounted}"
