"""POST /v1/feedback on SQLite and PostgreSQL: acknowledged after commit, idempotent."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
from sqlalchemy import Engine, select

from service.errors import KdguardError
from service.persistence.database import session_factory
from service.persistence.feedback import FeedbackStore, Label
from service.persistence.tables import Feedback, Prediction
from service.settings import Settings
from tests.conftest import make_settings, running_app
from tests.support.fakes import FakeTeacher
from tests.support.models import instance


@pytest.fixture
async def client(settings: Settings, database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    with_db = make_settings(
        settings.registry.root,
        database={"url": database_url},
        server={"fast_path": settings.server.fast_path},
    )
    async with running_app(with_db, teacher=FakeTeacher()) as (_, http):
        yield http


async def predict_ids(client: httpx.AsyncClient, *rows: list[float]) -> list[str]:
    response = await client.post("/v1/predict", json={"inputs": list(rows)})
    return [p["request_id"] for p in response.json()["predictions"]]


async def test_feedback_is_stored_with_its_calibration_inputs(
    client: httpx.AsyncClient, database: Engine
) -> None:
    # Sent at once: the writer may not have flushed yet, so this also checks the retry.
    (rid,) = await predict_ids(client, instance(1.0, 0))
    response = await client.post("/v1/feedback", json={"request_id": rid, "label": 0})
    assert response.status_code == 200
    assert response.json() == {"accepted": 1, "unchanged": 0}
    with database.connect() as connection:
        row = connection.execute(select(Feedback).where(Feedback.request_id == rid)).one()
        prediction = connection.execute(
            select(Prediction).where(Prediction.request_id == rid)
        ).one()
    assert row.label == 0 and row.student_correct is True
    p = np.array([math.exp(4.0), 1.0, 1.0]) / (math.exp(4.0) + 2.0)
    assert row.nll == pytest.approx(-math.log(p[0]), abs=1e-3)  # float16-stored probabilities
    assert row.brier == pytest.approx(((p - [1, 0, 0]) ** 2).sum(), abs=1e-3)
    assert prediction.student_label == 0 and prediction.conf_bin == 14


async def test_same_label_twice_is_a_no_op_and_a_different_one_conflicts(
    client: httpx.AsyncClient,
) -> None:
    (rid,) = await predict_ids(client, instance(1.0, 0))
    first = await client.post("/v1/feedback", json={"request_id": rid, "label": 2})
    again = await client.post("/v1/feedback", json={"request_id": rid, "label": 2})
    other = await client.post("/v1/feedback", json={"request_id": rid, "label": 1})
    assert first.json() == {"accepted": 1, "unchanged": 0}
    assert again.status_code == 200 and again.json() == {"accepted": 0, "unchanged": 1}
    assert other.status_code == 409 and other.json()["code"] == "conflict"


async def test_batches_are_all_or_nothing(client: httpx.AsyncClient, database: Engine) -> None:
    ids = await predict_ids(client, instance(1.0, 0), instance(1.0, 1))
    unknown = [{"request_id": ids[0], "label": 0}, {"request_id": "never-issued", "label": 1}]
    response = await client.post("/v1/feedback", json=unknown)
    assert response.status_code == 404 and "never-issued" in response.json()["error"]
    with database.connect() as connection:
        assert connection.execute(select(Feedback)).all() == []
    good = [{"request_id": ids[0], "label": 0}, {"request_id": ids[1], "label": 1}]
    assert (await client.post("/v1/feedback", json=good)).json() == {"accepted": 2, "unchanged": 0}


async def test_idempotency_key_replays_and_refuses_reuse(client: httpx.AsyncClient) -> None:
    ids = await predict_ids(client, instance(1.0, 0), instance(1.0, 1))
    headers = {"Idempotency-Key": "batch-0001"}
    body = [{"request_id": ids[0], "label": 0}]
    first = await client.post("/v1/feedback", json=body, headers=headers)
    replay = await client.post("/v1/feedback", json=body, headers=headers)
    reuse = await client.post(
        "/v1/feedback", json=[{"request_id": ids[1], "label": 1}], headers=headers
    )
    assert first.json() == replay.json() == {"accepted": 1, "unchanged": 0}
    assert reuse.status_code == 422


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b'{"request_id": "x", "label": 1.5}', 400),
        (b'{"request_id": "x", "label": true}', 400),
        (b'{"request_id": "../x", "label": 1}', 400),
        (b'{"request_id": "x"}', 400),
        (b'{"request_id": "x", "label": 1, "extra": 2}', 400),
        (b"[]", 400),
        (b"{", 400),
        (b'{"request_id": "x", "label": 3}', 422),
        (b'{"request_id": "x", "label": -1}', 422),
        (b'{"request_id": "x", "label": 1}', 404),
    ],
)
async def test_bad_feedback_gets_a_clear_4xx(
    client: httpx.AsyncClient, body: bytes, status: int
) -> None:
    response = await client.post(
        "/v1/feedback", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status
    assert response.json()["error"]


@pytest.mark.parametrize(("flushed", "status"), [(True, 404), (False, 503)])
def test_an_id_is_unknown_only_once_the_writer_has_flushed(
    database: Engine, flushed: bool, status: int
) -> None:
    """A writer that cannot flush in time (database down or locked) may still hold the
    prediction: a 503 to retry, not a 404 that tells the client to drop a valid label."""
    waits: list[float] = []

    def flush_writer(timeout: float) -> bool:
        waits.append(timeout)
        return flushed

    store = FeedbackStore(
        session_factory(database), num_classes=lambda: 3, bucket_s=60, flush_writer=flush_writer
    )
    with pytest.raises(KdguardError) as caught:
        store.submit([Label("not-stored-yet", 1)], client="c", idempotency_key=None, body=b"{}")
    assert caught.value.status_code == status and len(waits) == 1
    assert ("Retry-After" in caught.value.headers) is (status == 503)
    with database.connect() as connection:
        assert connection.execute(select(Feedback)).all() == []
