"""SQLAlchemy 2 tables. Alembic migrations (`migrations/`) are the only way they change.

Times are stored as float seconds since the epoch (UTC): portable across SQLite and
PostgreSQL and cheap to compare and bucket in aggregate queries. Hot aggregate inputs
(bins, per-row scalars) are stored as columns at insert time so every monitoring window
is a GROUP BY, never a scan of decoded blobs.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
# SQLite only auto-increments an INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON}


class ModelVersion(Base):
    """A registered version, mirrored from the registry directory for queries and audit."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64))
    temperature: Mapped[float] = mapped_column(Float)
    reference_temperature: Mapped[float] = mapped_column(Float)
    registered_at: Mapped[float] = mapped_column(Float)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)


class AuditEvent(Base):
    """Every state change that matters, written in the same transaction as the change."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(128))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Prediction(Base):
    """One answered instance (see monitoring.records.PredictionRecord)."""

    __tablename__ = "predictions"
    __table_args__ = (Index("ix_predictions_model_created", "model", "created_at"),)

    # The request id is the key: feedback joins on it, and no surrogate id means one index
    # and one sequence fewer to maintain on the hottest insert path.
    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    model: Mapped[str] = mapped_column(String(64))
    student_version: Mapped[str] = mapped_column(String(64))
    teacher_version: Mapped[str | None] = mapped_column(String(64))
    routing_key: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[float] = mapped_column(Float)
    served_by_teacher: Mapped[bool] = mapped_column(Boolean)
    degraded: Mapped[bool] = mapped_column(Boolean)
    teacher_outcome: Mapped[str] = mapped_column(String(16))
    teacher_error: Mapped[str | None] = mapped_column(String(32))
    # student side, at serving temperature (entropy at the frozen reference temperature)
    student_label: Mapped[int] = mapped_column(SmallInteger)
    confidence: Mapped[float] = mapped_column(Float)
    entropy: Mapped[float] = mapped_column(Float)
    conf_bin: Mapped[int] = mapped_column(SmallInteger)  # ECE cell 0..15 (15: c = 1.0)
    conf_fine: Mapped[int] = mapped_column(SmallInteger)  # 1000 equal-width bins
    entropy_fine: Mapped[int] = mapped_column(SmallInteger)  # 1000 equal-width bins
    # teacher side, when observed (fallback or shadow)
    teacher_label: Mapped[int | None] = mapped_column(SmallInteger)
    teacher_confidence: Mapped[float | None] = mapped_column(Float)  # max q
    teacher_p_student: Mapped[float | None] = mapped_column(Float)  # q[ŷs]
    total_variation: Mapped[float | None] = mapped_column(Float)  # half the L1 distance of p and q
    kl_teacher_student: Mapped[float | None] = mapped_column(Float)  # KL(q‖p)
    inclusion_probability: Mapped[float] = mapped_column(Float)
    fallback_threshold: Mapped[float] = mapped_column(Float)
    # T_s the student's probabilities were computed at (recalibration changes it at run
    # time); NULL on rows written before it was recorded.
    student_temperature: Mapped[float | None] = mapped_column(Float)
    student_probs: Mapped[bytes] = mapped_column(LargeBinary)  # float16, K values
    teacher_probs: Mapped[bytes | None] = mapped_column(LargeBinary)
    student_seconds: Mapped[float] = mapped_column(Float)
    teacher_seconds: Mapped[float | None] = mapped_column(Float)
    total_seconds: Mapped[float] = mapped_column(Float)


class PredictionInput(Base):
    """Logged inputs (a sample of traffic): the transfer set for re-distillation."""

    __tablename__ = "prediction_inputs"

    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    model: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float, index=True)
    features: Mapped[bytes] = mapped_column(LargeBinary)  # float32, little-endian


class Feedback(Base):
    """A ground-truth label for a request id the service issued; one per request id.

    The per-row quantities that need both the label and the stored probabilities are
    computed once here, so calibration and gap windows are plain SQL sums.
    """

    __tablename__ = "feedback"

    request_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("predictions.request_id", ondelete="CASCADE"), primary_key=True
    )
    model: Mapped[str] = mapped_column(String(64))
    label: Mapped[int] = mapped_column(SmallInteger)
    received_at: Mapped[float] = mapped_column(Float, index=True)
    client: Mapped[str] = mapped_column(String(64))
    student_correct: Mapped[bool] = mapped_column(Boolean)
    teacher_correct: Mapped[bool | None] = mapped_column(Boolean)
    nll: Mapped[float] = mapped_column(Float)  # -ln p[y] at serving temperature
    brier: Mapped[float] = mapped_column(Float)  # sum of (p - onehot(y))^2


class PredictionSums(Base):
    """Per time bucket and confidence decile: the sums behind the label-free metrics.

    Added to by the writer in the transaction that inserts the rows they count, so a
    window's flip rate and teacher-gap estimate are sums over its buckets (see
    `persistence.sums`). Weights are w = 1/π.
    """

    __tablename__ = "prediction_sums"

    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    bucket_start: Mapped[float] = mapped_column(Float, primary_key=True)
    decile: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)  # every row
    # rows with a teacher answer: flip rate, total variation, KL(q‖p)
    teacher_n: Mapped[int] = mapped_column(BigInteger)
    sum_w: Mapped[float] = mapped_column(Float)
    sum_w2: Mapped[float] = mapped_column(Float)
    sum_w_flip: Mapped[float] = mapped_column(Float)
    sum_w_tv: Mapped[float] = mapped_column(Float)
    sum_w_kl: Mapped[float] = mapped_column(Float)
    # those of them the student served: the served flip rate
    served_n: Mapped[int] = mapped_column(BigInteger)
    served_sum_w: Mapped[float] = mapped_column(Float)
    served_sum_w2: Mapped[float] = mapped_column(Float)
    served_sum_w_flip: Mapped[float] = mapped_column(Float)
    # shadow rows: the label-free accuracy-gap estimate, δ = max q - q[ŷs]
    shadow_n: Mapped[int] = mapped_column(BigInteger)
    shadow_sum_w: Mapped[float] = mapped_column(Float)
    shadow_sum_w2: Mapped[float] = mapped_column(Float)
    shadow_sum_w_delta: Mapped[float] = mapped_column(Float)
    shadow_sum_w_delta2: Mapped[float] = mapped_column(Float)


class EntropySums(Base):
    """Per time bucket: how many rows fell in each fine entropy bin (entropy drift)."""

    __tablename__ = "entropy_sums"

    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    bucket_start: Mapped[float] = mapped_column(Float, primary_key=True)
    entropy_fine: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)


class LabelSums(Base):
    """Per time bucket (of the prediction) and confidence cell: the sums behind the
    labelled metrics, added to by feedback in the transaction that stores each label."""

    __tablename__ = "label_sums"

    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    bucket_start: Mapped[float] = mapped_column(Float, primary_key=True)
    conf_bin: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    conf_fine: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    # every label: calibration (ECE cells and fine bins), NLL, Brier
    n: Mapped[int] = mapped_column(BigInteger)
    sum_correct: Mapped[float] = mapped_column(Float)
    sum_conf: Mapped[float] = mapped_column(Float)
    sum_nll: Mapped[float] = mapped_column(Float)
    sum_brier: Mapped[float] = mapped_column(Float)
    # labels whose prediction has a teacher answer: the paired accuracy gap
    paired_n: Mapped[int] = mapped_column(BigInteger)
    paired_sum_w: Mapped[float] = mapped_column(Float)
    paired_sum_w2: Mapped[float] = mapped_column(Float)
    both_w: Mapped[float] = mapped_column(Float)
    teacher_only_w: Mapped[float] = mapped_column(Float)
    student_only_w: Mapped[float] = mapped_column(Float)
    both_n: Mapped[int] = mapped_column(BigInteger)
    teacher_only_n: Mapped[int] = mapped_column(BigInteger)
    student_only_n: Mapped[int] = mapped_column(BigInteger)


class IdempotencyKey(Base):
    """A feedback request's Idempotency-Key, the hash of its body and the answer it got."""

    __tablename__ = "idempotency_keys"

    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    body_sha256: Mapped[str] = mapped_column(String(64))
    response: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[float] = mapped_column(Float, index=True)


