"""One settings tree: YAML file + `KDGUARD_*` environment variables, nested with `__`.

Precedence (highest first): values passed to `Settings(...)`, environment variables, the
YAML file named by `--config` or `KDGUARD_CONFIG`, then the defaults below. Every field is
documented here; the README's configuration table is generated from the same descriptions
(`kdguard config --describe`).
"""

from __future__ import annotations

import json
import os
import re
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from service.errors import ConfigError

_PLACEHOLDER = re.compile(r"change.?me|example|secret|password|xxxx", re.IGNORECASE)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""Model names and version ids: no slashes, no leading dot, so no path can escape."""


class Environment(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class Scope(StrEnum):
    PREDICT = "predict"
    FEEDBACK = "feedback"
    ADMIN = "admin"


class ServerSettings(BaseModel):
    host: str = Field("127.0.0.1", description="Interface to bind.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to bind.")
    max_body_bytes: int = Field(
        1_048_576, ge=1024, description="Largest request body; larger ones get 413 unread."
    )
    max_batch: int = Field(256, ge=1, description="Most instances in one inference request.")
    max_in_flight: int = Field(
        64,
        ge=1,
        description=(
            "Most inference requests one server process works on at once; more get 503 with "
            "`Retry-After` at once. A student answer takes well under a millisecond, so requests "
            "pile up only while they wait for the teacher or a worker thread: 64 keeps a 2-core "
            "host busy without queueing seconds of work."
        ),
    )
    inline_max_rows: int = Field(
        32,
        ge=0,
        description=(
            "Batches up to this many rows run the student on the event loop (a small ONNX "
            "model takes microseconds, less than a thread hand-off); larger ones run in a "
            "worker thread."
        ),
    )
    student_threads: int = Field(
        2, ge=1, description="Worker threads for large student batches (capacity limit)."
    )
    fast_path: bool = Field(
        True,
        description=(
            "Answer the two inference routes from a lean ASGI handler in front of FastAPI's "
            "router (same handlers, errors and metrics; much less overhead per request)."
        ),
    )
    gil_switch_interval_s: float = Field(
        0.0005,
        gt=0,
        description=(
            "Python's thread switch interval in the server process. The student call "
            "releases the GIL on every request; with the default 5 ms a background thread "
            "(writer, teacher) can hold it that long and stall the event loop."
        ),
    )
    gc_freeze: bool = Field(
        True,
        description=(
            "Move everything built at start-up out of the garbage collector's reach "
            "(gc.freeze): full collections then skip the models and libraries, instead of "
            "pausing every request for tens of milliseconds."
        ),
    )
    gc_threshold: int | None = Field(
        20_000,
        ge=100,
        description=(
            "Young garbage collections run after this many more container objects are "
            "allocated than freed (gc.set_threshold's first value; None leaves it as it is, "
            "700 by default). "
            "The prediction writer keeps each request's record for up to a second, so at "
            "700 a young collection ran every few hundred requests and carried the records "
            "through the older generations: ~1.2 µs of the event loop per request."
        ),
    )
    opentelemetry: bool = Field(
        False,
        description=(
            "Turn on FastAPI's native OpenTelemetry tracing, metrics and logs (it checks its "
            "providers on every request, so it is off unless you export traces)."
        ),
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="Seconds to finish in-flight work on SIGTERM."
    )
    workers: int = Field(
        1,
        ge=1,
        description=(
            "Server processes on this host, sharing its port (`kdguard serve`). More than one "
            "turns on Prometheus multiprocess mode: /metrics adds up every process."
        ),
    )
    metrics_dir: Path | None = Field(
        None,
        description=(
            "Directory for the Prometheus multiprocess files when workers > 1 (its *.db files "
            "are removed at start); default: a new temporary directory, removed at exit."
        ),
    )


class RegistrySettings(BaseModel):
    root: Path = Field(Path(".kdguard/registry"), description="Directory of model versions.")


class ModelSettings(BaseModel):
    name: str = Field("digits", description="Deployment name: the model name clients use.")
    student_version: str | None = Field(
        None, description="Pin the student version; default: the registry's active one."
    )

    @field_validator("name", "student_version")
    @classmethod
    def _safe_name(cls, value: str | None) -> str | None:
        if value is not None and not NAME_PATTERN.match(value):
            raise ValueError(f"{value!r} is not a valid name (letters, digits, . _ -)")
        return value


class RoutingSettings(BaseModel):
    fallback_threshold: float = Field(
        0.6, ge=0.0, le=1.0, description="τ: student confidence below this goes to the teacher."
    )
    shadow_rate: float = Field(
        0.1, ge=0.0, le=1.0, description="π₀: share of confident traffic also sent to the teacher."
    )
    seed: int | None = Field(None, description="Seed for shadow sampling (tests, replays).")


class CircuitSettings(BaseModel):
    failure_threshold: int = Field(
        5, ge=1, description="Consecutive teacher failures that open the circuit."
    )
    reset_after_s: float = Field(
        2.0, gt=0, description="Seconds the circuit stays open before one trial call."
    )


class RemoteTeacherSettings(BaseModel):
    url: str = Field("http://127.0.0.1:8001", description="Base URL of an OIP v2 server.")
    model_name: str = Field("digits-teacher", description="Model name on the remote server.")
    model_version: str | None = Field(None, description="Model version on the remote server.")
    input_name: str = Field("input", description="Name of the remote model's input tensor.")
    output_name: str = Field("logits", description="Output tensor to read.")
    output_kind: Literal["logits", "probabilities"] = Field(
        "logits", description="Whether that output holds logits or probabilities."
    )
    version_label: str = Field(
        "remote", description="Teacher version recorded with each prediction."
    )
    headers: dict[str, SecretStr] = Field(
        default_factory=dict, description="Extra headers, e.g. an authorization token."
    )


class TeacherSettings(BaseModel):
    mode: Literal["local", "remote", "none"] = Field(
        "local", description="local: ONNX file from the registry; remote: an OIP server."
    )
    local_name: str | None = Field(
        None, description="Registry name of the local teacher; default `<model>-teacher`."
    )
    local_version: str | None = Field(None, description="Pin the local teacher version.")
    local_inline_max_s: float = Field(
        0.0002,
        ge=0,
        description=(
            "A local teacher call expected to take at most this long runs on the event "
            "loop instead of a thread (a thread hand-off costs more than a small model)."
        ),
    )
    deadline_s: float = Field(
        0.25, gt=0, description="Most time a fallback waits for the teacher before degrading."
    )
    shadow_timeout_s: float = Field(2.0, gt=0, description="Time limit of a shadow call.")
    max_concurrency: int = Field(2, ge=1, description="Most teacher calls in flight at once.")
    max_batch: int = Field(64, ge=1, description="Most rows in one micro-batched teacher call.")
    shadow_batch_wait_s: float = Field(
        0.002,
        ge=0,
        description=(
            "How long a worker holding only shadow work waits for more rows to fill its "
            "batch. Fallback batches never wait: a client is waiting on them."
        ),
    )
    queue_capacity: int = Field(
        1024, ge=1, description="Teacher queue bound in rows; shadow work is dropped past it."
    )
    circuit: CircuitSettings = Field(default_factory=CircuitSettings)
    remote: RemoteTeacherSettings = Field(default_factory=RemoteTeacherSettings)


class DatabaseSettings(BaseModel):
    url: SecretStr = Field(
        SecretStr("sqlite:///.kdguard/kdguard.db"),
        description=(
            "SQLAlchemy URL: SQLite (embedded, WAL) by default; PostgreSQL in production, "
            "e.g. postgresql+psycopg://user:pass@host:5432/kdguard."
        ),
    )
    auto_migrate: bool = Field(
        True, description="Run migrations to head at start (else use `kdguard migrate`)."
    )
    pool_size: int = Field(5, ge=1, description="Connections per process (PostgreSQL).")


class RecordingSettings(BaseModel):
    enabled: bool = Field(True, description="Record predictions to the database.")
    queue_rows: int = Field(
        100_000,
        ge=1,
        description="Most records waiting for the database; past it they are dropped and counted.",
    )
    batch_rows: int = Field(
        5000,
        ge=1,
        description=(
            "Most records in one insert transaction. Each flush has a fixed cost (a"
            " transaction, round trips), so fewer, larger ones cost less per record."
        ),
    )
    flush_interval_s: float = Field(
        1.0,
        gt=0,
        description=(
            "How often the writer flushes (sooner when `batch_rows` records wait, or when"
            " feedback needs its predictions stored)."
        ),
    )
    writer_process: bool = Field(
        True,
        description=(
            "Insert from a child process, so database work never holds the serving process's"
            " GIL (an in-memory SQLite database is always written in-process)."
        ),
    )
    writer_niceness: int = Field(
        10,
        ge=0,
        le=19,
        description=(
            "How much the writer process yields the CPU to the serving process (nice"
            " value, and the batch scheduling class): a flush is a burst of CPU work that"
            " can wait, an answer cannot. 0 schedules it like the server."
        ),
    )
    retry_backoff_s: float = Field(
        0.5, gt=0, description="First wait before retrying a failed write (doubles)."
    )
    retry_backoff_max_s: float = Field(5.0, gt=0, description="Longest wait between retries.")
    input_sample_rate: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="Share of requests whose inputs are logged (the re-distillation transfer set).",
    )
    input_retention_rows: int = Field(
        1_000_000, ge=1, description="Most logged inputs kept; the oldest go first."
    )
    bucket_s: int = Field(
        60,
        ge=1,
        le=86_400,
        description=(
            "Length of the time buckets the metric sums are kept in (by prediction time);"
            " every monitoring window must be a multiple of it. A change applies to rows"
            " written from then on."
        ),
    )


_DURATION = re.compile(r"^(\d+)([smhd])$")


def duration_seconds(text: str) -> float:
    """'30s', '5m', '1h', '1d' → seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 30s, 5m, 1h or 1d")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


