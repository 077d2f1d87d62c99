"""A real Prometheus scraping a running kdguard: every shipped expression parses and has data.

`kdguard serve` runs with a fake OIP teacher (a real process) and short monitoring windows;
generated traffic mixes confident and unsure instances, both APIs, bad requests, feedback
labels, an activation and a teacher outage (so degraded answers, teacher errors, an open
circuit and dropped shadow work happen for real). Prometheus scrapes it every second and
evaluates grafana/rules/kdguard.rules.yml. Then, for every dashboard target, template
variable and rule:

- Prometheus parses and evaluates the expression;
- every dashboard expression and recording rule returns data;
- every selector inside any expression (alerts included) returns data, so no panel or rule
  points at a metric or label value that does not exist.

Two exceptions, each checked another way rather than skipped:
- Rollout gauges and the job-duration histogram only have series while a rollout is open
  or once a job has finished; this run starts neither, so for expressions reading them the
  test checks that the metric is exported (its HELP/TYPE lines in kdguard's scrape).
- Label values that only a server failure produces (`outcome="server_error"`, "rejected")
  cannot be made on purpose here; for those selectors the test drops that one matcher and
  checks the rest, and that the label exists on the metric.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import deque
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import ADMIN_KEY
from tests.support.models import CLASSES, FEATURES, instance
from tests.support.processes import FakeTeacherProcess, KdguardProcess, fake_teacher, kdguard_server
from tests.support.prometheus import PrometheusServer, prometheus_server
from tests.support.promql import (
    RULES_FILE,
    Expression,
    Matcher,
    Selector,
    dashboard_expressions,
    family_of,
    rule_expressions,
    selectors,
    substitute,
)

pytestmark = pytest.mark.slow

WINDOW = "10s"
VARIABLES = {
    "model": "tiny",
    "version": ".*",  # the "All" value
    "window": WINDOW,
    "teacher_budget": "0.1",
    "__rate_interval": "15s",
    "__range": "5m",
    "__interval": "1s",
}
DECLARED_ONLY = {
    "kdguard_rollout_stage",
    "kdguard_rollout_traffic_share",
    "kdguard_rollout_gate",
    "kdguard_job_duration_seconds",
}
FAILURE_ONLY = {("outcome", "server_error"), ("outcome", "rejected")}
# Labels come back later, as from a real labelling process: a shadow-sampled prediction
# is recorded once its shadow call has returned (within teacher.shadow_timeout_s, 2 s).
LABEL_DELAY_S = 3.0
# What the live run must have produced before the expressions are checked.
READY_WHEN = [
    'kdguard_accuracy_gap{kind="10s"}',
    'kdguard_ece{kind="10s"}',
    'kdguard_entropy_drift_js{kind="10s"}',
    'kdguard_predictions_total{outcome="degraded"}',
    'kdguard_shadow_dropped_total{reason="circuit_open"}',
    'kdguard_requests_total{kind="oip"}',
    'kdguard_requests_total{outcome="client_error"}',
    'kdguard_model_activations_total{status="succeeded"}',
    "kdguard:latency_slo_misses:ratio_rate6h",
]


class Traffic:
    """Requests and feedback labels from a background thread until stopped."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self.errors: list[str] = []
        self.outage = threading.Event()
        self._labels: deque[tuple[float, list[dict[str, object]]]] = deque()

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        rng = random.Random(0)
        with httpx.Client(base_url=self._url, timeout=5.0) as client:
            for tick in itertools.count():
                if self._stop.wait(0.03):
                    return
                try:
                    self._tick(client, rng, tick)
                except httpx.HTTPError as exc:  # the server is still answering; record it
                    self.errors.append(repr(exc))

    def _tick(self, client: httpx.Client, rng: random.Random, tick: int) -> None:
        # three confident instances and one the student is unsure of (a fallback)
        rows = [instance(1.0, rng.randrange(CLASSES)) for _ in range(3)]
        rows.append(instance(0.05, rng.randrange(CLASSES)))
        response = client.post("/v1/predict", json={"inputs": rows})
        self._expect(response, 200)
        now = time.monotonic()
        if self.outage.is_set():
            # Shadow work refused while the circuit is open leaves its rows unrecorded, so
            # their labels would be 404s; this test is about the metrics, not about that.
            return
        self._labels.append((now, [
            {"request_id": p["request_id"], "label": rng.randrange(CLASSES)}
            for p in response.json()["predictions"]
        ]))  # fmt: skip
        while self._labels and self._labels[0][0] < now - LABEL_DELAY_S:
            self._expect(client.post("/v1/feedback", json=self._labels.popleft()[1]), 200)
        if tick % 5 == 0:
            body = {"inputs": [{"name": "input", "shape": [2, FEATURES], "datatype": "FP32",
                                "data": instance(1.0, 0) + instance(0.05, 1)}]}  # fmt: skip
            self._expect(client.post("/v2/models/tiny/infer", json=body), 200)
        if tick % 20 == 0:  # a malformed request: a client error, counted as such
            self._expect(client.post("/v1/predict", json={"inputs": [[1.0, 2.0]]}), 400)

    def _expect(self, response: httpx.Response, status: int) -> None:
        if response.status_code != status:
            self.errors.append(f"{response.request.url}: {response.status_code} {response.text}")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PrometheusServer, str]]:
    """kdguard under traffic, a teacher outage behind it, and Prometheus with the rules."""
    work = tmp_path_factory.mktemp("live")
    overrides = {
        "routing": {"shadow_rate": 0.5},
        "recording": {"bucket_s": 10},  # windows are whole buckets
        "auth": {"api_keys": [{"name": "ops", "key": ADMIN_KEY, "scopes": ["admin"]}]},
        "monitoring": {
            "windows": [WINDOW],
            "interval_s": 0.5,
            "min_samples": 10,
            "reference_min_samples": 50,
            "label_completeness_target": 0.5,
            "label_delay_horizon_s": 20,
        },
    }
    teacher: FakeTeacherProcess
    server: KdguardProcess
    with (
        fake_teacher(work / "teacher") as teacher,
        kdguard_server(work / "kdguard", teacher_url=teacher.url, overrides=overrides) as server,
        prometheus_server(
            work / "prometheus", targets=[f"127.0.0.1:{server.port}"], rule_files=[RULES_FILE]
        ) as prometheus,
        Traffic(server.url) as traffic,
    ):
        activation = httpx.post(
            f"{server.url}/v1/admin/models/tiny/versions/1/activate",
            headers={"X-API-Key": ADMIN_KEY},
            timeout=30.0,
        )
        assert activation.status_code == 200, activation.text
        time.sleep(2.0)
        traffic.outage.set()
        teacher.control("http500")  # an outage: errors, an open circuit, degraded answers
        time.sleep(3.0)
        teacher.control("ok")
        time.sleep(2.0)  # the circuit's trial call closes it again
        traffic.outage.clear()
        _wait_for(prometheus, READY_WHEN, timeout_s=90.0)
        traffic.stop()  # the series stay (at rate 0): the checks below need no more load
        metrics_text = httpx.get(f"{server.url}/metrics", timeout=10.0).text
        yield prometheus, metrics_text
        assert not traffic.errors, traffic.errors[:5]
        server.assert_alive()


