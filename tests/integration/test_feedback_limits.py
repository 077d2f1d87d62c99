"""Per-client feedback limits through the real app, on SQLite and PostgreSQL: a token
bucket per client counted in labels; over it, 429 with Retry-After and nothing stored."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import Engine, select

from service.persistence.tables import Feedback
from service.routing.limits import ClientLimits
from service.settings import Settings
from tests.conftest import ADMIN_KEY, make_settings, running_app
from tests.support.fakes import FakeTeacher
from tests.support.models import instance

LABELLER_A, LABELLER_B = "labeller-a-0123456789abcdef", "labeller-b-0123456789abcdef"


class Clock:
    """The buckets' clock, moved by hand: no test waits for real seconds."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def limited_app(
    settings: Settings, database_url: str, **overrides: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, Clock]]:
    """Batches of at most 4 labels; each client may send 4 at once, then 1 a second."""
    limited = make_settings(
        settings.registry.root,
        database={"url": database_url},
        server={"fast_path": settings.server.fast_path, "max_batch": 4},
        feedback={"rate_per_s": 1.0, "burst": 4},
        **overrides,
    )
    clock = Clock()
    async with running_app(limited, teacher=FakeTeacher()) as (app, http):
        services = app.state.services
        services.feedback_limits = ClientLimits.from_settings(limited.feedback, clock=clock)
        yield app, http, clock


async def predict_ids(client: httpx.AsyncClient, n: int) -> list[str]:
    """n request ids, asked for one at a time (`server.max_batch` is 4 here)."""
    ids = []
    for _ in range(n):
        response = await client.post("/v1/predict", json={"inputs": [instance(1.0, 0)]})
        ids += [p["request_id"] for p in response.json()["predictions"]]
    return ids


def peer(app: FastAPI, host: str) -> httpx.AsyncClient:
    """A client of the same app that connects from another address."""
    transport = httpx.ASGITransport(app=app, client=(host, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://kdguard")


def stored(database: Engine, ids: list[str]) -> set[str]:
    with database.connect() as connection:
        query = select(Feedback.request_id).where(Feedback.request_id.in_(ids))
        return set(connection.execute(query).scalars())


def labelled(ids: list[str]) -> list[dict[str, Any]]:
    return [{"request_id": rid, "label": 0} for rid in ids]


async def test_a_client_over_its_limit_gets_429_until_it_waits(
    settings: Settings, database_url: str, database: Engine
) -> None:
    async with (
        limited_app(settings, database_url) as (app, first, clock),
        peer(app, "10.0.0.2") as second,
    ):
        ids = await predict_ids(first, 7)
        assert (await first.post("/v1/feedback", json=labelled(ids[:4]))).status_code == 200
        refused = await first.post("/v1/feedback", json=labelled(ids[4:5]))
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"  # 1 label at 1 a second
        assert refused.json()["code"] == "rate_limited" and refused.json()["error"]
        assert stored(database, ids[4:5]) == set()
        # Another address has its own bucket.
        other = await second.post("/v1/feedback", json=labelled(ids[5:7]))
        assert other.status_code == 200 and other.json() == {"accepted": 2, "unchanged": 0}
        clock.now += float(refused.headers["retry-after"])
        again = await first.post("/v1/feedback", json=labelled(ids[4:5]))
        assert again.status_code == 200 and again.json() == {"accepted": 1, "unchanged": 0}
        assert stored(database, ids) == set(ids)
        registry = app.state.services.metrics_registry
    rejected = {"model": "tiny", "kind": "feedback", "reason": "client_rate_limit"}
    assert registry.get_sample_value("kdguard_requests_rejected_total", rejected) == 1.0
    outcome = {"model": "tiny", "kind": "feedback", "outcome": "rejected"}
    assert registry.get_sample_value("kdguard_requests_total", outcome) == 1.0


async def test_a_batch_costs_one_token_per_label(
    settings: Settings, database_url: str, database: Engine
) -> None:
    async with limited_app(settings, database_url) as (_, http, clock):
        ids = await predict_ids(http, 7)
        assert (await http.post("/v1/feedback", json=labelled(ids[:3]))).status_code == 200
        refused = await http.post("/v1/feedback", json=labelled(ids[3:7]))  # 1 left, 4 asked
        assert refused.status_code == 429 and refused.headers["retry-after"] == "3"
        assert stored(database, ids[3:7]) == set()  # all or nothing, like the batch
        clock.now += 3.0
        assert (await http.post("/v1/feedback", json=labelled(ids[3:7]))).status_code == 200


async def test_with_feedback_keys_each_key_is_one_client(
    settings: Settings, database_url: str
) -> None:
    auth = {
        "require_feedback_key": True,
        "api_keys": [
            {"name": "ops", "key": ADMIN_KEY, "scopes": ["admin", "predict"]},
            {"name": "labeller-a", "key": LABELLER_A, "scopes": ["feedback"]},
            {"name": "labeller-b", "key": LABELLER_B, "scopes": ["feedback"]},
        ],
    }
    async with limited_app(settings, database_url, auth=auth) as (_, http, _clock):
        ids = await predict_ids(http, 6)

        async def send(rows: list[str], key: str) -> int:
            body = labelled(rows)
            response = await http.post("/v1/feedback", json=body, headers={"X-API-Key": key})
            return response.status_code

        assert await send(ids[:4], LABELLER_A) == 200
        assert await send(ids[4:5], LABELLER_A) == 429
        # Same address, another key: another client, with its own bucket.
        assert await send(ids[4:6], LABELLER_B) == 200
