"""A burst far over `server.max_in_flight` against `kdguard serve` (RELIABILITY.md).

kdguard and the fake teacher run as real processes; the teacher lags, so low-confidence
requests stay in flight while it answers. Many concurrent clients then ask at once: the
excess must get 503 with `Retry-After` quickly, every admitted request must get its answer,
and the service must answer normally right after. Timings are compared with a baseline
measured in the same test, with generous factors (the machine is shared).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.models import instance
from tests.support.processes import KdguardProcess, fake_teacher, kdguard_server

pytestmark = pytest.mark.slow

LOW = 0.05  # student confidence ≈ 0.37 < τ = 0.6: the request waits for the teacher
BOUND = 4
CLIENTS = 48  # concurrent clients: 12 times the bound
REQUESTS_PER_CLIENT = 6
TEACHER_DELAY_S = 0.5  # long beside a loaded client's own overhead (~0.1-0.2 s here)


async def _one(http: httpx.AsyncClient, i: int) -> tuple[int, float, httpx.Response | None]:
    body: dict[str, object]
    if i % 2:
        body = {
            "inputs": [
                {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": instance(LOW)}
            ]
        }
        path = "/v2/models/tiny/infer"
    else:
        body = {"inputs": [instance(LOW)]}
        path = "/v1/predict"
    start = time.monotonic()
    try:
        response = await http.post(path, json=body)
    except httpx.HTTPError:
        return -1, time.monotonic() - start, None
    return response.status_code, time.monotonic() - start, response


def _rejected_total(metrics: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(metrics):
        if family.name == "kdguard_requests_rejected":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


async def _burst(server: KdguardProcess) -> list[tuple[int, float, httpx.Response | None]]:
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=server.url, timeout=10.0, limits=limits) as http:

        async def client(c: int) -> list[tuple[int, float, httpx.Response | None]]:
            return [await _one(http, c + r) for r in range(REQUESTS_PER_CLIENT)]

        per_client = await asyncio.gather(*(client(c) for c in range(CLIENTS)))
    return [sample for samples in per_client for sample in samples]


async def test_a_burst_over_the_bound_is_shed_quickly(tmp_path: Path) -> None:
    overrides = {
        "server": {"max_in_flight": BOUND},
        "teacher": {"deadline_s": 2.0, "max_concurrency": 2},
    }
    work_dir = tmp_path / "kdguard"
    with (
        fake_teacher(tmp_path / "logs") as teacher,
        kdguard_server(work_dir, teacher_url=teacher.url, overrides=overrides) as server,
    ):
        await teacher.acontrol("slow", TEACHER_DELAY_S)
        async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as http:
            baseline = [await _one(http, i) for i in range(10)]
        assert [status for status, _, _ in baseline] == [200] * 10
        baseline_s = statistics.median(seconds for _, seconds, _ in baseline)

        started = time.monotonic()
        samples = await _burst(server)
        burst_s = time.monotonic() - started

        statuses = [status for status, _, _ in samples]
        assert set(statuses) <= {200, 503}, statuses  # nothing else, no dropped connection
        rejected = [(s, r) for status, s, r in samples if status == 503]
        admitted = [s for status, s, _ in samples if status == 200]
        assert len(rejected) >= len(samples) // 4, (len(rejected), len(samples))
        assert len(admitted) >= BOUND
        for _, response in rejected:
            assert response is not None
            assert response.headers["retry-after"] == "1"
            assert response.json()["code"] == "overloaded"
        # Refused without waiting for the teacher: a rejection is faster than an answer.
        rejected_s = statistics.median(s for s, _ in rejected)
        assert rejected_s < baseline_s / 2, (rejected_s, baseline_s)

        async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as http:
            # Normal service right after the burst (within 5 s, RELIABILITY.md).
            after = [await _one(http, i) for i in range(6)]
            metrics = (await http.get("/metrics")).text
        assert [status for status, _, _ in after] == [200] * 6
        assert after[0][1] < 5.0
        assert statistics.median(s for _, s, _ in after) < 3 * baseline_s + 0.05
        assert _rejected_total(metrics) == len(rejected)
        print(  # shown with -s: the figures behind the assertions
            f"baseline median {baseline_s * 1e3:.1f} ms; burst of {len(samples)} in "
            f"{burst_s:.2f} s: {len(admitted)} admitted (median "
            f"{statistics.median(admitted) * 1e3:.1f} ms), {len(rejected)} rejected "
            f"(median {rejected_s * 1e3:.1f} ms, max {max(s for s, _ in rejected) * 1e3:.1f} ms)"
        )
