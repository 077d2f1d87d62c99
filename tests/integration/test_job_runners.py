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
from typing import Any

import httpx
import pytest

from service.faults import ENV as FAULTS_ENV
from service.registry import ModelRegistry
from tests.conftest import ADMIN_KEY, make_settings, running_app, scratch_postgres
from tests.support.fakes import FakeTeacher
from tests.support.models import instance

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def trigger(client: httpx.AsyncClient, kind: str = "recalibrate") -> int:
    response = await client.post("/v1/admin/jobs", json={"kind": kind}, headers=ADMIN)
    assert response.status_code == 202, response.text
    job_id: int = response.json()["id"]
    return job_id


async def wait_finished(client: httpx.AsyncClient, job_id: int, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        job = (await client.get(f"/v1/admin/jobs/{job_id}", headers=ADMIN)).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
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
def celery_worker(registry: ModelRegistry) -> Iterator[dict[str, str]]:
    """A real `kdguard worker` process on a private queue of the local Redis."""
    with scratch_postgres() as database_url:
        queue = f"kdguard-test-{uuid.uuid4().hex[:8]}"
        env = {
            **os.environ,
            "KDGUARD_DATABASE__URL": database_url,
            "KDGUARD_REGISTRY__ROOT": str(registry.root),
            "KDGUARD_MODEL__NAME": "tiny",
            "KDGUARD_JOBS__BROKER_URL": "redis://127.0.0.1:6379/15",
            "KDGUARD_JOBS__QUEUE": queue,
        }
        worker = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            yield {"database_url": database_url, "queue": queue}
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


async def test_celery_workers_run_jobs(
    registry: ModelRegistry, celery_worker: dict[str, str]
) -> None:
    settings = make_settings(
        registry.root,
        database={"url": celery_worker["database_url"]},
        monitoring={"enabled": False},
        jobs={
            "runner": "celery",
            "apply_interval_s": 0.1,
            "broker_url": "redis://127.0.0.1:6379/15",
            "queue": celery_worker["queue"],
        },
    )
    async with running_app(settings, teacher=FakeTeacher()) as (_, client):
        job = await wait_finished(client, await trigger(client), timeout_s=90.0)
        await still_serving(client)
    assert job["runner"] == "celery"
    assert job["status"] == "failed" and job["error"]  # an empty database has no labels
