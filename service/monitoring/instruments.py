"""Every Prometheus instrument kdguard exports, built against an injected registry.

Names start with `kdguard_`, use base units, `_total` for counters and histograms (never
summaries, so percentiles aggregate across replicas). Labels come from a small fixed set:
model, version, served_by, outcome, reason, kind, status.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency from ~50 µs (a small student) to seconds (a hung teacher hitting its deadline).
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
# Confidence lives in [1/K, 1] and matters most near the top, where τ usually sits.
CONFIDENCE_BUCKETS = (
    0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.975, 0.99, 0.995, 0.999, 1.0,
)  # fmt: skip
# Normalised entropy lives in [0, 1] and matters most near 0, where confident traffic sits.
ENTROPY_BUCKETS = (
    0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}
GaugeMode = Literal["livesum", "livemax", "livemin", "livemostrecent"]
# Jobs take from seconds (a temperature fit) to an hour (a large re-distillation).
JOB_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
JOB_KINDS = ("recalibrate", "retune_threshold", "redistill")
JOB_STATUSES = ("pending", "running", "succeeded", "failed", "cancelled")
ROLLOUT_STAGES = ("shadow", "ab", "promoted", "rolled_back")


@dataclass(frozen=True)
class Instruments:
    requests: Counter
    requests_rejected: Counter
    predictions: Counter
    latency: Histogram
    fallbacks: Counter
    shadow_sampled: Counter
    shadow_dropped: Counter
    teacher_errors: Counter
    teacher_batch_rows: Histogram
    teacher_queue_depth: Gauge
    teacher_in_flight: Gauge
    circuit_state: Gauge
    confidence: Histogram
    entropy: Histogram
    model_info: Gauge
    temperature: Gauge
    fallback_threshold: Gauge
    shadow_rate: Gauge
    activations: Counter
    records_written: Counter
    records_dropped: Counter
    writer_queue_rows: Gauge
    writer_flush_seconds: Histogram
    database_up: Gauge
    quality: dict[str, QualityGauges]
    label_completeness: Gauge
    trigger_firings: Counter
    jobs: Counter
    job_duration: Histogram
    rollout_stage: Gauge
    rollout_traffic_share: Gauge
    rollout_gate: Gauge
    rollout_decisions: Counter


@dataclass(frozen=True)
class QualityGauges:
    """One quality metric's gauges, labelled by model and window (`kind`)."""

    value: Gauge
    ci_low: Gauge
    ci_high: Gauge
    threshold: Gauge
    samples: Gauge
    effective_samples: Gauge
    alert: Gauge


QUALITY_METRICS = {
    "flip_rate": "Weighted flip rate: share of teacher-observed requests where the answers differ",
    "accuracy_gap": "Accuracy gap: teacher accuracy minus student accuracy on labelled pairs",
    "teacher_gap": "Label-free gap estimate: mean of max q - q[student label] on shadow traffic",
    "entropy_drift_js": "Jensen-Shannon divergence of student entropy from its frozen reference",
    "ece": "Top-label expected calibration error of the student (15 equal-width bins)",
}


