"""Repository functions of the closed loop: serving state, jobs, firings, rollouts, audit.

Every state change that matters is one transaction with its audit row: callers pass an
open `Connection` inside `engine.begin()`. Status changes are conditional UPDATEs
(`... WHERE status = 'pending'`), so of two replicas or two clients racing for the same
change exactly one wins and the other learns it lost (a `ConflictError`, HTTP 409).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from service.errors import ConflictError, NotFoundError
from service.persistence.tables import (
    AuditEvent,
    Job,
    MetricWindow,
    Rollout,
    RolloutOutput,
    ServingState,
    TriggerFiring,
)

OPEN_JOB = ("pending", "running")
FINISHED_JOB = ("succeeded", "failed", "cancelled")
OPEN_ROLLOUT = ("shadow", "ab")


def audit(
    connection: Connection,
    *,
    actor: str,
    action: str,
    model: str,
    subject: str,
    details: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> None:
    connection.execute(
        insert(AuditEvent).values(
            at=time.time() if now is None else now,
            actor=actor[:64],
            action=action,
            model=model,
            subject=subject[:128],
            details=dict(details or {}),
        )
    )


def list_audit(
    connection: Connection, *, model: str, action_prefix: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """Audit events, newest first; `action_prefix` e.g. "temperature" for the T history."""
    query = (
        select(AuditEvent.id, AuditEvent.at, AuditEvent.actor, AuditEvent.action,
               AuditEvent.subject, AuditEvent.details)
        .where(AuditEvent.model == model)
        .order_by(AuditEvent.id.desc())
        .limit(limit)
    )  # fmt: skip
    if action_prefix:
        query = query.where(AuditEvent.action.startswith(action_prefix, autoescape=True))
    return [dict(row._mapping) for row in connection.execute(query)]


# -- serving state -------------------------------------------------------------------------


@dataclass(frozen=True)
class State:
    model: str
    revision: int
    student_version: str
    temperature: float
    fallback_threshold: float
    shadow_rate: float
    updated_at: float
    updated_by: str
    details: dict[str, Any]


_STATE_COLUMNS = (
    ServingState.model,
    ServingState.revision,
    ServingState.student_version,
    ServingState.temperature,
    ServingState.fallback_threshold,
    ServingState.shadow_rate,
    ServingState.updated_at,
    ServingState.updated_by,
    ServingState.details,
)


def read_state(connection: Connection, model: str) -> State | None:
    row = connection.execute(
        select(*_STATE_COLUMNS).where(ServingState.model == model)
    ).one_or_none()
    return None if row is None else State(*row)


def ensure_state(
    connection: Connection,
    *,
    model: str,
    student_version: str,
    temperature: float,
    fallback_threshold: float,
    shadow_rate: float,
) -> State:
    """The stored state, or else these start-up values stored as revision 1."""
    state = read_state(connection, model)
    if state is not None:
        return state
    now = time.time()
    try:
        with connection.begin_nested():
            connection.execute(
                insert(ServingState).values(
                    model=model, revision=1, student_version=student_version,
                    temperature=temperature, fallback_threshold=fallback_threshold,
                    shadow_rate=shadow_rate, updated_at=now, updated_by="startup", details={},
                )
            )  # fmt: skip
    except IntegrityError:
        pass  # another replica stored it first
    state = read_state(connection, model)
    assert state is not None
    return state


def change_state(
    connection: Connection,
    *,
    model: str,
    actor: str,
    reason: str,
    expect_version: str | None = None,
    **changes: Any,
) -> State:
    """Apply `changes` (columns of ServingState) as a new revision, with its audit row.

    `expect_version`: only if that student version still serves (a recalibration fitted
    for version 3 must not land on version 4); otherwise a ConflictError.
    """
    state = read_state(connection, model)
    if state is None:
        raise NotFoundError(f"no serving state for model {model!r}")
    if expect_version is not None and state.student_version != expect_version:
        raise ConflictError(
            f"{model} now serves version {state.student_version}, not {expect_version}"
        )
    allowed = {"student_version", "temperature", "fallback_threshold", "shadow_rate", "details"}
    unknown = set(changes) - allowed
    if unknown:
        raise ValueError(f"not serving-state fields: {sorted(unknown)}")
    now = time.time()
    result = connection.execute(
        update(ServingState)
        .where(ServingState.model == model, ServingState.revision == state.revision)
        .values(revision=state.revision + 1, updated_at=now, updated_by=actor[:64], **changes)
    )
    if result.rowcount != 1:
        raise ConflictError(f"the serving state of {model} changed concurrently; retry")
    before = {key: getattr(state, key) for key in changes if key != "details"}
    after = {key: value for key, value in changes.items() if key != "details"}
    audit(
        connection, actor=actor, action=reason, model=model,
        subject=f"revision {state.revision + 1}", details={"before": before, "after": after},
        now=now,
    )  # fmt: skip
    new = read_state(connection, model)
    assert new is not None
    return new


# -- jobs ----------------------------------------------------------------------------------

JOB_COLUMNS = (
    Job.id, Job.model, Job.kind, Job.status, Job.rule, Job.evidence, Job.params,
    Job.progress, Job.progress_message, Job.created_at, Job.started_at, Job.finished_at,
    Job.result, Job.error, Job.runner, Job.cancel_requested, Job.heartbeat_at, Job.applied,
)  # fmt: skip


@dataclass(frozen=True)
class JobRow:
    id: int
    model: str
    kind: str
    status: str
    rule: str | None
    evidence: dict[str, Any]
    params: dict[str, Any]
    progress: float
    progress_message: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    result: dict[str, Any] | None
    error: str | None
    runner: str | None
    cancel_requested: bool
    heartbeat_at: float | None
    applied: bool

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


def create_job(
    connection: Connection,
    *,
    model: str,
    kind: str,
    rule: str,
    params: Mapping[str, Any],
    evidence: Mapping[str, Any],
    actor: str,
) -> JobRow:
    """A pending job, with its audit row. One open job per (model, rule): else 409."""
    now = time.time()
    try:
        with connection.begin_nested():
            job_id = connection.execute(
                insert(Job)
                .values(
                    model=model, kind=kind, status="pending", rule=rule, params=dict(params),
                    evidence=dict(evidence), progress=0.0, created_at=now,
                    cancel_requested=False, applied=False,
                )
                .returning(Job.id)
            ).scalar_one()  # fmt: skip
    except IntegrityError as exc:
        open_job = connection.execute(
            select(Job.id).where(Job.model == model, Job.rule == rule, Job.status.in_(OPEN_JOB))
        ).scalar()
        raise ConflictError(f"job {open_job} for {model}/{rule} is still open") from exc
    audit(
        connection, actor=actor, action="job.created", model=model, subject=f"job {job_id}",
        details={"kind": kind, "rule": rule, "params": dict(params)}, now=now,
    )  # fmt: skip
    return get_job(connection, job_id)


def get_job(connection: Connection, job_id: int) -> JobRow:
    row = connection.execute(select(*JOB_COLUMNS).where(Job.id == job_id)).one_or_none()
    if row is None:
        raise NotFoundError(f"no job {job_id}")
    return JobRow(*row)


def list_jobs(
    connection: Connection,
    *,
    model: str | None = None,
    status: Sequence[str] | None = None,
    kind: str | None = None,
    limit: int = 100,
) -> list[JobRow]:
    query = select(*JOB_COLUMNS).order_by(Job.id.desc()).limit(limit)
    if model is not None:
        query = query.where(Job.model == model)
    if status:
        query = query.where(Job.status.in_(list(status)))
    if kind is not None:
        query = query.where(Job.kind == kind)
    return [JobRow(*row) for row in connection.execute(query)]


def claim_job(connection: Connection, job_id: int, *, runner: str) -> bool:
    """pending → running; False when someone else claimed it (or it was cancelled)."""
    now = time.time()
    result = connection.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "pending")
        .values(status="running", started_at=now, heartbeat_at=now, runner=runner)
    )
    return result.rowcount == 1


def mark_dispatched(connection: Connection, job_id: int, *, runner: str) -> bool:
    """Note that a pending job was handed to a runner (so it is handed over only once)."""
    result = connection.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "pending", Job.runner.is_(None))
        .values(runner=runner)
    )
    return result.rowcount == 1


def report_progress(connection: Connection, job_id: int, fraction: float, message: str) -> bool:
    """Store progress; returns True when the job has been asked to cancel."""
    connection.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running")
        .values(progress=fraction, progress_message=message[:256], heartbeat_at=time.time())
    )
    return bool(connection.execute(select(Job.cancel_requested).where(Job.id == job_id)).scalar())


def finish_job(
    connection: Connection,
    job_id: int,
    *,
    status: str,
    result: Mapping[str, Any] | None = None,
    error: str | None = None,
) -> bool:
    """running (or pending) → a final status; False if it had already finished."""
    if status not in FINISHED_JOB:
        raise ValueError(f"not a final status: {status}")
    values: dict[str, Any] = {"status": status, "finished_at": time.time(), "error": error}
    if result is not None:
        values["result"] = dict(result)
    if status == "succeeded":
        values["progress"] = 1.0
    done = connection.execute(
        update(Job).where(Job.id == job_id, Job.status.in_(OPEN_JOB)).values(**values)
    )
    if done.rowcount == 1:
        job = get_job(connection, job_id)
        audit(
            connection, actor=f"job:{job_id}", action=f"job.{status}", model=job.model,
            subject=f"job {job_id}", details={"error": error} if error else {},
        )  # fmt: skip
    return done.rowcount == 1


def cancel_job(connection: Connection, job_id: int, *, actor: str) -> JobRow:
    """A pending job is cancelled at once; a running one is asked to stop (its runner
    kills it). A finished job cannot be cancelled (409)."""
    job = get_job(connection, job_id)
    if job.status == "pending":
        finish_job(connection, job_id, status="cancelled", error=f"cancelled by {actor}")
    elif job.status == "running":
        connection.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
        audit(connection, actor=actor, action="job.cancel_requested", model=job.model,
              subject=f"job {job_id}")  # fmt: skip
    else:
        raise ConflictError(f"job {job_id} already {job.status}")
    return get_job(connection, job_id)


def take_unapplied(connection: Connection, model: str) -> list[JobRow]:
    """Finished jobs whose effect no replica has carried out yet, marked applied now.

    The conditional UPDATE makes each job's effect (and its counting) happen once across
    replicas; call inside the transaction that carries the effects out.
    """
    ids = connection.execute(
        select(Job.id)
        .where(Job.model == model, Job.status.in_(FINISHED_JOB), Job.applied.is_(False))
        .order_by(Job.id)
    ).scalars()
    taken = []
    for job_id in list(ids):
        result = connection.execute(
            update(Job).where(Job.id == job_id, Job.applied.is_(False)).values(applied=True)
        )
        if result.rowcount == 1:
            taken.append(get_job(connection, job_id))
    return taken


def fail_stale_jobs(connection: Connection, *, older_than: float) -> list[int]:
    """Running jobs whose heartbeat stopped (their process died with its parent)."""
    ids = list(
        connection.execute(
            select(Job.id).where(Job.status == "running", Job.heartbeat_at < older_than)
        ).scalars()
    )
    for job_id in ids:
        finish_job(connection, job_id, status="failed", error="lost: no heartbeat from its runner")
    return ids


# -- trigger firings -----------------------------------------------------------------------


def record_firing(
    connection: Connection,
    *,
    model: str,
    rule: str,
    metric: str,
    evidence: Mapping[str, Any],
    job_id: int | None,
    now: float,
) -> int:
    firing_id: int = connection.execute(
        insert(TriggerFiring)
        .values(model=model, rule=rule, metric=metric, fired_at=now, evidence=dict(evidence),
                job_id=job_id)
        .returning(TriggerFiring.id)
    ).scalar_one()  # fmt: skip
    return firing_id


def last_firings(connection: Connection, model: str) -> dict[str, tuple[float, dict[str, Any]]]:
    """Each rule's newest firing: (time, evidence)."""
    newest = (
        select(TriggerFiring.rule, func.max(TriggerFiring.id).label("id"))
        .where(TriggerFiring.model == model)
        .group_by(TriggerFiring.rule)
        .subquery()
    )
    rows = connection.execute(
        select(TriggerFiring.rule, TriggerFiring.fired_at, TriggerFiring.evidence).join(
            newest, TriggerFiring.id == newest.c.id
        )
    )
    return {rule: (at, evidence) for rule, at, evidence in rows}


