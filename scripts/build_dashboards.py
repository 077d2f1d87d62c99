"""Write kdguard's Grafana dashboards (grafana/dashboards/*.json) and their README table.

The dashboards are code: edit the panels here and run `python scripts/build_dashboards.py`.
tests/unit/test_dashboards.py checks that the JSON files and the README's panel table are
what this script writes, and validates their structure; tests/integration/
test_prometheus_live.py runs every panel's PromQL against a Prometheus scraping kdguard.

Every panel reads Prometheus through the `datasource` variable and aggregates across
replicas: rates of counters summed, histograms summed by `le` and read with
`histogram_quantile`, gauges that every replica exports reduced with max/min.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "grafana" / "dashboards"
README = ROOT / "README.md"
TABLE_START, TABLE_END = "<!-- dashboards:start -->\n", "<!-- dashboards:end -->"

SCHEMA_VERSION = 39  # Grafana 10.4 / 11
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
M = 'model=~"$model"'
MV = 'model=~"$model", version=~"$version"'
W = 'model=~"$model", kind="$window"'

Json = dict[str, Any]


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str = ""
    instant: bool = False
    heatmap: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    targets: tuple[Target, ...]
    kind: str = "timeseries"
    unit: str = "short"
    width: int = 8
    height: int = 8
    options: Json = field(default_factory=dict)
    custom: Json = field(default_factory=dict)
    overrides: tuple[Json, ...] = ()
    mappings: tuple[Json, ...] = ()
    thresholds: tuple[tuple[float | None, str], ...] = ()
    minimum: float | None = None
    maximum: float | None = None


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    variables: tuple[Json, ...]
    rows: tuple[Row, ...]


def ts(title: str, description: str, *targets: Target, **kw: Any) -> Panel:
    return Panel(title, description, targets, **kw)


def t(expr: str, legend: str = "", **kw: Any) -> Target:
    return Target(" ".join(expr.split()), legend, **kw)


def quantiles(metric: str, selector: str, by: str, legend: str) -> tuple[Target, ...]:
    """p50, p90 and p99 of a histogram summed over replicas (by `le` and `by`)."""
    return tuple(
        t(
            f"histogram_quantile({q}, sum by (le{', ' + by if by else ''}) "
            f"(rate({metric}_bucket{{{selector}}}[{RATE}])))",
            f"p{round(q * 100)} {legend}".strip(),
        )
        for q in (0.5, 0.9, 0.99)
    )


def by_name(name: str, **properties: Any) -> Json:
    return {
        "matcher": {"id": "byName", "options": name},
        "properties": [{"id": key, "value": value} for key, value in properties.items()],
    }


def value_map(values: dict[int, tuple[str, str]]) -> tuple[Json, ...]:
    return (
        {
            "type": "value",
            "options": {
                str(v): {"text": text, "color": color, "index": i}
                for i, (v, (text, color)) in enumerate(values.items())
            },
        },
    )


ALERT_STATE = value_map({-1: ("too few samples", "blue"), 0: ("ok", "green"), 1: ("alert", "red")})
CIRCUIT = value_map({0: ("closed", "green"), 1: ("half-open", "orange"), 2: ("open", "red")})
STAGES = value_map(
    {
        0: ("none", "transparent"),
        1: ("shadow", "blue"),
        2: ("A/B", "orange"),
        3: ("promoted", "green"),
        4: ("rolled back", "red"),
    }
)
CI_BAND = (
    by_name("CI high", **{"custom.fillBelowTo": "CI low", "custom.lineWidth": 0}),
    by_name("CI low", **{"custom.lineWidth": 0}),
    by_name("threshold", **{"custom.lineStyle": {"fill": "dash", "dash": [10, 10]}, "color": {
        "mode": "fixed", "fixedColor": "red"}}),
)  # fmt: skip


def with_ci(metric: str, what: str) -> tuple[Target, ...]:
    """A quality gauge with its interval and threshold, max over replicas."""
    return (
        t(f"max(kdguard_{metric}{{{W}}})", what),
        t(f"max(kdguard_{metric}_ci_low{{{W}}})", "CI low"),
        t(f"max(kdguard_{metric}_ci_high{{{W}}})", "CI high"),
        t(f"max(kdguard_{metric}_threshold{{{W}}})", "threshold"),
    )


# -- variables ----------------------------------------------------------------------------


def query_variable(name: str, label: str, query: str, **kw: Any) -> Json:
    variable: Json = {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-query"},
        "refresh": 2,  # on time range change: versions come and go
        "sort": 1,
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "current": {},
        "options": [],
        "regex": "",
    }
    variable.update(kw)
    return variable


DATASOURCE_VARIABLE: Json = {
    "name": "datasource",
    "label": "Data source",
    "type": "datasource",
    "query": "prometheus",
    "refresh": 1,
    "hide": 0,
    "current": {},
    "options": [],
    "regex": "",
}
MODEL = query_variable("model", "Model", "label_values(kdguard_model_info, model)")
VERSION = query_variable(
    "version",
    "Student version",
    'label_values(kdguard_model_info{model=~"$model", kind="student"}, version)',
    includeAll=True,
    multi=True,
    allValue=".*",
)
WINDOW = query_variable(
    "window", "Window", 'label_values(kdguard_flip_rate{model=~"$model"}, kind)'
)
TEACHER_BUDGET: Json = {
    "name": "teacher_budget",
    "label": "Teacher budget (share)",
    "type": "textbox",
    "query": "0.1",
    "current": {"text": "0.1", "value": "0.1"},
    "options": [{"selected": True, "text": "0.1", "value": "0.1"}],
    "hide": 0,
    "description": "Share of instances the teacher may answer (the budget τ is tuned to).",
}

# -- overview -------------------------------------------------------------------------------

PREDICTIONS = f"rate(kdguard_predictions_total{{{MV}}}[{RATE}])"
FALLBACKS = f"rate(kdguard_fallbacks_total{{{M}}}[{RATE}])"
ALL_PREDICTIONS = f"sum(rate(kdguard_predictions_total{{{M}}}[{RATE}]))"

OVERVIEW = Dashboard(
    uid="kdguard-overview",
    title="kdguard / overview",
    description="Traffic, who answers, latency per stage, errors and shadow work.",
    variables=(DATASOURCE_VARIABLE, MODEL, VERSION, TEACHER_BUDGET),
    rows=(
        Row(
            "Traffic",
            (
                ts(
                    "Requests per second",
                    "Inference HTTP requests by API (rest: /v1/predict, oip: Open Inference "
                    "Protocol) and outcome, summed over replicas.",
                    t(
                        f"sum by (kind, outcome) (rate(kdguard_requests_total{{{M}}}[{RATE}]))",
                        "{{kind}} {{outcome}}",
                    ),
                    unit="reqps",
                ),
                ts(
                    "Instances by who served them",
                    "Instances answered per second: by the student, by the teacher (a "
                    "fallback), or by the student flagged degraded (the teacher failed).",
                    t(f"sum by (served_by, outcome) ({PREDICTIONS})", "{{served_by}} {{outcome}}"),
                    unit="ops",
                    custom={"stacking": {"mode": "normal", "group": "A"}, "fillOpacity": 30},
                ),
                ts(
                    "Served-by mix",
                    "Share of instances answered by each model. The teacher's share is the "
                    "cascade's cost; it moves with τ and with how unsure the student is.",
                    t(
                        f"sum by (served_by) ({PREDICTIONS}) / ignoring (served_by) "
                        f"group_left sum({PREDICTIONS})",
                        "{{served_by}}",
                    ),
                    unit="percentunit",
                    custom={"stacking": {"mode": "normal", "group": "A"}, "fillOpacity": 60},
                    maximum=1,
                ),
                ts(
                    "Teacher share vs budget",
                    "Fallback share: instances with confidence below τ sent to the teacher. "
                    "Teacher load adds the shadow samples. The dashed line is the budget "
                    "(variable teacher_budget) that τ is tuned to keep.",
                    t(f"sum({FALLBACKS}) / {ALL_PREDICTIONS}", "fallback share"),
                    t(
                        f"(sum({FALLBACKS}) + sum(rate(kdguard_shadow_sampled_total{{{M}}}"
                        f"[{RATE}]))) / {ALL_PREDICTIONS}",
                        "teacher load (fallback + shadow)",
                    ),
                    t("vector($teacher_budget)", "budget"),
                    unit="percentunit",
                    overrides=(
                        by_name(
                            "budget", **{"custom.lineStyle": {"fill": "dash", "dash": [10, 10]}}
                        ),
                    ),
                    width=12,
                ),
                ts(
                    "τ and π₀",
                    "The fallback threshold τ (confidence below it goes to the teacher) and "
                    "the shadow rate π₀, as each replica applies them.",
                    t(f"max(kdguard_fallback_threshold{{{M}}})", "τ"),
                    t(f"max(kdguard_shadow_rate{{{M}}})", "π₀"),
                    unit="percentunit",
                    width=12,
                ),
            ),
        ),
        Row(
            "Latency",
            (
                ts(
                    "Latency per stage (p50 / p90 / p99)",
                    "From the stage histograms summed over replicas: student (the forward "
                    "pass), teacher (a fallback call, up to its deadline), shadow (a shadow "
                    "call, off the request path) and total (the whole request).",
                    *quantiles("kdguard_stage_duration_seconds", M, "kind", "{{kind}}"),
                    unit="s",
                    width=12,
                    custom={"scaleDistribution": {"type": "log", "log": 10}},
                ),
                ts(
                    "Requests within 100 ms (SLO 99%)",
                    "Share of requests whose total time is under the 0.1 s bucket: the "
                    "latency SLO's good events. The burn-rate alerts fire on its misses.",
                    t(
                        f'sum(rate(kdguard_stage_duration_seconds_bucket{{{M}, kind="total", '
                        f'le="0.1"}}[{RATE}])) / sum(rate(kdguard_stage_duration_seconds_count'
                        f'{{{M}, kind="total"}}[{RATE}]))',
                        "within 100 ms",
                    ),
                    t("vector(0.99)", "objective"),
                    unit="percentunit",
                    maximum=1,
                ),
                ts(
                    "Teacher batch size (p50 / p90 / p99)",
                    "Rows per micro-batched teacher call: how much the teacher queue "
                    "coalesces under load.",
                    *quantiles("kdguard_teacher_batch_rows", M, "", ""),
                    width=4,
                ),
            ),
        ),
        Row(
            "Errors and degraded answers",
            (
                ts(
                    "Non-OK responses",
                    "Inference requests that did not succeed, per second: client_error (4xx, "
                    "bad input), rejected (503/429: not ready, or no finite answer), "
                    "server_error (5xx).",
                    t(
                        f"sum by (kind, outcome) (rate(kdguard_requests_total{{{M}, "
                        f'outcome!="ok"}}[{RATE}]))',
                        "{{kind}} {{outcome}}",
                    ),
                    unit="reqps",
                ),
                ts(
                    "Teacher errors by reason",
                    "Failed teacher calls: timeouts, connection errors, HTTP errors and "
                    "answers refused as invalid (wrong shape or classes, NaN, bad "
                    "probabilities), circuit open, queue full.",
                    t(
                        f"sum by (reason) (rate(kdguard_teacher_errors_total{{{M}}}[{RATE}]))",
                        "{{reason}}",
                    ),
                    unit="ops",
                ),
                ts(
                    "Degraded answers",
                    "Fallbacks the teacher could not answer, served by the student flagged "
                    "degraded: per second, and as a share of all fallbacks.",
                    t(
                        f'sum(rate(kdguard_predictions_total{{{MV}, outcome="degraded"}}[{RATE}]))',
                        "degraded per second",
                    ),
                    t(
                        f'sum(rate(kdguard_fallbacks_total{{{M}, outcome="degraded"}}[{RATE}]))'
                        f" / sum({FALLBACKS})",
                        "share of fallbacks",
                    ),
                    overrides=(
                        by_name(
                            "share of fallbacks",
                            unit="percentunit",
                            **{"custom.axisPlacement": "right"},
                        ),
                    ),
                ),
                ts(
                    "Teacher circuit breaker",
                    "Each replica's circuit: closed (calls go through), open (fallbacks "
                    "degrade at once and shadow work is dropped), half-open (one trial call).",
                    t(
                        f"max by (instance) (kdguard_teacher_circuit_state{{{M}}})",
                        "{{instance}}",
                    ),
                    kind="state-timeline",
                    mappings=CIRCUIT,
                    width=24,
                    height=5,
                ),
            ),
        ),
        Row(
            "Shadow and the teacher queue",
            (
                ts(
                    "Shadow sampled and dropped",
                    "Confident instances sampled for a shadow teacher call (π₀), and shadow "
                    "work dropped by reason (queue full, pre-empted by a fallback, circuit "
                    "open, expired, teacher errors, shutdown).",
                    t(f"sum(rate(kdguard_shadow_sampled_total{{{M}}}[{RATE}]))", "sampled"),
                    t(
                        f"sum by (reason) (rate(kdguard_shadow_dropped_total{{{M}}}[{RATE}]))",
                        "dropped: {{reason}}",
                    ),
                    unit="ops",
                ),
                ts(
                    "Shadow drop share",
                    "Dropped shadow work per shadow sample. Quality metrics are weighted, so "
                    "drops cost precision, not bias; sustained drops mean an undersized "
                    "teacher.",
                    t(
                        f"sum(rate(kdguard_shadow_dropped_total{{{M}}}[{RATE}])) / "
                        f"sum(rate(kdguard_shadow_sampled_total{{{M}}}[{RATE}]))",
                        "dropped / sampled",
                    ),
                    unit="percentunit",
                ),
                ts(
                    "Teacher queue and calls in flight",
                    "Rows waiting for the teacher (fallback rows go first) and teacher "
                    "calls in flight, summed over replicas and workers.",
                    t(f"sum by (kind) (kdguard_teacher_queue_depth{{{M}}})", "queued: {{kind}}"),
                    t(f"sum(kdguard_teacher_in_flight{{{M}}})", "in flight"),
                ),
            ),
        ),
        Row(
            "Recording",
            (
                ts(
                    "Prediction records",
                    "Records written to the database per second, and records dropped before "
                    "it (queue full, database down, shutdown).",
                    t(f"sum(rate(kdguard_records_written_total{{{M}}}[{RATE}]))", "written"),
                    t(
                        f"sum by (reason) (rate(kdguard_records_dropped_total{{{M}}}[{RATE}]))",
                        "dropped: {{reason}}",
                    ),
                    unit="ops",
                ),
                ts(
                    "Writer queue and database",
                    "Records waiting for the database (all replicas), and whether every "
                    "replica's last write succeeded (1) or not (0).",
                    t(f"sum(kdguard_writer_queue_rows{{{M}}})", "queued records"),
                    t(f"min(kdguard_database_up{{{M}}})", "database up"),
                    overrides=(by_name("database up", **{"custom.axisPlacement": "right"}),),
                ),
                ts(
                    "Write transaction time (p50 / p90 / p99)",
                    "Time of one batched insert transaction (COPY on PostgreSQL).",
                    *quantiles("kdguard_writer_flush_duration_seconds", M, "", ""),
                    unit="s",
                ),
            ),
        ),
    ),
)

# -- quality -------------------------------------------------------------------------------

QUALITY_NAMES = {
    "flip_rate": "flip rate",
    "teacher_gap": "teacher gap",
    "entropy_drift_js": "entropy drift",
    "accuracy_gap": "accuracy gap",
    "ece": "ECE",
}

QUALITY = Dashboard(
    uid="kdguard-quality",
    title="kdguard / quality",
    description="Student-vs-teacher and student-vs-truth metrics per window, with intervals "
    "and thresholds.",
    variables=(DATASOURCE_VARIABLE, MODEL, VERSION, WINDOW),
    rows=(
        Row(
            "State",
            (
                ts(
                    "Alert state per metric",
                    "The service's verdict on the newest window (matured, for the labelled "
                    "metrics): alert, ok, or too few samples to judge.",
                    *(
                        t(f"max(kdguard_{metric}_alert{{{W}}})", name)
                        for metric, name in QUALITY_NAMES.items()
                    ),
                    kind="stat",
                    mappings=ALERT_STATE,
                    width=16,
                    height=5,
                    options={"colorMode": "background", "textMode": "value_and_name"},
                ),
                ts(
                    "Label completeness",
                    "κ: share of the newest window's predictions that have a feedback label. "
                    "A window matures at κ* or at the label horizon.",
                    t(f"max(kdguard_label_completeness{{{W}}})", "κ"),
                    kind="gauge",
                    unit="percentunit",
                    width=8,
                    height=5,
                    minimum=0,
                    maximum=1,
                ),
            ),
        ),
        Row(
            "Label-free (current window)",
            (
                ts(
                    "Flip rate with 95% CI",
                    "Weighted share of teacher-observed requests where student and teacher "
                    "disagree (weights 1/π undo the fallback bias). Alerts when the CI's "
                    "lower bound exceeds the threshold.",
                    *with_ci("flip_rate", "flip rate"),
                    unit="percentunit",
                    overrides=CI_BAND,
                ),
                ts(
                    "Entropy drift and its threshold",
                    "Jensen-Shannon divergence of the student's entropy histogram (at the "
                    "frozen reference temperature) from its reference. The threshold is the "
                    "99th percentile of reference-vs-reference JS at this window's n.",
                    t(f"max(kdguard_entropy_drift_js{{{W}}})", "JS divergence"),
                    t(f"max(kdguard_entropy_drift_js_threshold{{{W}}})", "threshold"),
                    overrides=CI_BAND[2:],
                ),
                ts(
                    "Teacher gap (label-free) with 95% CI",
                    "Δ̃: mean of max q - q[student's label] on shadow traffic, the teacher "
                    "used as a calibrated reference. Tracks the accuracy gap before labels "
                    "arrive.",
                    *with_ci("teacher_gap", "teacher gap")[:3],
                    unit="percentunit",
                    overrides=CI_BAND[:2],
                ),
            ),
        ),
        Row(
            "Labelled (newest matured window)",
            (
                ts(
                    "Accuracy gap with 95% CI",
                    "Δ = teacher accuracy - student accuracy on labelled pairs (weighted). "
                    "Alerts when the lower bound exceeds the configured gap.",
                    *with_ci("accuracy_gap", "accuracy gap"),
                    unit="percentunit",
                    overrides=CI_BAND,
                ),
                ts(
                    "ECE with its threshold",
                    "Top-label expected calibration error (15 equal-width bins) with its "
                    "bootstrap CI. The threshold is max(null 95th percentile at this n, "
                    "floor): the ECE a perfectly calibrated student would reach by chance.",
                    *with_ci("ece", "ECE"),
                    overrides=CI_BAND,
                ),
                ts(
                    "Samples per metric",
                    "Rows (n) behind each metric's newest window, and the effective sample "
                    "size n_eff = (Σw)²/Σw² that the intervals use.",
                    *(
                        t(f"max(kdguard_{metric}_samples{{{W}}})", f"n {name}")
                        for metric, name in QUALITY_NAMES.items()
                    ),
                    *(
                        t(f"max(kdguard_{metric}_effective_samples{{{W}}})", f"n_eff {name}")
                        for metric, name in QUALITY_NAMES.items()
                    ),
                ),
                ts(
                    "Label completeness over time",
                    "κ of the newest window: labelled metrics wait for it (or for the label "
                    "horizon) before they are shown.",
                    t(f"max(kdguard_label_completeness{{{W}}})", "κ"),
                    unit="percentunit",
                    width=24,
                    height=5,
                    maximum=1,
                ),
            ),
        ),
        Row(
            "Distributions and knobs",
            (
                ts(
                    "Student confidence",
                    "Top-class probability at serving temperature, per scrape interval. "
                    "Mass moving down means more fallbacks; compare with τ.",
                    t(
                        f"sum by (le) (increase(kdguard_student_confidence_bucket{{{M}}}[{RATE}]))",
                        "{{le}}",
                        heatmap=True,
                    ),
                    kind="heatmap",
                ),
                ts(
                    "Student entropy (at the reference temperature)",
                    "Normalised entropy H/ln K at the frozen reference temperature, so "
                    "recalibration does not look like drift.",
                    t(
                        f"sum by (le) (increase(kdguard_student_entropy_bucket{{{M}}}[{RATE}]))",
                        "{{le}}",
                        heatmap=True,
                    ),
                    kind="heatmap",
                ),
                ts(
                    "Temperature and τ",
                    "The student's serving temperature per version (recalibration changes "
                    "it), and the fallback threshold τ (retuning changes it).",
                    t(
                        f"max by (version) (kdguard_student_temperature{{{MV}}})",
                        "T (version {{version}})",
                    ),
                    t(f"max(kdguard_fallback_threshold{{{M}}})", "τ"),
                    overrides=(
                        by_name("τ", unit="percentunit", **{"custom.axisPlacement": "right"}),
                    ),
                ),
            ),
        ),
    ),
)

# -- loop ----------------------------------------------------------------------------------

STAGE_INDEX = " + ".join(
    f'max by (version) (kdguard_rollout_stage{{{MV}, kind="{stage}"}}) * {i}'
    for i, stage in enumerate(("shadow", "ab", "promoted", "rolled_back"), start=1)
)

LOOP = Dashboard(
    uid="kdguard-loop",
    title="kdguard / loop",
    description="Trigger firings, jobs, rollouts and the versions being served.",
    variables=(DATASOURCE_VARIABLE, MODEL, VERSION),
    rows=(
        Row(
            "Triggers and jobs",
            (
                ts(
                    "Trigger firings",
                    "Trigger rules that fired, by rule and the action they start "
                    "(recalibrate, retune_threshold, redistill, alert_only).",
                    t(
                        f"sum by (reason, kind) (increase(kdguard_trigger_firings_total{{{M}}}"
                        f"[{RATE}]))",
                        "{{reason}} → {{kind}}",
                    ),
                    custom={"drawStyle": "bars", "fillOpacity": 80},
                ),
                ts(
                    "Jobs by kind and status",
                    "Job status changes: each job counts once when created (pending) and "
                    "once per status it reaches (running, succeeded, failed, cancelled).",
                    t(
                        f"sum by (kind, status) (increase(kdguard_jobs_total{{{M}}}[{RATE}]))",
                        "{{kind}} {{status}}",
                    ),
                    custom={"drawStyle": "bars", "fillOpacity": 80},
                ),
                ts(
                    "Jobs in the time range",
                    "How many jobs of each kind reached each status in the dashboard's time range.",
                    t(
                        f"sum by (kind, status) (increase(kdguard_jobs_total{{{M}}}[$__range]))",
                        "{{kind}} {{status}}",
                        instant=True,
                    ),
                    kind="bargauge",
                    options={"displayMode": "basic", "orientation": "horizontal"},
                ),
                ts(
                    "Job duration (p50 / p90 / p99, last hour)",
                    "Run time of finished jobs by kind, from the job-duration histogram "
                    "over the preceding hour.",
                    *(
                        t(
                            f"histogram_quantile({q}, sum by (le, kind) "
                            f"(increase(kdguard_job_duration_seconds_bucket{{{M}}}[1h])))",
                            f"p{round(q * 100)} {{{{kind}}}}",
                        )
                        for q in (0.5, 0.9, 0.99)
                    ),
                    unit="s",
                    width=24,
                    height=6,
                ),
            ),
        ),
        Row(
            "Rollout",
            (
                ts(
                    "Rollout stage",
                    "The stage each candidate version is in: shadow (both students run, the "
                    "incumbent answers), A/B (the candidate answers a share of routing "
                    "keys), then promoted or rolled back.",
                    t(STAGE_INDEX, "{{version}}"),
                    kind="state-timeline",
                    mappings=STAGES,
                    width=24,
                    height=5,
                ),
                ts(
                    "Candidate traffic share",
                    "Share of traffic the candidate answers (0 in shadow).",
                    t(
                        f"max by (version) (kdguard_rollout_traffic_share{{{MV}}})",
                        "version {{version}}",
                    ),
                    unit="percentunit",
                    maximum=1,
                ),
                ts(
                    "Promotion gate statistics",
                    "The gate's statistics of the candidate against the incumbent on paired "
                    "requests: pairs, agreement with the teacher, accuracy on labels "
                    "(McNemar p), ECE, and their deltas.",
                    t(
                        f"max by (version, kind) (kdguard_rollout_gate{{{MV}}})",
                        "{{version}} {{kind}}",
                    ),
                ),
                ts(
                    "Rollout decisions",
                    "Promotions and rollbacks, by the gate or by an operator.",
                    t(
                        f"sum by (outcome) (increase(kdguard_rollout_decisions_total{{{M}}}"
                        f"[{RATE}]))",
                        "{{outcome}}",
                    ),
                    custom={"drawStyle": "bars", "fillOpacity": 80},
                ),
            ),
        ),
        Row(
            "Versions",
            (
                ts(
                    "Active versions",
                    "The student and teacher versions loaded right now (on any replica).",
                    t(
                        f"max by (version, kind) (kdguard_model_info{{{M}}}) == 1",
                        "{{kind}} {{version}}",
                        instant=True,
                    ),
                    kind="table",
                    options={"showHeader": True},
                    width=12,
                ),
                ts(
                    "Activations",
                    "Version activations (load, validate, warm, swap) that succeeded or "
                    "failed; a failed one leaves the previous version serving.",
                    t(
                        f"sum by (kind, status) (increase(kdguard_model_activations_total"
                        f"{{{M}}}[{RATE}]))",
                        "{{kind}} {{status}}",
                    ),
                    custom={"drawStyle": "bars", "fillOpacity": 80},
                    width=12,
                ),
            ),
        ),
    ),
)

ALL = (OVERVIEW, QUALITY, LOOP)

# -- JSON -----------------------------------------------------------------------------------


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> Json:
    targets = []
    for index, target in enumerate(panel.targets):
        entry: Json = {
            "datasource": DATASOURCE,
            "refId": chr(ord("A") + index),
            "expr": target.expr,
            "legendFormat": target.legend or "__auto",
            "range": not target.instant,
            "instant": target.instant,
        }
        if target.heatmap:
            entry["format"] = "heatmap"
        if panel.kind == "table":
            entry["format"] = "table"
        targets.append(entry)
    defaults: Json = {
        "unit": panel.unit,
        "mappings": list(panel.mappings),
        "thresholds": {
            "mode": "absolute",
            "steps": [{"value": v, "color": c} for v, c in panel.thresholds]
            or [{"value": None, "color": "green"}],
        },
        "color": {"mode": "thresholds" if panel.mappings else "palette-classic"},
        "custom": dict(panel.custom),
    }
    if panel.minimum is not None:
        defaults["min"] = panel.minimum
    if panel.maximum is not None:
        defaults["max"] = panel.maximum
    options: Json = {
        "legend": {"showLegend": True, "displayMode": "list", "placement": "bottom"},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    if panel.kind == "heatmap":
        options = {"calculate": False, "yAxis": {"axisPlacement": "left"}, "cellGap": 1,
                   "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64}}  # fmt: skip
    options.update(panel.options)
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": panel.width, "h": panel.height},
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": list(panel.overrides)},
        "options": options,
    }


def dashboard_json(dashboard: Dashboard) -> Json:
    panels: list[Json] = []
    y = 0
    for row in dashboard.rows:
        panels.append({
            "id": len(panels) + 1, "type": "row", "title": row.title, "collapsed": False,
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": [],
        })  # fmt: skip
        y += 1
        x, row_height = 0, 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y, row_height = 0, y + row_height, 0
            panels.append(panel_json(panel, len(panels) + 1, x, y))
            x += panel.width
            row_height = max(row_height, panel.height)
        y += row_height
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": ["kdguard"],
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "timezone": "",
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "links": [
            {
                "type": "dashboards",
                "tags": ["kdguard"],
                "asDropdown": False,
                "title": "kdguard",
                "includeVars": True,
                "keepTime": True,
            },
        ],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {"list": list(dashboard.variables)},
        "panels": panels,
    }


def readme_table() -> str:
    """The README's description of every dashboard and panel."""
    lines: list[str] = []
    for dashboard in ALL:
        lines += [f"**{dashboard.title}** (`{dashboard.uid}`): {dashboard.description}", ""]
        lines += ["| panel | what it shows |", "|---|---|"]
        for row in dashboard.rows:
            for panel in row.panels:
                lines.append(f"| {row.title}: {panel.title} | {panel.description} |")
        lines.append("")
    return "\n".join(lines)


def rendered() -> dict[Path, str]:
    """Every file this script owns, with its content."""
    files = {
        DASHBOARDS / f"{d.uid}.json": json.dumps(dashboard_json(d), indent=2, ensure_ascii=False)
        + "\n"
        for d in ALL
    }
    text = README.read_text()
    if TABLE_START in text:
        head, rest = text.split(TABLE_START, 1)
        _, tail = rest.split(TABLE_END, 1)
        files[README] = f"{head}{TABLE_START}{readme_table()}{TABLE_END}{tail}"
    return files


def main() -> None:
    DASHBOARDS.mkdir(parents=True, exist_ok=True)
    for path, content in rendered().items():
        path.write_text(content)
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