class MonitoringSettings(BaseModel):
    enabled: bool = Field(True, description="Evaluate metric windows in the background.")
    interval_s: float = Field(15.0, gt=0, description="How often the windows are evaluated.")
    windows: list[str] = Field(
        default_factory=lambda: ["5m", "1h", "1d"],
        description="Window lengths (tumbling, by prediction time), e.g. 30s, 5m, 1h, 1d.",
    )
    label_completeness_target: float = Field(
        0.8, gt=0, le=1, description="κ*: a window whose label share reaches it is matured."
    )
    label_delay_horizon_s: float = Field(
        21_600, gt=0, description="A window this old is matured whatever its labels."
    )
    min_samples: int = Field(100, ge=1, description="Fewest rows (n_eff) a metric needs.")
    flip_threshold: float = Field(
        0.1, gt=0, lt=1, description="Flip rate whose lower bound above it is an alert."
    )
    gap_threshold: float = Field(
        0.02, gt=0, lt=1, description="Accuracy gap whose lower bound above it is an alert."
    )
    ece_floor: float = Field(0.03, gt=0, lt=1, description="Smallest ECE that can alert.")
    drift_w1_floor: float = Field(
        0.02, gt=0, lt=1, description="Smallest Wasserstein-1 on entropy that can alert."
    )
    reference_min_samples: int = Field(
        500, ge=50, description="Rows needed to freeze an entropy reference from traffic."
    )

    @field_validator("windows")
    @classmethod
    def _durations(cls, value: list[str]) -> list[str]:
        for text in value:
            duration_seconds(text)
        if not value:
            raise ValueError("at least one window")
        return value