def list_firings(connection: Connection, model: str, limit: int = 100) -> list[dict[str, Any]]:
    rows = connection.execute(
        select(
            TriggerFiring.id, TriggerFiring.rule, TriggerFiring.metric, TriggerFiring.fired_at,
            TriggerFiring.evidence, TriggerFiring.job_id,
        )
        .where(TriggerFiring.model == model)
        .order_by(TriggerFiring.id.desc())
        .limit(limit)
    )  # fmt: skip
    return [dict(row._mapping) for row in rows]


WINDOW_COLUMNS = (
    MetricWindow.id, MetricWindow.metric, MetricWindow.window, MetricWindow.window_start,
    MetricWindow.window_end, MetricWindow.value, MetricWindow.ci_low, MetricWindow.ci_high,
    MetricWindow.n, MetricWindow.n_eff, MetricWindow.threshold, MetricWindow.state,
    MetricWindow.label_completeness, MetricWindow.matured,
)  # fmt: skip


def recent_windows(
    connection: Connection, *, model: str, window: str, metrics: Iterable[str], limit: int
) -> dict[str, list[dict[str, Any]]]:
    """The newest `limit` stored windows of each metric, newest first."""
    out: dict[str, list[dict[str, Any]]] = {}
    for metric in metrics:
        rows = connection.execute(
            select(*WINDOW_COLUMNS)
            .where(
                MetricWindow.model == model,
                MetricWindow.window == window,
                MetricWindow.metric == metric,
            )
            .order_by(MetricWindow.window_start.desc())
            .limit(limit)
        )
        out[metric] = [dict(row._mapping) for row in rows]
    return out


