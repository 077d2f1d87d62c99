"""Admin API of the closed loop: jobs, rollouts, trigger firings, thresholds.

Admin-scoped keys only. Every change goes through the controller, which stores it (with
its audit row) before it takes effect, so every replica follows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, status
from pydantic import ValidationError

from service.api.auth import require
from service.api.schemas import (
    JobCreate,
    JobPublic,
    JobStatus,
    RolloutCreate,
    RolloutPublic,
    RowId,
    RuleUpdate,
    ThresholdsPublic,
    error_responses,
)
from service.api.state import Services, ServicesDep
from service.errors import NotFoundError, UnavailableError, UnprocessableError
from service.jobs import gate
from service.jobs.controller import Controller
from service.jobs.retune import cost_quality
from service.persistence import loop
from service.settings import Scope

AdminKey = Annotated[str, Depends(require(Scope.ADMIN))]
router = APIRouter(prefix="/v1/admin", tags=["admin"], responses=error_responses(400, 401, 403))


def _controller(services: Services) -> Controller:
    if services.controller is None:
        raise UnavailableError("the loop controller is not running")
    return services.controller


def _read(services: Services, work: Any) -> Any:
    with services.sessions() as session:
        return work(session.connection())


def _job(row: loop.JobRow) -> JobPublic:
    fields = {
        f.name: getattr(row, f.name) for f in dataclasses.fields(row) if f.name != "heartbeat_at"
    }
    return JobPublic(**fields)


def _rollout(row: loop.RolloutRow) -> RolloutPublic:
    return RolloutPublic(**dataclasses.asdict(row))


# -- jobs ------------------------------------------------------------------------------


@router.get("/jobs", summary="Jobs, newest first")
async def list_jobs(
    services: ServicesDep,
    _: AdminKey,
    job_status: Annotated[list[JobStatus] | None, Query(alias="status")] = None,
    kind: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[JobPublic]:
    rows = _read(
        services,
        lambda c: loop.list_jobs(
            c, model=services.deployment.name, status=job_status, kind=kind, limit=limit
        ),
    )
    return [_job(row) for row in rows]


@router.get("/jobs/{job_id}", summary="One job", responses=error_responses(404))
async def get_job(job_id: RowId, services: ServicesDep, _: AdminKey) -> JobPublic:
    return _job(_read(services, lambda c: loop.get_job(c, job_id)))


@router.post(
    "/jobs",
    summary="Trigger a job by hand (one open job per kind: else 409)",
    status_code=status.HTTP_202_ACCEPTED,
    responses=error_responses(409, 422, 503),
)
async def trigger_job(body: JobCreate, services: ServicesDep, key: AdminKey) -> JobPublic:
    job = await _controller(services).trigger_job(body.kind, body.params, actor=f"admin:{key}")
    return _job(job)


@router.post(
    "/jobs/{job_id}/cancel",
    summary="Cancel a pending job, or stop a running one",
    responses=error_responses(404, 409),
)
async def cancel_job(job_id: RowId, services: ServicesDep, key: AdminKey) -> JobPublic:
    with services.sessions.begin() as session:
        row = loop.cancel_job(session.connection(), job_id, actor=f"admin:{key}")
    return _job(row)


@router.get("/firings", summary="Trigger firings with their evidence, newest first")
async def list_firings(
    services: ServicesDep, _: AdminKey, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = _read(
        services, lambda c: loop.list_firings(c, services.deployment.name, limit)
    )
    return rows


@router.get("/audit", summary="Audit trail, newest first (e.g. ?action=temperature: T history)")
async def list_audit(
    services: ServicesDep,
    _: AdminKey,
    action: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = _read(
        services,
        lambda c: loop.list_audit(
            c, model=services.deployment.name, action_prefix=action, limit=limit
        ),
    )
    return rows


# -- rollouts --------------------------------------------------------------------------


@router.get("/rollouts", summary="Rollouts, newest first")
async def list_rollouts(services: ServicesDep, _: AdminKey) -> list[RolloutPublic]:
    rows = _read(services, lambda c: loop.list_rollouts(c, services.deployment.name))
    return [_rollout(row) for row in rows]


@router.get("/rollouts/{rollout_id}", summary="One rollout", responses=error_responses(404))
async def get_rollout(rollout_id: RowId, services: ServicesDep, _: AdminKey) -> RolloutPublic:
    return _rollout(_read(services, lambda c: loop.get_rollout(c, rollout_id)))


@router.post(
    "/rollouts",
    summary="Put a registered candidate version in shadow",
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(404, 409, 422),
)
async def create_rollout(
    body: RolloutCreate, services: ServicesDep, key: AdminKey
) -> RolloutPublic:
    row = await _controller(services).start_rollout(body.candidate_version, actor=f"admin:{key}")
    return _rollout(row)


@router.post(
    "/rollouts/{rollout_id}/gate",
    summary="Run the promotion gate now and show its verdict (nothing is stored or decided)",
    responses=error_responses(404),
)
async def run_gate(rollout_id: RowId, services: ServicesDep, _: AdminKey) -> dict[str, Any]:
    defaults = services.settings.rollout
    verdict: gate.Verdict = _read(
        services, lambda c: gate.evaluate(c, loop.get_rollout(c, rollout_id), defaults)
    )
    return verdict.as_json()


def _move(name: str, summary: str, *errors: int) -> None:
    @router.post(
        f"/rollouts/{{rollout_id}}/{name}",
        summary=summary,
        name=f"rollout_{name}",
        responses=error_responses(404, 409, *errors),
    )
    async def move(rollout_id: RowId, services: ServicesDep, key: AdminKey) -> RolloutPublic:
        controller = _controller(services)
        action = {"advance": controller.advance, "promote": controller.promote,
                  "rollback": controller.rollback}[name]  # fmt: skip
        return _rollout(await action(rollout_id, actor=f"admin:{key}"))


_move("advance", "Move a rollout from shadow to A/B")
_move(
    "promote",
    "Promote the candidate: it serves all traffic (exactly one caller wins; a candidate that "
    "no longer passes validation is refused with 422)",
    422,
)
_move("rollback", "Roll back: the candidate leaves traffic")


# -- thresholds ------------------------------------------------------------------------


def _thresholds(services: Services) -> ThresholdsPublic:
    controller = _controller(services)
    state = _read(services, lambda c: loop.read_state(c, services.deployment.name))
    engine = services.deployment.engine
    return ThresholdsPublic(
        fallback_threshold=engine.fallback_threshold,
        shadow_rate=engine.shadow_rate,
        threshold_mode=(state.details.get("threshold") if state else None),
        rules=[r.model_dump(mode="json") for r in controller.effective_rules(state)],
        rollout=services.settings.rollout.model_dump(mode="json"),
    )


@router.get("/thresholds", summary="τ, π₀, trigger rules and gate settings in force")
async def get_thresholds(services: ServicesDep, _: AdminKey) -> ThresholdsPublic:
    return _thresholds(services)


@router.put(
    "/thresholds/rules/{rule}",
    summary="Override fields of a trigger rule (stored; every replica follows)",
    responses=error_responses(404, 409, 422),
)
async def update_rule(
    rule: str, update: RuleUpdate, services: ServicesDep, key: AdminKey
) -> ThresholdsPublic:
    controller = _controller(services)
    names = {r.name for r in services.settings.triggers.rules}
    if rule not in names:
        raise NotFoundError(f"no trigger rule {rule!r}; rules: {sorted(names)}")
    changes = update.model_dump(exclude_unset=True)

    def work(connection: Any) -> None:
        state = loop.read_state(connection, services.deployment.name)
        details = dict(state.details if state else {})
        rules = dict(details.get("rules", {}))
        rules[rule] = {**rules.get(rule, {}), **changes}
        details["rules"] = rules
        details["rules_updated_at"] = time.time()
        probe = dataclasses.replace(state, details=details) if state else None
        try:
            controller.effective_rules(probe)
        except ValidationError as exc:
            raise UnprocessableError(f"rule {rule!r} would be invalid: {exc}") from exc
        loop.change_state(
            connection, model=services.deployment.name, actor=f"admin:{key}",
            reason="rule.updated", details=details,
        )  # fmt: skip

    with services.sessions.begin() as session:
        work(session.connection())
    await controller.sync()
    return _thresholds(services)


@router.get(
    "/cost-quality",
    summary="Cost-quality curve of recent traffic: agreement and gap recovered vs teacher share",
)
async def cost_quality_curve(
    services: ServicesDep,
    _: AdminKey,
    window_s: Annotated[float, Query(gt=0, le=30 * 86400)] = 3600.0,
) -> list[dict[str, Any]]:
    """One point per 5% of teacher share, from the logged shadow pairs of the serving
    version at its current temperature (see `retune_threshold`)."""
    controller = _controller(services)
    student = services.deployment.engine.student
    now = time.time()
    return await asyncio.to_thread(
        cost_quality, controller.database, services.deployment.name, now - window_s, now,
        version=student.version, temperature=student.manifest.temperature,
    )  # fmt: skip