def build_instruments(registry: CollectorRegistry) -> Instruments:
    """Create every instrument in `registry` (tests pass a fresh one each)."""

    def counter(name: str, doc: str, labels: tuple[str, ...]) -> Counter:
        return Counter(name, doc, labels, registry=registry)

    def gauge(
        name: str, doc: str, labels: tuple[str, ...], mode: GaugeMode = "livemostrecent"
    ) -> Gauge:
        # With several workers per host (multiprocess mode) each process holds its own value
        # and `mode` says how a scrape combines them; "live" modes forget dead workers.
        # The default, the most recently set value, suits values every worker sets alike
        # (settings, quality windows, rollout state); such gauges cannot inc()/dec().
        return Gauge(name, doc, labels, registry=registry, multiprocess_mode=mode)

    def histogram(
        name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]
    ) -> Histogram:
        return Histogram(name, doc, labels, registry=registry, buckets=buckets)

    return Instruments(
        requests=counter(
            "kdguard_requests",
            "Inference HTTP requests by API kind and outcome.",
            ("model", "kind", "outcome"),
        ),
        requests_rejected=counter(
            "kdguard_requests_rejected",
            "HTTP requests refused before any work, by API kind and reason.",
            ("model", "kind", "reason"),
        ),
        predictions=counter(
            "kdguard_predictions",
            "Instances answered, by who served them and outcome.",
            ("model", "version", "served_by", "outcome"),
        ),
        latency=histogram(
            "kdguard_stage_duration_seconds",
            "Time per stage: student, teacher (fallback), shadow, total.",
            ("model", "kind"),
            LATENCY_BUCKETS,
        ),
        fallbacks=counter(
            "kdguard_fallbacks",
            "Low-confidence instances sent to the teacher, by outcome.",
            ("model", "outcome"),
        ),
        shadow_sampled=counter(
            "kdguard_shadow_sampled",
            "Confident instances sampled for shadow teacher calls.",
            ("model",),
        ),
        shadow_dropped=counter(
            "kdguard_shadow_dropped",
            "Shadow teacher calls dropped, by reason.",
            ("model", "reason"),
        ),
        teacher_errors=counter(
            "kdguard_teacher_errors",
            "Failed teacher calls, by reason.",
            ("model", "reason"),
        ),
        teacher_batch_rows=histogram(
            "kdguard_teacher_batch_rows",
            "Rows per micro-batched teacher call.",
            ("model",),
            BATCH_BUCKETS,
        ),
        teacher_queue_depth=gauge(
            "kdguard_teacher_queue_depth",
            "Rows waiting for the teacher, by kind.",
            ("model", "kind"),
            "livesum",  # each worker has its own queue
        ),
        teacher_in_flight=gauge(
            "kdguard_teacher_in_flight",
            "Teacher calls in flight.",
            ("model",),
            "livesum",
        ),
        circuit_state=gauge(
            "kdguard_teacher_circuit_state",
            "Teacher circuit breaker: 0 closed, 1 half-open, 2 open.",
            ("model",),
            "livemax",  # one breaker per worker: open if any is open
        ),
        confidence=histogram(
            "kdguard_student_confidence",
            "Student top-class probability at serving temperature.",
            ("model",),
            CONFIDENCE_BUCKETS,
        ),
        entropy=histogram(
            "kdguard_student_entropy",
            "Student normalised entropy at the frozen reference temperature.",
            ("model",),
            ENTROPY_BUCKETS,
        ),
        model_info=gauge(
            "kdguard_model_info",
            "1 for each loaded version, by kind (student/teacher).",
            ("model", "version", "kind"),
            "livemax",  # loaded in any live worker
        ),
        temperature=gauge(
            "kdguard_student_temperature",
            "Serving temperature of the active student.",
            ("model", "version"),
        ),
        fallback_threshold=gauge(
            "kdguard_fallback_threshold",
            "Confidence threshold τ below which the teacher answers.",
            ("model",),
        ),
        shadow_rate=gauge(
            "kdguard_shadow_rate",
            "Share π₀ of confident traffic sent to the teacher in shadow.",
            ("model",),
        ),
        activations=counter(
            "kdguard_model_activations",
            "Model version activations, by kind and status.",
            ("model", "kind", "status"),
        ),
        records_written=counter(
            "kdguard_records_written", "Prediction records written to the database.", ("model",)
        ),
        records_dropped=counter(
            "kdguard_records_dropped",
            "Prediction records dropped before reaching the database, by reason.",
            ("model", "reason"),
        ),
        writer_queue_rows=gauge(
            "kdguard_writer_queue_rows",
            "Prediction records waiting for the database.",
            ("model",),
            "livesum",
        ),
        writer_flush_seconds=histogram(
            "kdguard_writer_flush_duration_seconds",
            "Time to write one batch of records.",
            ("model",),
            LATENCY_BUCKETS,
        ),
        database_up=gauge(
            "kdguard_database_up",
            "1 while the last database write succeeded.",
            ("model",),
            "livemin",  # down if any worker's writes fail
        ),
        quality={name: _quality(gauge, name, doc) for name, doc in QUALITY_METRICS.items()},
        label_completeness=gauge(
            "kdguard_label_completeness",
            "Share of a window's predictions that have a label.",
            ("model", "kind"),
        ),
        trigger_firings=counter(
            "kdguard_trigger_firings",
            "Trigger rules that fired, by action (kind) and rule name (reason).",
            ("model", "kind", "reason"),
        ),
        jobs=counter(
            "kdguard_jobs",
            "Job status changes: each job counts once when created (pending) and once per "
            "status it reaches.",
            ("model", "kind", "status"),
        ),
        job_duration=histogram(
            "kdguard_job_duration_seconds",
            "Run time of finished jobs, by kind and final status.",
            ("model", "kind", "status"),
            JOB_BUCKETS,
        ),
        rollout_stage=gauge(
            "kdguard_rollout_stage",
            "1 for the stage (kind) a candidate version's rollout is in, 0 for the others.",
            ("model", "version", "kind"),
        ),
        rollout_traffic_share=gauge(
            "kdguard_rollout_traffic_share",
            "Share of traffic a candidate version serves (0 in shadow).",
            ("model", "version"),
        ),
        rollout_gate=gauge(
            "kdguard_rollout_gate",
            "Promotion gate statistics of a candidate against the incumbent, by statistic.",
            ("model", "version", "kind"),
        ),
        rollout_decisions=counter(
            "kdguard_rollout_decisions",
            "Rollout decisions, by outcome (promoted, rolled_back).",
            ("model", "outcome"),
        ),
    )


def initialise_loop_series(instruments: Instruments, model: str, rules: dict[str, str]) -> None:
    """Create the loop's counter series at zero, so rates and alerts see them from start.

    `rules` maps each trigger rule's name to its action.
    """
    for rule, action in rules.items():
        instruments.trigger_firings.labels(model, action, rule)
    for kind in JOB_KINDS:
        for status in JOB_STATUSES:
            instruments.jobs.labels(model, kind, status)
    for outcome in ("promoted", "rolled_back"):
        instruments.rollout_decisions.labels(model, outcome)


def _quality(
    gauge: Callable[[str, str, tuple[str, ...]], Gauge], name: str, doc: str
) -> QualityGauges:
    labels = ("model", "kind")  # kind: the window, e.g. 5m
    base = f"kdguard_{name}"
    return QualityGauges(
        value=gauge(base, f"{doc}.", labels),
        ci_low=gauge(f"{base}_ci_low", f"{doc}: lower bound of its interval.", labels),
        ci_high=gauge(f"{base}_ci_high", f"{doc}: upper bound of its interval.", labels),
        threshold=gauge(f"{base}_threshold", f"{doc}: the threshold it is judged against.", labels),
        samples=gauge(f"{base}_samples", f"{doc}: rows in the window.", labels),
        effective_samples=gauge(
            f"{base}_effective_samples", f"{doc}: effective sample size n_eff.", labels
        ),
        alert=gauge(f"{base}_alert", f"{doc}: 1 alert, 0 ok, -1 too few samples.", labels),
    )