# -- rollouts ------------------------------------------------------------------------------

ROLLOUT_COLUMNS = (
    Rollout.id, Rollout.model, Rollout.candidate_version, Rollout.incumbent_version,
    Rollout.stage, Rollout.traffic_share, Rollout.statistics, Rollout.decision,
    Rollout.created_at, Rollout.updated_at, Rollout.job_id, Rollout.decided_at, Rollout.config,
)  # fmt: skip


@dataclass(frozen=True)
class RolloutRow:
    id: int
    model: str
    candidate_version: str
    incumbent_version: str
    stage: str
    traffic_share: float
    statistics: dict[str, Any]
    decision: str | None
    created_at: float
    updated_at: float
    job_id: int | None
    decided_at: float | None
    config: dict[str, Any]

    @property
    def open(self) -> bool:
        return self.stage in OPEN_ROLLOUT


def get_rollout(connection: Connection, rollout_id: int) -> RolloutRow:
    row = connection.execute(select(*ROLLOUT_COLUMNS).where(Rollout.id == rollout_id)).one_or_none()
    if row is None:
        raise NotFoundError(f"no rollout {rollout_id}")
    return RolloutRow(*row)


def open_rollout(connection: Connection, model: str) -> RolloutRow | None:
    row = connection.execute(
        select(*ROLLOUT_COLUMNS)
        .where(Rollout.model == model, Rollout.stage.in_(OPEN_ROLLOUT))
        .order_by(Rollout.id.desc())
        .limit(1)
    ).one_or_none()
    return None if row is None else RolloutRow(*row)


