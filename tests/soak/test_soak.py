"""Soak: `kdguard serve` under steady mixed traffic for minutes, its memory watched.

Not part of the default run (marker `soak`, deselected in pyproject.toml); run it with
`make soak` (5 minutes) or `KDGUARD_SOAK_SECONDS=60 make soak`. kdguard and the fake
teacher are real processes on loopback; the traffic is bounded in time: clients asking
confident and low-confidence questions (the teacher answers those, and a share goes to
shadow), a labeller posting feedback for ids the service issued, and a watcher scraping
`/metrics` and the monitoring summary.

Every few seconds the test reads the anonymous resident memory (the heap; file pages
such as SQLite's caches are left out) of the server and its writer process, and the
server's open file descriptors and threads. After a warm-up (the first fifth, at least
30 s: caches, the first metric windows, pools and queues reach their working size), the
heap may not grow by more than GROWTH_BOUND_MIB, nor trend upwards faster than
SLOPE_BOUND_MIB_PER_MIN (a least-squares fit over the readings after warm-up), and
descriptors and threads stay where they were. A leak of 1 KiB a request is about 6 MiB
a minute at a hundred requests a second, so the bounds catch one within the default run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support.processes import KdguardProcess, fake_teacher, kdguard_server
from tests.support.traffic import Traffic, predict, sample_value, scrape

pytestmark = pytest.mark.soak

SECONDS = float(os.environ.get("KDGUARD_SOAK_SECONDS", "300"))
WARM_UP_S = max(30.0, SECONDS / 5)
SAMPLE_EVERY_S = 5.0
GROWTH_BOUND_MIB = 48.0
SLOPE_BOUND_MIB_PER_MIN = 4.0
FD_GROWTH_BOUND = 16
THREAD_GROWTH_BOUND = 4


@dataclass(frozen=True)
class Reading:
    at: float  # seconds since traffic started
    server_mib: float  # anonymous resident memory of the server process
    children_mib: float  # and of its children (the writer process)
    fds: int
    threads: int
    requests: float

    @property
    def rss_mib(self) -> float:
        return self.server_mib + self.children_mib


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _anon_mib(pid: int) -> float:
    """Anonymous resident memory (the heap): file pages such as SQLite's shared-memory
    index are cache, not a leak, and are left out."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


def read_process(server: KdguardProcess, at: float, requests: float) -> Reading:
    pid = server.pid
    return Reading(
        at=at,
        server_mib=_anon_mib(pid),
        children_mib=sum(_anon_mib(c) for c in _children(pid)),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=len(os.listdir(f"/proc/{pid}/task")),
        requests=requests,
    )


async def _labeller(http: httpx.AsyncClient, until: float, counts: dict[str, int]) -> None:
    """Ask, then label the answer (the teacher's rule: the largest feature's class)."""
    n = 0
    while time.monotonic() < until:
        cls = n % 3
        sample = await predict(http, low=n % 2 == 0, cls=cls)
        n += 1
        if sample.request_id is None:
            counts["predict_failed"] += 1
            continue
        response = await http.post(
            "/v1/feedback", json={"request_id": sample.request_id, "label": cls}
        )
        counts[str(response.status_code)] = counts.get(str(response.status_code), 0) + 1
        await asyncio.sleep(0.05)


async def _watcher(http: httpx.AsyncClient, until: float, statuses: list[int]) -> None:
    while time.monotonic() < until:
        for path in ("/metrics", "/v1/monitoring/summary?window=5m"):
            statuses.append((await http.get(path)).status_code)
        await asyncio.sleep(1.0)


def slope_mib_per_min(readings: list[Reading]) -> float:
    at = np.array([r.at for r in readings])
    rss = np.array([r.rss_mib for r in readings])
    return float(np.polyfit(at, rss, 1)[0] * 60)


async def test_memory_stays_flat_under_steady_traffic(tmp_path: Path) -> None:
    overrides = {
        "routing": {"shadow_rate": 0.2},
        "monitoring": {"interval_s": 5.0},
        "server": {"shutdown_grace_s": 5},
    }
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    with (
        fake_teacher(tmp_path / "teacher") as teacher,
        kdguard_server(tmp_path / "kdguard", teacher_url=teacher.url, overrides=overrides) as kd,
    ):
        async with httpx.AsyncClient(base_url=kd.url, timeout=10.0, limits=limits) as http:
            started = time.monotonic()
            until = started + SECONDS
            feedback: dict[str, int] = {"predict_failed": 0}
            watched: list[int] = []
            readings: list[Reading] = []
            traffic = Traffic(
                http, workers=4, pause_s=0.002, max_seconds=SECONDS, max_requests_per_worker=10**7
            )
            async with traffic:
                side = [
                    asyncio.create_task(_labeller(http, until, feedback)),
                    asyncio.create_task(_watcher(http, until, watched)),
                ]
                while time.monotonic() < until:
                    now = time.monotonic() - started
                    readings.append(read_process(kd, now, len(traffic.samples)))
                    await asyncio.sleep(min(SAMPLE_EVERY_S, max(until - time.monotonic(), 0)))
                await asyncio.gather(*side)
            readings.append(read_process(kd, time.monotonic() - started, len(traffic.samples)))
            metrics = await scrape(http)
        kd.assert_alive()

    samples = traffic.samples
    failed = [s for s in samples if s.status != 200]
    assert not failed, f"{len(failed)} of {len(samples)} requests failed, e.g. {failed[:3]}"
    assert set(watched) == {200}, sorted(set(watched))
    assert feedback.get("200", 0) > 0 and set(feedback) <= {"200", "predict_failed"}, feedback
    assert feedback["predict_failed"] == 0, feedback
    assert sample_value(metrics, "kdguard_records_dropped_total", reason="queue_full") == 0

    warm = [r for r in readings if r.at >= WARM_UP_S]
    assert len(warm) >= 4, f"too few readings after warm-up: {readings}"
    base = warm[0]
    growth = max(r.rss_mib for r in warm) - base.rss_mib
    slope = slope_mib_per_min(warm)
    rate = (readings[-1].requests - readings[0].requests) / (readings[-1].at - readings[0].at)
    p99 = statistics.quantiles([s.seconds for s in samples], n=100)[98] * 1e3
    print(  # shown with -s: the figures behind the assertions
        f"soak {SECONDS:.0f}s: {len(samples)} requests ({rate:.0f}/s, p99 {p99:.1f} ms), "
        f"{feedback['200']} labels; anonymous RSS {readings[0].rss_mib:.1f} MiB at start, "
        f"{base.rss_mib:.1f} after warm-up ({base.server_mib:.1f} server, "
        f"{base.children_mib:.1f} writer), peak {max(r.rss_mib for r in warm):.1f}, end "
        f"{readings[-1].rss_mib:.1f} ({readings[-1].server_mib:.1f} server, "
        f"{readings[-1].children_mib:.1f} writer; growth {growth:.1f} MiB, "
        f"trend {slope:+.2f} MiB/min); "
        f"fds {base.fds}->{readings[-1].fds}, threads {base.threads}->{readings[-1].threads}"
    )
    assert growth <= GROWTH_BOUND_MIB, (growth, readings)
    assert slope <= SLOPE_BOUND_MIB_PER_MIN, (slope, readings)
    assert max(r.fds for r in warm) - base.fds <= FD_GROWTH_BOUND, readings
    assert max(r.threads for r in warm) - base.threads <= THREAD_GROWTH_BOUND, readings