def _wait_for(prometheus: PrometheusServer, exprs: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while missing := [expr for expr in exprs if not prometheus.query(expr)]:
        assert time.monotonic() < deadline, f"never saw {missing}"
        time.sleep(0.5)


EXPRESSIONS = dashboard_expressions() + rule_expressions()


@pytest.mark.parametrize("expression", EXPRESSIONS, ids=[e.where for e in EXPRESSIONS])
def test_expression_parses_and_reads_live_data(
    live: tuple[PrometheusServer, str], expression: Expression
) -> None:
    prometheus, metrics_text = live
    expr = substitute(expression.expr, VARIABLES)
    result = prometheus.query(expr)  # raises unless Prometheus parsed and evaluated it
    found = selectors(expr)
    declared_only = [s for s in found if _family(s.name) in DECLARED_ONLY]
    for selector in declared_only:
        family = _family(selector.name)
        assert f"# TYPE {family} " in metrics_text, f"{family} is not exported"
    if expression.kind in ("panel", "variable", "record") and not declared_only:
        assert result, f"{expression.where}: no data for {expr}"
    for selector in found:
        if selector not in declared_only:
            _assert_selector_has_data(prometheus, selector, expression.where)


def _family(name: str) -> str:
    return family_of(name) if name.startswith("kdguard_") else name


def _assert_selector_has_data(prometheus: PrometheusServer, selector: Selector, where: str) -> None:
    failure_only = frozenset(
        m for m in selector.matchers if (m.label, m.value) in FAILURE_ONLY and m.op == "="
    )
    text = selector.text(without=failure_only)
    series = prometheus.query(text)
    assert series, f"{where}: {selector.text()} has no data"
    for matcher in failure_only:  # the label itself must exist on this metric
        assert any(matcher.label in s["metric"] for s in series), f"{where}: no {matcher.label}"


def test_every_rule_is_loaded_and_evaluates_cleanly(live: tuple[PrometheusServer, str]) -> None:
    prometheus, _ = live
    groups = prometheus.api("rules")["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    shipped = {e.where.removeprefix("rule ") for e in rule_expressions()}
    assert set(loaded) == shipped
    for name, rule in loaded.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"


def test_selector_reader_sees_matchers() -> None:
    """The selector pattern the checks rely on reads names, operators and values."""
    (selector,) = selectors('rate(kdguard_requests_total{model=~"a|b", outcome!="ok"}[5m])')
    assert selector == Selector(
        "kdguard_requests_total", (Matcher("model", "=~", "a|b"), Matcher("outcome", "!=", "ok"))
    )
    assert [s.name for s in selectors('up{job="x"} or vector(1)')] == ["up"]
    assert selectors("histogram_quantile(0.9, sum by (le) (rate(x[1m])))") == []


def test_substitution_covers_every_variable_used() -> None:
    for expression in EXPRESSIONS:
        substitute(expression.expr, VARIABLES)  # KeyError names a variable without a value
    assert substitute('rate(x{model=~"$model"}[$__rate_interval])', VARIABLES) == (
        'rate(x{model=~"tiny"}[15s])'
    )
