"""POST /v1/predict through the real app: routing, provenance, records, errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from service.monitoring.records import ServedBy, TeacherOutcome
from service.registry import ModelRegistry
from service.settings import Settings
from tests.conftest import PREDICT_KEY, make_settings, running_app
from tests.support.fakes import FakeTeacher, ListRecorder
from tests.support.models import instance

CONFIDENT = instance(1.0, 0)  # student confidence ≈ 0.96
UNSURE = instance(0.05, 1)  # student confidence ≈ 0.37 < τ = 0.6


async def predict(client: httpx.AsyncClient, body: object) -> httpx.Response:
    return await client.post("/v1/predict", json=body)


async def test_confident_instances_are_served_by_the_student(client: httpx.AsyncClient) -> None:
    response = await predict(client, {"inputs": [CONFIDENT], "request_ids": ["r-1"]})
    assert response.status_code == 200
    (p,) = response.json()["predictions"]
    assert p == {
        "request_id": "r-1",
        "label": 0,
        "class_name": "class-0",
        "confidence": pytest.approx(0.9647, abs=1e-4),
        "served_by": "student",
        "model_version": "1",
        "degraded": False,
    }


async def test_unsure_instances_are_answered_by_the_teacher(
    client: httpx.AsyncClient, fake_teacher: FakeTeacher, recorder: ListRecorder
) -> None:
    response = await predict(client, {"inputs": [CONFIDENT, UNSURE]})
    first, second = response.json()["predictions"]
    assert (first["served_by"], second["served_by"]) == ("student", "teacher")
    assert second["label"] == 1 and second["confidence"] > 0.99
    assert fake_teacher.calls == [1]  # only the unsure row went to the teacher
    by_id = {r.request_id: r for r in recorder.records}
    fallback = by_id[second["request_id"]]
    assert fallback.teacher_outcome is TeacherOutcome.FALLBACK
    assert fallback.inclusion_probability == 1.0 and fallback.teacher_probs is not None
    confident = by_id[first["request_id"]]
    assert confident.inclusion_probability == 0.0  # shadow_rate 0 in these settings
    assert confident.served_by is ServedBy.STUDENT and confident.teacher_probs is None


@pytest.mark.parametrize("mode", ["fail", "hang", "nan", "wrong_classes"])
async def test_teacher_failure_degrades_but_never_errors(settings: Settings, mode: str) -> None:
    teacher = FakeTeacher(mode=mode)
    recorder = ListRecorder()
    async with running_app(settings, teacher=teacher, recorder=recorder) as (_, client):
        response = await predict(client, {"inputs": [UNSURE, CONFIDENT]})
        metrics = (await client.get("/metrics")).text
    assert response.status_code == 200
    unsure, confident = response.json()["predictions"]
    assert unsure["served_by"] == "student" and unsure["degraded"] is True
    assert unsure["label"] == 1  # the student's own answer
    assert confident["degraded"] is False
    record = next(r for r in recorder.records if r.request_id == unsure["request_id"])
    assert record.teacher_outcome is TeacherOutcome.FALLBACK_FAILED and record.teacher_error
    assert 'kdguard_fallbacks_total{model="tiny",outcome="degraded"} 1.0' in metrics


async def test_shadow_runs_off_the_request_path_and_is_recorded(
    registry_settings_shadow: Settings,
) -> None:
    teacher = FakeTeacher(delay_s=0.05)
    recorder = ListRecorder()
    async with running_app(registry_settings_shadow, teacher=teacher, recorder=recorder) as (
        _,
        client,
    ):
        response = await predict(client, {"inputs": [CONFIDENT] * 4})
        # The response did not wait for the 50 ms shadow call...
        assert response.status_code == 200 and recorder.records == []
        for _ in range(100):
            if len(recorder.records) == 4:
                break
            await asyncio.sleep(0.01)
        metrics = (await client.get("/metrics")).text
    assert [r.teacher_outcome for r in recorder.records] == [TeacherOutcome.SHADOW] * 4
    assert all(
        r.inclusion_probability == 1.0 and r.teacher_probs is not None for r in recorder.records
    )
    assert all(r.served_by is ServedBy.STUDENT for r in recorder.records)
    assert 'kdguard_shadow_sampled_total{model="tiny"} 4.0' in metrics
    assert 'kdguard_stage_duration_seconds_count{kind="shadow",model="tiny"} 1.0' in metrics


@pytest.fixture
def registry_settings_shadow(settings: Settings) -> Settings:
    return make_settings(settings.registry.root, routing={"shadow_rate": 1.0})


async def test_one_flat_instance_is_accepted(client: httpx.AsyncClient) -> None:
    response = await predict(client, {"inputs": CONFIDENT})
    assert response.status_code == 200 and len(response.json()["predictions"]) == 1


BAD_BODIES: list[tuple[bytes, int, str]] = [
    (b'{"inputs": [[1, 0, 0]]}', 400, "4 numbers"),
    (b'{"inputs": [[1, 0, 0, "0"]]}', 400, "strings"),
    (b'{"inputs": [[1, 0, 0, true]]}', 400, "booleans"),
    (b'{"inputs": [[1, 0, 0, null]]}', 400, "nulls"),
    (b'{"inputs": [[1, 0, 0, 1e39]]}', 400, "too large"),
    (b'{"inputs": [[1, 0, 0, NaN]]}', 400, "malformed JSON"),
    (b'{"inputs": [[1, 0, 0, Infinity]]}', 400, "malformed JSON"),
    (b'{"inputs": []}', 400, "empty"),
    (b'{"inputs": [[1, 0, 0, 0], [1, 0]]}', 400, "same length"),
    (b'{"inputs": [[[1, 0, 0, 0]]]}', 400, "nested lists"),
    (b'{"inputs": 3}', 400, "must be a list"),
    (b'{"input": [[1, 0, 0, 0]]}', 400, "unknown field"),
    (b"[[1, 0, 0, 0]]", 400, "JSON object"),
    (b'{"inputs": [[1, 0, 0, 0]', 400, "malformed JSON"),
    (b"", 400, "empty"),
    (b'{"inputs": [[1, 0, 0, 0]], "request_ids": ["a", "b"]}', 400, "one per instance"),
    (b'{"inputs": [[1, 0, 0, 0]], "request_ids": ["../x"]}', 400, "request id"),
    (b'{"inputs": [[1, 0, 0, 0]], "routing_key": 5}', 400, "routing_key"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_BODIES)
async def test_bad_input_gets_a_clear_4xx(
    client: httpx.AsyncClient, body: bytes, status: int, message: str
) -> None:
    response = await client.post(
        "/v1/predict", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status
    assert message in response.json()["error"] and response.json()["code"]


async def test_oversized_batch_and_body(settings: Settings) -> None:
    small = make_settings(settings.registry.root, server={"max_batch": 4, "max_body_bytes": 4096})
    async with running_app(small, teacher=FakeTeacher()) as (_, client):
        over_batch = await predict(client, {"inputs": [CONFIDENT] * 5})
        over_body = await client.post(
            "/v1/predict",
            content=b"[" + b"1," * 5000 + b"1]",
            headers={"content-type": "application/json"},
        )

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b" " * 1000

        chunked = await client.post(
            "/v1/predict", content=chunks(), headers={"content-type": "application/json"}
        )
    assert over_batch.status_code == 400 and "over the limit of 4" in over_batch.json()["error"]
    assert over_body.status_code == 413 and over_body.json()["code"] == "payload_too_large"
    assert chunked.status_code == 413


async def test_wrong_content_type_is_415(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/predict", content=b"inputs=1", headers={"content-type": "text/plain"}
    )
    assert response.status_code == 415 and response.json()["code"] == "unsupported_media_type"


async def test_predict_key_required_when_configured(settings: Settings) -> None:
    locked = settings.model_copy(
        update={"auth": settings.auth.model_copy(update={"require_predict_key": True})}
    )
    async with running_app(locked, teacher=FakeTeacher()) as (_, client):
        anonymous = await predict(client, {"inputs": [CONFIDENT]})
        keyed = await client.post(
            "/v1/predict",
            json={"inputs": [CONFIDENT]},
            headers={"Authorization": f"Bearer {PREDICT_KEY}"},
        )
    assert anonymous.status_code == 401 and keyed.status_code == 200


async def test_metrics_count_requests_predictions_and_latency(client: httpx.AsyncClient) -> None:
    await predict(client, {"inputs": [CONFIDENT, UNSURE]})
    await client.post("/v1/predict", content=b"{", headers={"content-type": "application/json"})
    text = (await client.get("/metrics")).text
    for line in [
        'kdguard_requests_total{kind="rest",model="tiny",outcome="ok"} 1.0',
        'kdguard_requests_total{kind="rest",model="tiny",outcome="client_error"} 1.0',
        'kdguard_predictions_total{model="tiny",outcome="ok",served_by="student",version="1"} 1.0',
        'kdguard_predictions_total{model="tiny",outcome="ok",served_by="teacher",version="1"} 1.0',
        'kdguard_fallbacks_total{model="tiny",outcome="teacher"} 1.0',
        'kdguard_stage_duration_seconds_count{kind="student",model="tiny"} 1.0',
        'kdguard_stage_duration_seconds_count{kind="teacher",model="tiny"} 1.0',
        'kdguard_stage_duration_seconds_count{kind="total",model="tiny"} 1.0',
        'kdguard_student_confidence_count{model="tiny"} 2.0',
        'kdguard_student_entropy_count{model="tiny"} 2.0',
        'kdguard_teacher_circuit_state{model="tiny"} 0.0',
        'kdguard_fallback_threshold{model="tiny"} 0.6',
        'kdguard_model_info{kind="student",model="tiny",version="1"} 1.0',
        'kdguard_model_info{kind="teacher",model="tiny",version="fake-1"} 1.0',
        'kdguard_teacher_batch_rows_count{model="tiny"} 1.0',
    ]:
        assert line in text, line


async def test_a_remote_teacher_down_at_start_up_is_not_fatal(settings: Settings) -> None:
    from tests.support.processes import free_port

    remote = make_settings(
        settings.registry.root,
        teacher={
            "mode": "remote",
            "remote": {"url": f"http://127.0.0.1:{free_port()}", "model_name": "tiny-teacher"},
        },
    )
    async with running_app(remote) as (_, client):
        response = await predict(client, {"inputs": [UNSURE, CONFIDENT]})
    unsure, confident = response.json()["predictions"]
    assert response.status_code == 200
    assert unsure["degraded"] is True and unsure["served_by"] == "student"
    assert confident["degraded"] is False


async def test_shadow_rows_refused_by_an_open_circuit_are_still_recorded(
    registry: ModelRegistry, fake_teacher: FakeTeacher, recorder: ListRecorder
) -> None:
    """Every answered request leaves a record (its feedback must not get a 404), including
    those whose shadow call the dispatcher refused outright."""
    settings = make_settings(registry.root, routing={"shadow_rate": 1.0, "seed": 7})
    fake_teacher.mode = "fail"
    async with running_app(settings, teacher=fake_teacher, recorder=recorder) as (_, client):
        for _ in range(5):  # low-confidence rows fail at the teacher until the circuit opens
            await client.post("/v1/predict", json={"inputs": [instance(0.01)]})
        response = await client.post("/v1/predict", json={"inputs": [instance(1.0)]})
        request_id = response.json()["predictions"][0]["request_id"]
        await asyncio.sleep(0.05)
    mine = [r for r in recorder.records if r.request_id == request_id]
    assert len(mine) == 1 and mine[0].teacher_outcome is TeacherOutcome.SHADOW_DROPPED
    assert mine[0].teacher_error == "circuit_open"