def list_rollouts(connection: Connection, model: str, limit: int = 50) -> list[RolloutRow]:
    rows = connection.execute(
        select(*ROLLOUT_COLUMNS)
        .where(Rollout.model == model)
        .order_by(Rollout.id.desc())
        .limit(limit)
    )
    return [RolloutRow(*row) for row in rows]


def create_rollout(
    connection: Connection,
    *,
    model: str,
    candidate_version: str,
    incumbent_version: str,
    config: Mapping[str, Any],
    actor: str,
    job_id: int | None = None,
) -> RolloutRow:
    """A new rollout in the shadow stage; one open rollout per model (else 409)."""
    current = open_rollout(connection, model)
    if current is not None:
        raise ConflictError(
            f"rollout {current.id} of version {current.candidate_version} is still open"
        )
    now = time.time()
    rollout_id = connection.execute(
        insert(Rollout)
        .values(
            model=model, candidate_version=candidate_version,
            incumbent_version=incumbent_version, stage="shadow", traffic_share=0.0,
            statistics={}, created_at=now, updated_at=now, job_id=job_id, config=dict(config),
        )
        .returning(Rollout.id)
    ).scalar_one()  # fmt: skip
    audit(
        connection, actor=actor, action="rollout.created", model=model,
        subject=f"rollout {rollout_id}",
        details={"candidate": candidate_version, "incumbent": incumbent_version}, now=now,
    )  # fmt: skip
    return get_rollout(connection, rollout_id)


def move_rollout(
    connection: Connection,
    rollout_id: int,
    *,
    from_stages: Sequence[str],
    to_stage: str,
    actor: str,
    traffic_share: float | None = None,
    statistics: Mapping[str, Any] | None = None,
    decision: str | None = None,
) -> RolloutRow:
    """A conditional stage change: of two concurrent callers exactly one wins (409)."""
    now = time.time()
    values: dict[str, Any] = {"stage": to_stage, "updated_at": now}
    if traffic_share is not None:
        values["traffic_share"] = traffic_share
    if statistics is not None:
        values["statistics"] = dict(statistics)
    if decision is not None:
        values["decision"] = decision
        values["decided_at"] = now
    result = connection.execute(
        update(Rollout)
        .where(Rollout.id == rollout_id, Rollout.stage.in_(list(from_stages)))
        .values(**values)
    )
    if result.rowcount != 1:
        current = get_rollout(connection, rollout_id)
        raise ConflictError(f"rollout {rollout_id} is {current.stage}; cannot move to {to_stage}")
    row = get_rollout(connection, rollout_id)
    audit(
        connection, actor=actor, action=f"rollout.{to_stage}", model=row.model,
        subject=f"rollout {rollout_id}",
        details={"decision": decision, "statistics": dict(statistics or {})}, now=now,
    )  # fmt: skip
    return row


def save_gate_statistics(
    connection: Connection, rollout_id: int, statistics: Mapping[str, Any]
) -> None:
    """The gate's latest statistics (`updated_at` keeps meaning "entered this stage")."""
    connection.execute(
        update(Rollout).where(Rollout.id == rollout_id).values(statistics=dict(statistics))
    )


def insert_rollout_outputs(engine: Engine, rows: Sequence[Mapping[str, Any]]) -> None:
    if not rows:
        return
    with engine.begin() as connection:
        connection.execute(insert(RolloutOutput), [dict(row) for row in rows])
