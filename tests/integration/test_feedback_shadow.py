"""A label for a shadowed prediction can arrive before its shadow call has ended.

Rows sampled for shadow are recorded when the teacher's shadow answer comes back, which
may be after the client got its answer and sent the label. The label must then wait for
the shadow call (bounded by `teacher.shadow_timeout_s`) and be stored, not refused as an
id the service never issued.
"""

from __future__ import annotations

import time

from sqlalchemy import Engine, select

from service.persistence.tables import Feedback, Prediction
from service.settings import Settings
from tests.conftest import make_settings, running_app
from tests.support.fakes import FakeTeacher
from tests.support.models import instance

SHADOW_DELAY_S = 0.4


async def test_a_label_waits_for_its_shadow_call_and_is_stored(
    settings: Settings, database_url: str, database: Engine
) -> None:
    with_db = make_settings(
        settings.registry.root,
        database={"url": database_url},
        server={"fast_path": settings.server.fast_path},
        routing={"shadow_rate": 1.0},  # every confident answer is shadowed
        recording={"flush_interval_s": 0.05, "writer_process": False},
    )
    teacher = FakeTeacher(delay_s=SHADOW_DELAY_S)
    async with running_app(with_db, teacher=teacher) as (_, http):
        predicted = await http.post("/v1/predict", json={"inputs": [instance(1.0, 1)]})
        assert predicted.status_code == 200, predicted.text
        (answer,) = predicted.json()["predictions"]
        assert answer["served_by"] == "student"  # confident: the teacher is shadow only
        sent = time.monotonic()
        response = await http.post(
            "/v1/feedback", json={"request_id": answer["request_id"], "label": 1}
        )
        waited = time.monotonic() - sent
        assert response.status_code == 200, response.text
        assert response.json() == {"accepted": 1, "unchanged": 0}
        # It did have to wait: the shadow call was still running when the label came.
        assert waited >= SHADOW_DELAY_S / 2, waited

    with database.connect() as connection:
        stored = connection.execute(
            select(Feedback.label, Feedback.teacher_correct).where(
                Feedback.request_id == answer["request_id"]
            )
        ).one()
        outcome = connection.execute(
            select(Prediction.teacher_outcome).where(Prediction.request_id == answer["request_id"])
        ).scalar_one()
    assert tuple(stored) == (1, True)  # joined with the shadow teacher's answer
    assert outcome == "shadow"


async def test_an_unknown_id_is_still_a_404(settings: Settings, database_url: str) -> None:
    with_db = make_settings(
        settings.registry.root,
        database={"url": database_url},
        routing={"shadow_rate": 1.0},
    )
    async with running_app(with_db, teacher=FakeTeacher()) as (_, http):
        predicted = await http.post("/v1/predict", json={"inputs": [instance(1.0)]})
        (answer,) = predicted.json()["predictions"]
        issued = answer["request_id"]
        unknown = issued[:-4] + ("0000" if issued[-4:] != "0000" else "1111")
        response = await http.post("/v1/feedback", json={"request_id": unknown, "label": 0})
    assert response.status_code == 404, response.text
    assert response.json()["code"] == "not_found"