class MetricWindow(Base):
    __tablename__ = "metric_windows"
    __table_args__ = (UniqueConstraint("model", "metric", "window", "window_start"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    model: Mapped[str] = mapped_column(String(64))
    metric: Mapped[str] = mapped_column(String(32))
    window: Mapped[str] = mapped_column(String(16))
    window_start: Mapped[float] = mapped_column(Float)
    window_end: Mapped[float] = mapped_column(Float)
    value: Mapped[float | None] = mapped_column(Float)
    ci_low: Mapped[float | None] = mapped_column(Float)
    ci_high: Mapped[float | None] = mapped_column(Float)
    n: Mapped[int] = mapped_column(Integer)
    n_eff: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16))
    label_completeness: Mapped[float | None] = mapped_column(Float)
    matured: Mapped[bool] = mapped_column(Boolean)
    computed_at: Mapped[float] = mapped_column(Float)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)


class EntropyReferenceRow(Base):
    """The frozen entropy reference of a student version (bins at its quantiles)."""

    __tablename__ = "entropy_references"
    __table_args__ = (UniqueConstraint("model", "version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(32))
    n: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)
    reference: Mapped[dict[str, Any]] = mapped_column()


class TriggerFiring(Base):
    __tablename__ = "trigger_firings"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    model: Mapped[str] = mapped_column(String(64))
    rule: Mapped[str] = mapped_column(String(64))
    metric: Mapped[str] = mapped_column(String(32))
    fired_at: Mapped[float] = mapped_column(Float, index=True)
    evidence: Mapped[dict[str, Any]] = mapped_column()
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))


