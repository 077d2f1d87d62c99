"""Run one job to its end: the single path every runner takes.

The server's child process, a Celery worker and `kdguard job run ID` all call
`execute_job`. It claims the job (pending → running) unless its runner already did,
builds the context, runs the body with progress going to the job record, and stores the
result or the error. The effect of the result is carried out later by a serving replica
(`controller.apply_finished`), which keeps bodies free of serving state.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
import traceback
from typing import Any

from sqlalchemy import Engine

from service import faults
from service.errors import ConflictError
from service.jobs.context import JobBody, JobCancelled, JobContext, Progress
from service.persistence import loop
from service.persistence.database import make_engine
from service.registry import ModelRegistry
from service.settings import Settings

log = logging.getLogger(__name__)

BODIES = {
    "recalibrate": "service.jobs.recalibrate",
    "retune_threshold": "service.jobs.retune",
    "redistill": "service.jobs.redistill",
}
"""Job kind → module with its `run(ctx)`; imported only when a job of that kind runs."""

PROGRESS_EVERY_S = 0.5


def body_for(kind: str) -> JobBody:
    try:
        module = importlib.import_module(BODIES[kind])
    except KeyError:
        raise ValueError(f"unknown job kind {kind!r}; known: {sorted(BODIES)}") from None
    body: JobBody = module.run
    return body


def execute_job(
    settings: Settings,
    job_id: int,
    *,
    runner: str,
    claimed: bool = False,
    database: Engine | None = None,
    on_progress: Progress | None = None,
) -> loop.JobRow:
    """Run job `job_id` here and now; returns its final record.

    `claimed`: the caller (the server's process runner) already moved it to running.
    Raises ConflictError when the job is not pending (someone else has it).
    """
    own_engine = database is None
    engine = database or make_engine(settings.database.url.get_secret_value())
    try:
        with engine.begin() as connection:
            if not claimed and not loop.claim_job(connection, job_id, runner=runner):
                job = loop.get_job(connection, job_id)
                raise ConflictError(f"job {job_id} is {job.status}, not pending")
            job = loop.get_job(connection, job_id)
        _run(settings, engine, job, on_progress)
        with engine.begin() as connection:
            return loop.get_job(connection, job_id)
    finally:
        if own_engine:
            engine.dispose()


def _run(
    settings: Settings, engine: Engine, job: loop.JobRow, on_progress: Progress | None
) -> None:
    last_report = 0.0

    def progress(fraction: float, message: str) -> None:
        nonlocal last_report
        if on_progress is not None:
            on_progress(fraction, message)
        now = time.monotonic()
        if now - last_report < PROGRESS_EVERY_S and fraction < 1.0:
            return
        last_report = now
        with engine.begin() as connection:
            if loop.report_progress(connection, job.id, fraction, message):
                raise JobCancelled(f"job {job.id} was cancelled")

    ctx = JobContext(
        job_id=job.id, kind=job.kind, model=job.model, settings=settings, database=engine,
        registry=ModelRegistry(settings.registry.root), now=job.created_at,
        params=job.params, evidence=job.evidence, progress=progress,
    )  # fmt: skip
    status, result, error = "succeeded", None, None
    try:
        progress(0.0, "starting")
        faults.point("job.body")
        result = body_for(job.kind)(ctx)
    except JobCancelled as exc:
        status, error = "cancelled", str(exc)
    except Exception as exc:  # a job's failure is its record's business, not the runner's
        log.warning("job %s (%s) failed: %s", job.id, job.kind, exc)
        log.debug("%s", traceback.format_exc())
        status, error = "failed", f"{type(exc).__name__}: {exc}"
    with engine.begin() as connection:
        loop.finish_job(connection, job.id, status=status, result=_jsonable(result), error=error)


def _jsonable(result: dict[str, Any] | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return dict(json.loads(json.dumps(result, default=float)))
