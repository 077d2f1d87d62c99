"""Job runners for real: child processes that fail, crash, hang or get cancelled while the
server keeps answering, and Celery workers on the local Redis."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.faults import ENV as FAULTS_ENV
from service.persistence import migrate
from service.persistence.database import make_engine
from service.registry import ModelRegistry
from tests.conftest import ADMIN_KEY, make_settings, running_app, scratch_postgres
from tests.integration.test_recalibrate_retune import (
    MODEL,
    NOW,
    calibrated_temperature,
    label,
    make_registry,
    simulate,
    store,
)
from tests.support.fakes import FakeTeacher
from tests.support.models import instance

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
BROKER = "redis://127.0.0.1:6379/15"


async def trigger(client: httpx.AsyncClient, kind: str = "recalibrate") -> int:
    response = await client.post("/v1/admin/jobs", json={"kind": kind}, headers=ADMIN)
    assert response.status_code == 202, response.text
    job_id: int = response.json()["id"]
    return job_id


async def wait_finished(client: httpx.AsyncClient, job_id: int, timeout_s: float = 60.0) -> Any:
    """The job once it has finished and the server has taken note (applied, counted)."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = (await client.get(f"/v1/admin/jobs/{job_id}", headers=ADMIN)).json()
        if job["status"] in ("succeeded", "failed", "cancelled") and job["applied"]:
            return job
        assert time.monotonic() < deadline, f"job still {job['status']}"
        await asyncio.sleep(0.1)


async def still_serving(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/predict", json={"inputs": [instance(1.0)]})
    assert response.status_code == 200


def process_settings(registry: ModelRegistry, **jobs: Any) -> Any:
    return make_settings(
        registry.root,
        monitoring={"enabled": False},
        jobs={"runner": "process", "apply_interval_s": 0.1, **jobs},
    )


async def test_a_job_that_fails_is_recorded_with_its_reason(registry: ModelRegistry) -> None:
    async with running_app(process_settings(registry), teacher=FakeTeacher()) as (_, client):
        job = await wait_finished(client, await trigger(client))
        await still_serving(client)
    assert job["status"] == "failed" and job["runner"] == "process"
    assert "labelled" in job["error"] or "too few" in job["error"].lower()
    assert job["started_at"] is not None and job["finished_at"] >= job["started_at"]


async def test_a_crashing_job_takes_only_its_own_process_down(
    registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULTS_ENV, "job.body=crash")  # SIGKILL, as the OOM killer would
    async with running_app(process_settings(registry), teacher=FakeTeacher()) as (_, client):
        job = await wait_finished(client, await trigger(client))
        await still_serving(client)
        metrics = (await client.get("/metrics")).text
    assert job["status"] == "failed" and "SIGKILL" in job["error"]
    assert 'kdguard_jobs_total{kind="recalibrate",model="tiny",status="failed"} 1.0' in metrics


async def test_a_hung_job_is_killed_at_its_timeout(
    registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULTS_ENV, "job.body=hang")
    settings = process_settings(registry, timeout_s=2.0)
    async with running_app(settings, teacher=FakeTeacher()) as (_, client):
        started = time.monotonic()
        job = await wait_finished(client, await trigger(client))
        await still_serving(client)
    assert job["status"] == "failed" and "timed out" in job["error"]
    assert time.monotonic() - started < 15.0


async def test_a_running_job_can_be_cancelled(
    registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULTS_ENV, "job.body=hang")
    async with running_app(process_settings(registry), teacher=FakeTeacher()) as (_, client):
        job_id = await trigger(client)
        deadline = time.monotonic() + 30.0
        while (await client.get(f"/v1/admin/jobs/{job_id}", headers=ADMIN)).json()[
            "status"
        ] != "running":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        asked = await client.post(f"/v1/admin/jobs/{job_id}/cancel", headers=ADMIN)
        assert asked.status_code == 200 and asked.json()["cancel_requested"] is True
        job = await wait_finished(client, job_id)
        await still_serving(client)
    assert job["status"] == "cancelled"


# -- Celery on the local Redis ----------------------------------------------------------------


@pytest.fixture
def celery_setup(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A PostgreSQL database holding an overconfident student's labelled traffic, and a
    real `kdguard worker` process on a private queue of the local Redis."""
    registry = make_registry(tmp_path / "registry", temperature=1.0)
    with scratch_postgres() as database_url:
        database = make_engine(database_url)
        try:
            migrate.upgrade(database)
            sim = simulate(3000, seed=10)
            store(database, sim, temperature=1.0, seed=11)
            label(database, sim, np.arange(3000), at=NOW - 60.0)
        finally:
            database.dispose()
        queue = f"kdguard-test-{uuid.uuid4().hex[:8]}"
        env = {
            **os.environ,
            "KDGUARD_DATABASE__URL": database_url,
            "KDGUARD_REGISTRY__ROOT": str(registry.root),
            "KDGUARD_MODEL__NAME": MODEL,
            "KDGUARD_JOBS__BROKER_URL": BROKER,
            "KDGUARD_JOBS__QUEUE": queue,
        }
        worker = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            yield {"database_url": database_url, "queue": queue, "registry": registry}
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


async def test_celery_workers_run_jobs_and_servers_apply_them(
    celery_setup: dict[str, Any],
) -> None:
    registry: ModelRegistry = celery_setup["registry"]
    settings = make_settings(
        registry.root,
        model={"name": MODEL},
        teacher={"mode": "none"},
        database={"url": celery_setup["database_url"]},
        monitoring={"enabled": False},
        jobs={"runner": "celery", "apply_interval_s": 0.1, "broker_url": BROKER,
              "queue": celery_setup["queue"]},
    )  # fmt: skip
    async with running_app(settings) as (app, client):
        body = {"kind": "recalibrate", "params": {"window_s": 1e9}}  # the rows are from 2023
        created = await client.post("/v1/admin/jobs", json=body, headers=ADMIN)
        job = await wait_finished(client, created.json()["id"], timeout_s=120.0)
        assert job["runner"] == "celery" and job["status"] == "succeeded", job
        assert job["result"]["accepted"] is True and job["progress"] == 1.0
        fitted = job["result"]["temperature"]
        engine = app.state.services.deployment.engine
        deadline = time.monotonic() + 10.0
        while engine.student.manifest.temperature != fitted:
            assert time.monotonic() < deadline, "the server did not apply the new T"
            await asyncio.sleep(0.1)
        response = await client.post("/v1/predict", json={"inputs": [[1.0] + [0.0] * 9]})
        assert response.status_code == 200
    assert fitted == pytest.approx(calibrated_temperature(), rel=0.1)