class TriggerRule(BaseModel):
    """One rule of the closed loop: when a metric's window statistic crosses a value."""

    name: str = Field(pattern=NAME_PATTERN.pattern, description="Unique rule name.")
    metric: Literal["flip_rate", "accuracy_gap", "teacher_gap", "entropy_drift_js", "ece"]
    statistic: Literal["value", "ci_low", "ci_high", "alert"] = Field(
        "value", description="Which number of the metric window is compared."
    )
    comparison: Literal[">", ">=", "<", "<="] = ">"
    value: float | None = Field(
        None, description="Threshold; None compares with the window's own threshold."
    )
    window: str = Field("1h", description="Which monitoring window the rule reads.")
    min_samples: float = Field(100, ge=1, description="Fewest effective samples (n_eff).")
    consecutive: int = Field(2, ge=1, description="Windows in a row that must cross.")
    matured_only: bool = Field(True, description="Only windows whose labels matured count.")
    cooldown_s: float = Field(3600, ge=0, description="Quiet time after a firing.")
    unless_alerting: list[str] = Field(
        default_factory=list, description="Metrics whose newest window in alert vetoes the rule."
    )
    action: Literal["recalibrate", "retune_threshold", "redistill", "alert_only"]
    params: dict[str, Any] = Field(default_factory=dict, description="Parameters for the job.")

    @field_validator("window")
    @classmethod
    def _duration(cls, value: str) -> str:
        duration_seconds(value)
        return value


def _default_rules() -> list[TriggerRule]:
    """METRICS.md "Actions": ECE alone → recalibrate; gap or served flips → re-distil."""
    return [
        TriggerRule(
            name="miscalibrated", metric="ece", statistic="alert", comparison=">=", value=1.0,
            consecutive=2, unless_alerting=["accuracy_gap"], action="recalibrate",
        ),
        TriggerRule(
            name="accuracy-gap", metric="accuracy_gap", statistic="ci_low", comparison=">",
            consecutive=1, action="redistill",
        ),
        TriggerRule(
            name="flips", metric="flip_rate", statistic="ci_low", comparison=">",
            consecutive=3, matured_only=False, action="redistill",
        ),
        TriggerRule(
            name="entropy-drift", metric="entropy_drift_js", statistic="alert", comparison=">=",
            value=1.0, consecutive=2, matured_only=False, action="alert_only",
        ),
    ]  # fmt: skip