class Job(Base):
    """A unit of loop work (recalibrate, retune_threshold, redistill) and its whole story.

    At most one job per (model, rule) is open (pending or running): a partial unique index
    makes that a database guarantee, so two replicas firing the same rule cannot both
    create one. Manual jobs use the rule name `manual:<kind>`.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        Index(
            "uq_jobs_open_rule",
            "model",
            "rule",
            unique=True,
            sqlite_where=text("status IN ('pending', 'running')"),
            postgresql_where=text("status IN ('pending', 'running')"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    model: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), index=True)
    rule: Mapped[str | None] = mapped_column(String(64))
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    progress_message: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    artifact: Mapped[str | None] = mapped_column(String(256))
    error: Mapped[str | None] = mapped_column(Text)
    runner: Mapped[str | None] = mapped_column(String(16))  # process | celery | cli
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    heartbeat_at: Mapped[float | None] = mapped_column(Float)
    applied: Mapped[bool] = mapped_column(Boolean, default=False)  # effect carried out


class Rollout(Base):
    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    model: Mapped[str] = mapped_column(String(64))
    candidate_version: Mapped[str] = mapped_column(String(64))
    incumbent_version: Mapped[str] = mapped_column(String(64))
    stage: Mapped[str] = mapped_column(String(16))
    traffic_share: Mapped[float] = mapped_column(Float)
    statistics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    decision: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    decided_at: Mapped[float | None] = mapped_column(Float)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)  # gate settings in force


class RolloutOutput(Base):
    """Both students' answers to one request sampled for a rollout: the gate's pairs.

    `arm` says which one served ("incumbent" or "candidate"); labels, the teacher's answer
    and π join in from `predictions` and `feedback` by request id.
    """

    __tablename__ = "rollout_outputs"

    rollout_id: Mapped[int] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float)
    arm: Mapped[str] = mapped_column(String(16))
    incumbent_label: Mapped[int] = mapped_column(SmallInteger)
    incumbent_confidence: Mapped[float] = mapped_column(Float)
    candidate_label: Mapped[int] = mapped_column(SmallInteger)
    candidate_confidence: Mapped[float] = mapped_column(Float)
    incumbent_seconds: Mapped[float] = mapped_column(Float)
    candidate_seconds: Mapped[float] = mapped_column(Float)


class ServingState(Base):
    """What every replica of a deployment serves; the loop and the admin API change it.

    Replicas poll `revision` and apply a change without a restart, so a job finished on
    a worker, or an admin call answered by another replica, reaches all of them.
    """

    __tablename__ = "serving_state"

    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer)
    student_version: Mapped[str] = mapped_column(String(64))
    temperature: Mapped[float] = mapped_column(Float)
    fallback_threshold: Mapped[float] = mapped_column(Float)
    shadow_rate: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    updated_by: Mapped[str] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
