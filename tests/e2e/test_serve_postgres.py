"""`kdguard serve` against PostgreSQL as a real process: records, feedback, monitor, summary."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from service.persistence.database import make_engine
from service.persistence.tables import Feedback, MetricWindow, Prediction
from tests.conftest import scratch_postgres
from tests.support.models import instance
from tests.support.processes import FakeTeacherProcess, fake_teacher, kdguard_server

pytestmark = pytest.mark.slow


@pytest.fixture
def postgres() -> Iterator[str]:
    with scratch_postgres() as url:  # empty: the server migrates it at start
        yield url


def test_serve_records_labels_and_monitors_on_postgres(tmp_path: Path, postgres: str) -> None:
    overrides = {
        "database": {"url": postgres},
        "routing": {"shadow_rate": 1.0},
        "recording": {"flush_interval_s": 0.05},
        "monitoring": {
            "windows": ["1h"],
            "interval_s": 0.5,
            "min_samples": 10,
            "reference_min_samples": 50,
        },
    }
    teacher: FakeTeacherProcess
    with (
        fake_teacher(tmp_path / "teacher") as teacher,
        kdguard_server(
            tmp_path / "kdguard", teacher_url=teacher.url, overrides=overrides
        ) as server,
        httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10.0) as client,
    ):
        ids = []
        for i in range(60):
            body = {"inputs": [instance(1.0 if i % 2 else 0.05, i % 3)]}
            response = client.post("/v1/predict", json=body)
            assert response.status_code == 200
            ids.append(response.json()["predictions"][0]["request_id"])
        labels = [{"request_id": rid, "label": i % 3} for i, rid in enumerate(ids)]
        assert client.post("/v1/feedback", json=labels).json() == {"accepted": 60, "unchanged": 0}
        deadline = time.monotonic() + 20
        while True:
            summary = client.get("/v1/monitoring/summary", params={"window": "1h"}).json()
            flip = summary["metrics"].get("flip_rate")
            if flip is not None and flip["n"] == 60:
                break
            assert time.monotonic() < deadline, f"monitor never saw the traffic: {summary}"
            time.sleep(0.2)
        server.assert_alive()
    engine = make_engine(postgres)
    with engine.connect() as connection:
        predictions = connection.execute(select(func.count()).select_from(Prediction)).scalar_one()
        feedback = connection.execute(select(func.count()).select_from(Feedback)).scalar_one()
        windows = connection.execute(select(func.count()).select_from(MetricWindow)).scalar_one()
    engine.dispose()
    assert (predictions, feedback) == (60, 60)
    assert windows >= 4
    assert summary["metrics"]["ece"]["n"] == 60
