"""The monitor over real traffic through the app: windows stored, gauges set, summary."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, func, select, text

from service.monitoring.monitor import Monitor
from service.persistence.database import is_postgres, make_engine
from service.persistence.tables import EntropyReferenceRow, MetricWindow
from service.settings import Settings
from tests.conftest import make_settings, running_app
from tests.support.fakes import FakeTeacher
from tests.support.models import instance


def gauges(text_body: str) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(text_body):
        for sample in family.samples:
            if "kind" in sample.labels and sample.name.startswith(
                (
                    "kdguard_flip",
                    "kdguard_ece",
                    "kdguard_accuracy",
                    "kdguard_teacher_gap",
                    "kdguard_label",
                )
            ):
                out[(sample.name, sample.labels["kind"])] = sample.value
    return out


@pytest.fixture
def monitored(registry_settings: Settings, database_url: str) -> Settings:
    return make_settings(
        registry_settings.registry.root,
        database={"url": database_url},
        routing={"shadow_rate": 1.0, "fallback_threshold": 0.6},
        monitoring={
            "windows": ["1h"],
            "min_samples": 20,
            "reference_min_samples": 50,
            "interval_s": 3600,
        },
    )


@pytest.fixture
def registry_settings(settings: Settings) -> Settings:
    return settings


async def test_windows_gauges_and_summary_agree(monitored: Settings, database: Engine) -> None:
    async with running_app(monitored, teacher=FakeTeacher()) as (app, client):
        ids: list[str] = []
        for i in range(60):  # confident (shadowed) and unsure (fallback) rows, three classes
            row = instance(1.0 if i % 3 else 0.05, i % 3)
            response = await client.post("/v1/predict", json={"inputs": [row]})
            ids.append(response.json()["predictions"][0]["request_id"])
        services = app.state.services
        labels = [{"request_id": rid, "label": i % 3} for i, rid in enumerate(ids)]
        assert (await client.post("/v1/feedback", json=labels)).status_code == 200
        monitor: Monitor = services.monitor
        first = await asyncio.to_thread(monitor.evaluate)  # freezes the entropy reference
        windows = await asyncio.to_thread(monitor.evaluate)  # reads it back
        assert [w.values.keys() for w in first] == [w.values.keys() for w in windows]
        summary = (await client.get("/v1/monitoring/summary", params={"window": "1h"})).json()
        exposition = (await client.get("/metrics")).text
        bad = await client.get("/v1/monitoring/summary", params={"window": "7m"})

    current = max(windows, key=lambda w: w.start)
    assert current.label_completeness == 1.0 and current.matured is False  # window still open
    metrics = summary["metrics"]
    assert set(metrics) == {"flip_rate", "accuracy_gap", "teacher_gap", "ece", "entropy_drift_js"}
    assert metrics["flip_rate"]["n"] == 60 and metrics["flip_rate"]["state"] in {"ok", "alert"}
    assert metrics["ece"]["n"] == 60 and metrics["ece"]["label_completeness"] == 1.0
    # The fake teacher agrees with the student on every row here.
    assert metrics["flip_rate"]["value"] == 0.0
    live = gauges(exposition)
    assert live[("kdguard_flip_rate", "1h")] == metrics["flip_rate"]["value"]
    assert live[("kdguard_teacher_gap", "1h")] == pytest.approx(metrics["teacher_gap"]["value"])
    assert live[("kdguard_label_completeness", "1h")] == 1.0
    # Labelled metrics go to the gauges only from matured windows: none yet.
    assert ("kdguard_ece", "1h") not in live
    assert bad.status_code == 400
    with database.connect() as connection:
        stored = connection.execute(select(func.count()).select_from(MetricWindow)).scalar_one()
        source, n = connection.execute(
            select(EntropyReferenceRow.source, EntropyReferenceRow.n)
        ).one()
    assert stored == 5
    assert source == "traffic" and n == 60


async def test_only_one_replica_evaluates_at_a_time(monitored: Settings, database_url: str) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite is single-process: there is no second replica to exclude")
    async with running_app(monitored, teacher=FakeTeacher()) as (app, client):
        await client.post("/v1/predict", json={"inputs": [instance(1.0)]})
        monitor: Monitor = app.state.services.monitor
        for _ in range(100):  # the writer flushes the prediction within its interval
            if await asyncio.to_thread(monitor.evaluate):
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the monitor never evaluated")
        holder = make_engine(database_url)
        with holder.begin() as connection:
            assert is_postgres(holder)
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": 0x6B64677561726400})
            assert await asyncio.to_thread(monitor.evaluate) == []  # another replica holds it
        assert await asyncio.to_thread(monitor.evaluate) != []
        holder.dispose()
