"""The closed loop through the running app, on SQLite and PostgreSQL: rollouts through the
gate (advance, promote, roll back, races), the jobs API, trigger firings and job effects."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import Engine, insert, select

from service.api.state import Services
from service.jobs.controller import Controller
from service.persistence import loop
from service.persistence.tables import AuditEvent, MetricWindow, RolloutOutput
from service.registry import ModelRegistry
from service.settings import Settings
from tests.conftest import ADMIN_KEY, make_settings, running_app
from tests.support.fakes import FakeTeacher
from tests.support.models import instance, register_linear

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def loop_settings(registry: ModelRegistry, database_url: str, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "database": {"url": database_url},
        "monitoring": {"enabled": False},
        "jobs": {"runner": "none", "apply_interval_s": 0.05},
        "rollout": {"min_pairs": 20, "min_labelled": 0, "sample_rate": 1.0, "ab_share": 0.5},
        "routing": {"fallback_threshold": 0.6, "shadow_rate": 1.0, "seed": 7},
    }
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value}
    return make_settings(registry.root, **base)


def controller_of(app: FastAPI) -> Controller:
    services: Services = app.state.services
    assert services.controller is not None
    return services.controller


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def predict(client: httpx.AsyncClient, key: str, cls: int = 0) -> dict[str, Any]:
    body = {"inputs": [instance(1.0, cls)], "routing_key": key}
    response = await client.post("/v1/predict", json=body)
    assert response.status_code == 200, response.text
    prediction: dict[str, Any] = response.json()["predictions"][0]
    return prediction


async def rollout_stage(client: httpx.AsyncClient, rollout_id: int) -> str:
    response = await client.get(f"/v1/admin/rollouts/{rollout_id}", headers=ADMIN)
    stage: str = response.json()["stage"]
    return stage


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:64])


def audit_actions(database: Engine) -> list[str]:
    with database.connect() as connection:
        return list(connection.execute(select(AuditEvent.action).order_by(AuditEvent.id)).scalars())


async def test_a_good_candidate_goes_shadow_then_ab_then_is_promoted(
    registry: ModelRegistry, database_url: str, database: Engine
) -> None:
    settings = loop_settings(registry, database_url)
    register_linear(registry, name="tiny", role="student", scale=6.0, activate=False)
    async with running_app(settings, teacher=FakeTeacher()) as (_, client):
        created = await client.post(
            "/v1/admin/rollouts", json={"candidate_version": "2"}, headers=ADMIN
        )
        assert created.status_code == 201 and created.json()["stage"] == "shadow"
        rollout_id = created.json()["id"]

        shadow = [await predict(client, f"user-{i}", i % 3) for i in range(35)]
        assert {p["model_version"] for p in shadow} == {"1"}  # shadow: never served

        async def in_ab() -> bool:
            return await rollout_stage(client, rollout_id) == "ab"

        await eventually(in_ab)
        versions: list[str] = []

        async def both_arms_serve() -> bool:  # the stage is stored first, then followed
            versions[:] = [(await predict(client, f"user-{i}", i % 3))["model_version"]
                           for i in range(35)]  # fmt: skip
            return set(versions) == {"1", "2"}

        await eventually(both_arms_serve)
        again = [await predict(client, f"user-{i}", i % 3) for i in range(35)]
        assert versions == [p["model_version"] for p in again]  # sticky by routing key

        async def promoted() -> bool:
            return await rollout_stage(client, rollout_id) == "promoted"

        await eventually(promoted)

        async def serving_candidate() -> bool:  # stored first, then swapped in (milliseconds)
            after = [await predict(client, f"user-{i}") for i in range(5)]
            return {p["model_version"] for p in after} == {"2"}

        await eventually(serving_candidate)
        model = (await client.get("/v1/admin/models/tiny", headers=ADMIN)).json()
        assert model["active"]["student"] == "2"
        rollout = (await client.get(f"/v1/admin/rollouts/{rollout_id}", headers=ADMIN)).json()
        assert rollout["decision"] == "promoted"
        assert rollout["statistics"]["verdict"] == "pass"
        assert rollout["statistics"]["pairs"] >= 40 and rollout["statistics"]["churn"] == 0.0
        metrics = (await client.get("/metrics")).text
        assert 'kdguard_rollout_decisions_total{model="tiny",outcome="promoted"} 1.0' in metrics
    with database.connect() as connection:
        pairs = connection.execute(select(RolloutOutput.arm)).scalars().all()
    assert {"incumbent", "candidate"} <= set(pairs)
    actions = audit_actions(database)
    for action in ("rollout.created", "rollout.ab", "rollout.promoted"):
        assert action in actions


async def test_a_candidate_that_disagrees_is_rolled_back(
    registry: ModelRegistry, database_url: str
) -> None:
    settings = loop_settings(registry, database_url)
    register_linear(registry, name="tiny", role="student", permute=True, activate=False)
    async with running_app(settings, teacher=FakeTeacher()) as (_, client):
        created = await client.post(
            "/v1/admin/rollouts", json={"candidate_version": "2"}, headers=ADMIN
        )
        rollout_id = created.json()["id"]
        for i in range(25):
            await predict(client, f"user-{i}", i % 3)

        async def rolled_back() -> bool:
            return await rollout_stage(client, rollout_id) == "rolled_back"

        await eventually(rolled_back)
        rollout = (await client.get(f"/v1/admin/rollouts/{rollout_id}", headers=ADMIN)).json()
        assert rollout["statistics"]["verdict"] == "fail"
        assert any("churn" in reason for reason in rollout["statistics"]["reasons"])
        assert {(await predict(client, "x"))["model_version"] for _ in range(3)} == {"1"}


async def test_two_concurrent_promotions_one_wins_the_other_gets_409(
    registry: ModelRegistry, database_url: str
) -> None:
    settings = loop_settings(
        registry, database_url, rollout={"auto_advance": False, "auto_promote": False}
    )
    register_linear(registry, name="tiny", role="student", scale=6.0, activate=False)
    async with running_app(settings, teacher=FakeTeacher()) as (_, client):
        created = await client.post(
            "/v1/admin/rollouts", json={"candidate_version": "2"}, headers=ADMIN
        )
        rollout_id = created.json()["id"]
        again = await client.post(
            "/v1/admin/rollouts", json={"candidate_version": "2"}, headers=ADMIN
        )
        assert again.status_code == 409  # one open rollout per model
        path = f"/v1/admin/rollouts/{rollout_id}/promote"
        first, second = await asyncio.gather(
            client.post(path, headers=ADMIN), client.post(path, headers=ADMIN)
        )
        assert sorted([first.status_code, second.status_code]) == [200, 409]
        assert (await predict(client, "k"))["model_version"] == "2"
        late = await client.post(f"/v1/admin/rollouts/{rollout_id}/rollback", headers=ADMIN)
        assert late.status_code == 409


async def test_a_broken_candidate_is_refused_and_nothing_changes(
    registry: ModelRegistry, database_url: str
) -> None:
    settings = loop_settings(registry, database_url)
    manifest = register_linear(registry, name="tiny", role="student", activate=False)
    truncate(registry.model_path(manifest))
    async with running_app(settings, teacher=FakeTeacher()) as (_, client):
        refused = await client.post(
            "/v1/admin/rollouts", json={"candidate_version": "2"}, headers=ADMIN
        )
        assert refused.status_code == 422
        assert (await client.get("/v1/admin/rollouts", headers=ADMIN)).json() == []
        missing = await client.post(
            "/v1/admin/rollouts", json={"candidate_version": "9"}, headers=ADMIN
        )
        assert missing.status_code == 404
        assert (await predict(client, "k"))["model_version"] == "1"


async def test_jobs_can_be_triggered_listed_and_cancelled(
    registry: ModelRegistry, database_url: str
) -> None:
    settings = loop_settings(registry, database_url)
    async with running_app(settings, teacher=FakeTeacher()) as (_, client):
        created = await client.post(
            "/v1/admin/jobs", json={"kind": "recalibrate", "params": {}}, headers=ADMIN
        )
        assert created.status_code == 202
        job = created.json()
        assert job["status"] == "pending" and job["rule"] == "manual:recalibrate"
        duplicate = await client.post("/v1/admin/jobs", json={"kind": "recalibrate"}, headers=ADMIN)
        assert duplicate.status_code == 409  # one open job per rule and model
        other = await client.post("/v1/admin/jobs", json={"kind": "redistill"}, headers=ADMIN)
        assert other.status_code == 202
        bad = await client.post("/v1/admin/jobs", json={"kind": "nonsense"}, headers=ADMIN)
        assert bad.status_code == 422
        cancelled = await client.post(f"/v1/admin/jobs/{job['id']}/cancel", headers=ADMIN)
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        again = await client.post(f"/v1/admin/jobs/{job['id']}/cancel", headers=ADMIN)
        assert again.status_code == 409
        listed = (await client.get("/v1/admin/jobs", headers=ADMIN)).json()
        assert [j["kind"] for j in listed] == ["redistill", "recalibrate"]
        pending = (await client.get("/v1/admin/jobs?status=pending", headers=ADMIN)).json()
        assert [j["kind"] for j in pending] == ["redistill"]
        assert (await client.get("/v1/admin/jobs/9999", headers=ADMIN)).status_code == 404
        anonymous = await client.post("/v1/admin/jobs", json={"kind": "recalibrate"})
        assert anonymous.status_code == 401


async def test_finished_jobs_take_effect_once_on_serving(
    registry: ModelRegistry, database_url: str, database: Engine
) -> None:
    settings = loop_settings(registry, database_url)
    register_linear(registry, name="tiny", role="student", scale=6.0, activate=False)
    async with running_app(settings, teacher=FakeTeacher()) as (app, client):
        engine = controller_of(app)._deployment.engine

        def finished(kind: str, result: dict[str, Any]) -> int:
            with database.begin() as connection:
                job = loop.create_job(connection, model="tiny", kind=kind, rule=f"t:{kind}",
                                      params={}, evidence={}, actor="test")  # fmt: skip
                loop.claim_job(connection, job.id, runner="test")
                loop.finish_job(connection, job.id, status="succeeded", result=result)
            return job.id

        finished("recalibrate", {"accepted": True, "version": "1", "temperature": 2.5})

        async def recalibrated() -> bool:
            return engine.student.manifest.temperature == 2.5

        await eventually(recalibrated)
        assert engine.student.manifest.reference_temperature == 1.0  # T_ref stays frozen
        finished("retune_threshold", {"mode": "budget", "budget": 0.2, "fallback_threshold": 0.8})

        async def retuned() -> bool:
            return engine.fallback_threshold == 0.8

        await eventually(retuned)
        thresholds = (await client.get("/v1/admin/thresholds", headers=ADMIN)).json()
        assert thresholds["fallback_threshold"] == 0.8
        assert thresholds["threshold_mode"]["mode"] == "budget"
        job_id = finished("redistill", {"candidate_version": "2", "incumbent_version": "1"})

        async def in_shadow() -> bool:
            return engine.rollout is not None and engine.rollout.candidate.version == "2"

        await eventually(in_shadow)
        rollouts = (await client.get("/v1/admin/rollouts", headers=ADMIN)).json()
        assert rollouts[0]["job_id"] == job_id and rollouts[0]["stage"] == "shadow"
        metrics = (await client.get("/metrics")).text
        line = 'kdguard_jobs_total{kind="recalibrate",model="tiny",status="succeeded"} 1.0'
        assert line in metrics
        history = (await client.get("/v1/admin/audit?action=temperature", headers=ADMIN)).json()
        assert history[0]["details"] == {
            "before": {"temperature": 1.0},
            "after": {"temperature": 2.5},
        }
    actions = audit_actions(database)
    assert "temperature.recalibrated" in actions and "threshold.retuned" in actions


async def test_a_stale_recalibration_does_not_land_on_another_version(
    registry: ModelRegistry, database_url: str, database: Engine
) -> None:
    settings = loop_settings(registry, database_url)
    async with running_app(settings, teacher=FakeTeacher()) as (app, _):
        with database.begin() as connection:
            job = loop.create_job(connection, model="tiny", kind="recalibrate", rule="r",
                                  params={}, evidence={}, actor="test")  # fmt: skip
            result = {"accepted": True, "version": "7", "temperature": 3.0}
            loop.finish_job(connection, job.id, status="succeeded", result=result)

        async def applied() -> bool:
            with database.connect() as connection:
                return loop.get_job(connection, job.id).applied

        await eventually(applied)
        assert controller_of(app)._deployment.engine.student.manifest.temperature == 1.0
    assert "job.effect_skipped" in audit_actions(database)


def store_windows(database: Engine, metric: str, states: list[str], now: float) -> None:
    """Hourly matured windows ending before `now`, oldest first."""
    with database.begin() as connection:
        for k, state in enumerate(states):
            end = now - (len(states) - 1 - k) * 3600.0 - 1.0
            connection.execute(
                insert(MetricWindow).values(
                    model="tiny", metric=metric, window="1h", window_start=end - 3600.0,
                    window_end=end, value=0.08 if state == "alert" else 0.01,
                    ci_low=0.05 if state == "alert" else 0.0, ci_high=0.11, n=1000,
                    n_eff=1000.0, threshold=0.03, state=state, label_completeness=0.9,
                    matured=True, computed_at=now, details={},
                )
            )  # fmt: skip


async def test_rules_fire_jobs_with_their_evidence_once(
    registry: ModelRegistry, database_url: str, database: Engine
) -> None:
    # The controller's own rounds leave the rules to this test's explicit calls.
    settings = loop_settings(registry, database_url, triggers={"enabled": False})
    async with running_app(settings, teacher=FakeTeacher()) as (app, client):
        controller = controller_of(app)
        now = time.time()
        store_windows(database, "ece", ["ok", "alert", "alert"], now)
        store_windows(database, "accuracy_gap", ["ok", "ok", "ok"], now)
        fired = await controller.evaluate_triggers()
        assert [(f["rule"], f["action"]) for f in fired] == [("miscalibrated", "recalibrate")]
        assert await controller.evaluate_triggers() == []  # same evidence: nothing new
        jobs = (await client.get("/v1/admin/jobs", headers=ADMIN)).json()
        assert len(jobs) == 1 and jobs[0]["kind"] == "recalibrate"
        evidence = jobs[0]["evidence"]
        assert evidence["rule"]["name"] == "miscalibrated" and len(evidence["windows"]) == 2
        firings = (await client.get("/v1/admin/firings", headers=ADMIN)).json()
        assert firings[0]["job_id"] == jobs[0]["id"]
        metrics = (await client.get("/metrics")).text
        assert (
            'kdguard_trigger_firings_total{kind="recalibrate",model="tiny",reason="miscalibrated"}'
            " 1.0" in metrics
        )


async def test_an_accuracy_gap_alert_vetoes_recalibration(
    registry: ModelRegistry, database_url: str, database: Engine
) -> None:
    settings = loop_settings(registry, database_url, triggers={"enabled": False})
    async with running_app(settings, teacher=FakeTeacher()) as (app, _):
        now = time.time()
        store_windows(database, "ece", ["alert", "alert"], now)
        store_windows(database, "accuracy_gap", ["ok", "alert"], now)
        fired = await controller_of(app).evaluate_triggers()
        assert ("miscalibrated", "recalibrate") not in [(f["rule"], f["action"]) for f in fired]


async def test_rule_thresholds_can_be_read_and_overridden(
    registry: ModelRegistry, database_url: str
) -> None:
    settings = loop_settings(registry, database_url)
    async with running_app(settings, teacher=FakeTeacher()) as (_, client):
        current = (await client.get("/v1/admin/thresholds", headers=ADMIN)).json()
        assert {r["name"] for r in current["rules"]} >= {"miscalibrated", "accuracy-gap"}
        changed = await client.put(
            "/v1/admin/thresholds/rules/accuracy-gap",
            json={"value": 0.05, "consecutive": 3},
            headers=ADMIN,
        )
        assert changed.status_code == 200
        rule = next(r for r in changed.json()["rules"] if r["name"] == "accuracy-gap")
        assert rule["value"] == 0.05 and rule["consecutive"] == 3
        unknown = await client.put("/v1/admin/thresholds/rules/nope", json={}, headers=ADMIN)
        assert unknown.status_code == 404
        invalid = await client.put(
            "/v1/admin/thresholds/rules/accuracy-gap", json={"consecutive": 0}, headers=ADMIN
        )
        assert invalid.status_code == 422


async def test_the_cost_quality_curve_comes_from_logged_shadow_pairs(
    registry: ModelRegistry, database_url: str
) -> None:
    settings = loop_settings(registry, database_url, recording={"flush_interval_s": 0.05})
    async with running_app(settings, teacher=FakeTeacher()) as (_, client):
        for i in range(60):
            await predict(client, f"k{i}", i % 3)

        async def curve() -> bool:
            points = (await client.get("/v1/admin/cost-quality", headers=ADMIN)).json()
            return len(points) > 0

        await eventually(curve)
        points = (await client.get("/v1/admin/cost-quality", headers=ADMIN)).json()
        assert {"threshold", "teacher_share", "agreement"} <= set(points[0])
        shares = [p["teacher_share"] for p in points]
        assert shares == sorted(shares) and all(0.0 <= s <= 1.0 for s in shares)