class TriggerSettings(BaseModel):
    enabled: bool = Field(True, description="Evaluate trigger rules after each monitor pass.")
    rules: list[TriggerRule] = Field(
        default_factory=_default_rules, description="The rules (defaults follow METRICS.md)."
    )

    @field_validator("rules")
    @classmethod
    def _unique(cls, value: list[TriggerRule]) -> list[TriggerRule]:
        names = [rule.name for rule in value]
        if len(set(names)) < len(names):
            raise ValueError("trigger rule names must be unique")
        return value


class JobSettings(BaseModel):
    runner: Literal["process", "celery", "none"] = Field(
        "process",
        description=(
            "Where jobs run: a child process of the server (a crash or OOM never takes it "
            "down), Celery workers (`kdguard worker`), or nowhere (jobs wait as pending)."
        ),
    )
    timeout_s: float = Field(1800, gt=0, description="A job running longer is killed and failed.")
    max_running: int = Field(1, ge=1, description="Jobs one server runs at once (process runner).")
    broker_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"),
        description="Celery broker (redis://… or amqp://…) for the celery runner.",
    )
    queue: str = Field("kdguard-jobs", description="Celery queue name.")
    apply_interval_s: float = Field(
        2.0, gt=0, description="How often a server picks up finished jobs and state changes."
    )


class RolloutSettings(BaseModel):
    sample_rate: float = Field(
        0.5, gt=0, le=1, description="Share of requests on which both students run in a rollout."
    )
    ab_share: float = Field(
        0.2, gt=0, lt=1, description="Share of routing keys the candidate serves in A/B."
    )
    min_pairs: int = Field(300, ge=10, description="Paired requests the gate needs per stage.")
    min_labelled: int = Field(
        100, ge=0, description="Labelled pairs the gate needs for the accuracy test."
    )
    alpha: float = Field(0.05, gt=0, lt=1, description="Significance of the gate's tests.")
    max_churn: float = Field(
        0.15, gt=0, le=1, description="Most share of requests where the two students disagree."
    )
    max_ece_increase: float = Field(0.02, ge=0, description="ECE the candidate may add.")
    max_agreement_drop: float = Field(
        0.01, ge=0, description="Teacher agreement the candidate may lose."
    )
    max_latency_ratio: float = Field(1.5, gt=0, description="Candidate/incumbent p50 latency.")
    auto_advance: bool = Field(True, description="Move shadow → A/B when the gate passes.")
    auto_promote: bool = Field(True, description="Promote from A/B when the gate passes.")
    auto_rollback: bool = Field(True, description="Roll back when the gate fails.")
    stuck_after_s: float = Field(
        86_400, gt=0, description="A rollout in one stage this long is reported stuck."
    )


class ApiKey(BaseModel):
    name: str = Field(description="Who holds the key (appears in logs, never the key).")
    key: SecretStr = Field(description="The key itself, at least 16 characters.")
    scopes: list[Scope] = Field(default_factory=lambda: [Scope.PREDICT])

    @field_validator("key")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 16:
            raise ValueError("API keys must be at least 16 characters")
        return value


class AuthSettings(BaseModel):
    api_keys: list[ApiKey] = Field(
        default_factory=list, description="Keys and their scopes; admin needs the admin scope."
    )
    require_predict_key: bool = Field(
        False, description="Require a predict-scoped key on inference routes."
    )
    require_feedback_key: bool = Field(
        False,
        description="Require a feedback-scoped key on /v1/feedback (labels drive retraining).",
    )


