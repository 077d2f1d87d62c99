"""Admission control: at most `server.max_in_flight` inference requests work at once.

The fake teacher lags, so low-confidence requests stay in flight while it answers; the
ones over the bound must get 503 with `Retry-After` at once, without reaching the engine.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
from prometheus_client import CollectorRegistry

from service.settings import Settings
from tests.conftest import ADMIN_KEY, make_settings, running_app
from tests.integration.test_api_oip import infer_body
from tests.support.fakes import FakeTeacher
from tests.support.models import instance

LOW = 0.05  # student confidence ≈ 0.37 < τ = 0.6: the request waits for the teacher
BOUND = 2
TEACHER_DELAY_S = 0.3


def _bounded(settings: Settings) -> Settings:
    return make_settings(
        settings.registry.root,
        server={"fast_path": settings.server.fast_path, "max_in_flight": BOUND},
        teacher={"deadline_s": 2.0},
    )


async def _post(client: httpx.AsyncClient, i: int) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    if i % 2:
        x = np.array([instance(LOW)], dtype=np.float32)
        response = await client.post("/v2/models/tiny/infer", json=infer_body(x))
    else:
        response = await client.post("/v1/predict", json={"inputs": [instance(LOW)]})
    return response, time.monotonic() - start


def _rejected_total(registry: CollectorRegistry, kind: str) -> float:
    labels = {"model": "tiny", "kind": kind, "reason": "in_flight_limit"}
    value = registry.get_sample_value("kdguard_requests_rejected_total", labels)
    assert value is not None
    return value


async def test_requests_over_the_bound_get_503_at_once(settings: Settings) -> None:
    teacher = FakeTeacher(mode="slow", delay_s=TEACHER_DELAY_S)
    async with running_app(_bounded(settings), teacher=teacher) as (app, client):
        registry = app.state.services.metrics_registry
        assert _rejected_total(registry, "rest") == 0.0  # the series exists from the start
        results = await asyncio.gather(*(_post(client, i) for i in range(10)))

        admitted = [(r, s) for r, s in results if r.status_code == 200]
        rejected = [(r, s) for r, s in results if r.status_code == 503]
        assert len(admitted) == BOUND
        assert len(rejected) == len(results) - BOUND
        for response, seconds in rejected:
            assert response.headers["retry-after"] == "1"
            assert response.json() == {
                "error": "too many requests in flight; retry shortly",
                "code": "overloaded",
            }
            assert seconds < TEACHER_DELAY_S  # refused without waiting for the teacher
        for response, seconds in admitted:
            assert response.json()  # a real answer from the teacher
            assert seconds >= TEACHER_DELAY_S * 0.9
        assert max(teacher.max_concurrent, len(teacher.calls)) <= BOUND
        assert _rejected_total(registry, "rest") + _rejected_total(registry, "oip") == 8
        requests = registry.get_sample_value(
            "kdguard_requests_total", {"model": "tiny", "kind": "rest", "outcome": "rejected"}
        )
        assert requests == _rejected_total(registry, "rest")

        # The bound frees as soon as the work ends.
        assert app.state.services.in_flight == 0
        response, _ = await _post(client, 0)
        assert response.status_code == 200


async def test_operations_routes_are_not_subject_to_the_bound(settings: Settings) -> None:
    teacher = FakeTeacher(mode="slow", delay_s=TEACHER_DELAY_S)
    async with running_app(_bounded(settings), teacher=teacher) as (app, client):
        busy = [asyncio.create_task(_post(client, i)) for i in range(BOUND)]
        for _ in range(400):  # until both hold their slot (bounded: 2 s)
            if app.state.services.in_flight == BOUND:
                break
            await asyncio.sleep(0.005)
        assert app.state.services.in_flight == BOUND
        admin = {"X-API-Key": ADMIN_KEY}
        for path in ("/v2/health/ready", "/v2/health/live", "/metrics", "/v2/models/tiny"):
            assert (await client.get(path)).status_code == 200, path
        assert (await client.get("/v1/admin/models/tiny", headers=admin)).status_code == 200
        response, _ = await _post(client, 0)
        assert response.status_code == 503  # still full: the probes above took no slot
        for response, _ in await asyncio.gather(*busy):
            assert response.status_code == 200