class FeedbackSettings(BaseModel):
    """Limits on `/v1/feedback` and the check of its labels before a retraining job uses them."""

    rate_per_s: float = Field(
        100.0,
        ge=0,
        description=(
            "Labels per second one client may send to /v1/feedback: a token bucket per "
            "client (its feedback key's name, else its address) in each server process; a "
            "batch of n labels costs n. Past it: 429 with `Retry-After`, nothing stored. "
            "0 turns the limit off."
        ),
    )
    burst: int = Field(
        2000,
        ge=1,
        description=(
            "Labels one client may send at once before `rate_per_s` applies (the bucket's "
            "size); at least `server.max_batch`, so any valid batch can get through."
        ),
    )
    max_clients: int = Field(
        10_000,
        ge=1,
        description=(
            "Clients whose buckets one process keeps; past it the client idle longest is "
            "forgotten (it comes back with a full bucket)."
        ),
    )
    max_client_share: float = Field(
        1.0,
        gt=0,
        le=1,
        description=(
            "Largest share of a retraining job's labels one client may supply; a client "
            "past it keeps an evenly spaced part of its labels, as many as the share allows "
            "(the rest count as unlabelled). With one client every label is its own, so "
            "below 1 this needs several labelling clients. 1 turns the check off."
        ),
    )
    max_teacher_disagreement: float = Field(
        0.8,
        gt=0,
        le=1,
        description=(
            "A client whose labels disagree with the teacher's answer on more than this "
            "share of its labelled rows that have one has all its labels left out of a "
            "retraining job (honest labels disagree as often as the teacher is wrong; "
            "random ones over 10 classes on 90%). 1 turns the check off."
        ),
    )
    disagreement_min_labels: int = Field(
        50,
        ge=1,
        description=(
            "Fewest of a client's labels with a teacher answer before "
            "`max_teacher_disagreement` judges it."
        ),
    )


class Settings(BaseSettings):
    """The whole configuration of one kdguard process."""

    model_config = SettingsConfigDict(
        env_prefix="KDGUARD_", env_nested_delimiter="__", extra="forbid"
    )

    environment: Environment = Field(Environment.DEVELOPMENT, description="Deployment kind.")
    data_dir: Path = Field(Path(".kdguard"), description="Where the demo keeps its files.")
    log_level: str = Field("info", description="Python logging level.")
    server: ServerSettings = Field(default_factory=ServerSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    teacher: TeacherSettings = Field(default_factory=TeacherSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    recording: RecordingSettings = Field(default_factory=RecordingSettings)
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    triggers: TriggerSettings = Field(default_factory=TriggerSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file (if `load_settings` named one) sits below the environment.
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))

    @model_validator(mode="after")
    def _windows_fit_buckets(self) -> Settings:
        bucket = self.recording.bucket_s
        for window in self.monitoring.windows:
            if duration_seconds(window) % bucket:
                raise ValueError(
                    f"monitoring window {window} is not a multiple of recording.bucket_s"
                    f" ({bucket} s): windows are sums of whole buckets"
                )
        return self

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        secrets = [k.key.get_secret_value() for k in self.auth.api_keys]
        if len(set(secrets)) < len(secrets):
            raise ValueError("two API keys share the same secret")
        if self.feedback.rate_per_s > 0 and self.feedback.burst < self.server.max_batch:
            raise ValueError(
                f"feedback.burst ({self.feedback.burst}) must be at least server.max_batch "
                f"({self.server.max_batch}): a full batch of labels could never get through"
            )
        if self.environment is Environment.PRODUCTION:
            for key in self.auth.api_keys:
                if _PLACEHOLDER.search(key.key.get_secret_value()):
                    raise ValueError(f"API key {key.name!r} looks like a placeholder")
            if self.routing.seed is not None:
                raise ValueError("routing.seed makes shadow sampling predictable; unset it")
        return self

    @property
    def teacher_name(self) -> str:
        return self.teacher.local_name or f"{self.model.name}-teacher"


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from a YAML file (argument, else `KDGUARD_CONFIG`), the environment
    and explicit overrides."""
    chosen = config_file or os.environ.get("KDGUARD_CONFIG")
    if not chosen:
        return Settings(**overrides)
    path = Path(chosen)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with_file = type(
        "Settings", (Settings,), {"model_config": {**Settings.model_config, "yaml_file": path}}
    )
    settings: Settings = with_file(**overrides)
    return settings


def describe_settings() -> str:
    """A Markdown table of every setting: YAML path, environment variable, default, meaning.

    The README's configuration table is this output; a test keeps the two identical.
    """
    lines = [
        "| setting (YAML path) | environment variable | default | description |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| `{path}` | `KDGUARD_{path.upper().replace('.', '__')}` | {default} | {doc} |"
        for path, default, doc in _walk(Settings, "")
    ]
    return "\n".join(lines)


def _walk(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += _walk(annotation, f"{path}.")
            continue
        default: Any = field.get_default(call_default_factory=True)
        shown = (
            "(unset)"
            if default is None
            else f"`{default.value if isinstance(default, StrEnum) else default}`"
        )
        if isinstance(default, list | dict) and not default:
            shown = "(empty)"
        rows.append((path, shown, (field.description or "").replace("|", "\\|")))
    return rows


def settings_json(settings: Settings) -> str:
    """The settings as JSON with secrets in clear, for a child process's stdin only."""

    def plain(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        return str(value)

    return json.dumps(settings.model_dump(mode="python"), default=plain)
