"""`kdguard serve` with two workers: one scrape adds up both, and dead workers are forgotten.

The server runs as a real process tree (uvicorn's supervisor and two spawned workers);
the test reads prometheus_client's per-process files itself to know what each worker
counted, and compares that with what one scrape of `/metrics` says.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, cast

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.parser import text_string_to_metric_families

from tests.support.models import instance
from tests.support.processes import KdguardProcess, kdguard_server

pytestmark = pytest.mark.slow

REQUESTS = "kdguard_requests_total"
STALE_PID = 4_000_000  # above any pid_max: never a live process


class _MmapFile(Protocol):  # prometheus_client's MmapedDict is untyped
    def write_value(self, key: str, value: float, timestamp: float) -> None: ...
    def close(self) -> None: ...


_open_mmap = cast(Callable[[str], _MmapFile], MmapedDict)
_read_mmap = cast(
    Callable[[str], list[tuple[str, float, float, int]]], MmapedDict.read_all_values_from_file
)


def _overrides(metrics_dir: Path) -> dict[str, object]:
    return {
        "server": {"workers": 2, "metrics_dir": str(metrics_dir)},
        "teacher": {"mode": "none"},
        "monitoring": {"enabled": False},
    }


def _seed_stale_counter(metrics_dir: Path) -> None:
    """What a previous run would leave: 1000 requests from a worker long gone."""
    metrics_dir.mkdir(parents=True)
    stale = _open_mmap(str(metrics_dir / f"counter_{STALE_PID}.db"))
    key = mmap_key(
        "kdguard_requests", REQUESTS, ["model", "kind", "outcome"], ["tiny", "rest", "ok"], "x"
    )
    stale.write_value(key, 1000.0, 0.0)
    stale.close()


def _requests_by_pid(metrics_dir: Path) -> Counter[int]:
    """Requests each worker counted, read from its own counter file."""
    counts: Counter[int] = Counter()
    for path in metrics_dir.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        for key, value, _, _ in _read_mmap(str(path)):
            if json.loads(key)[1] == REQUESTS:
                counts[pid] += int(value)
    return counts


def _predict(url: str) -> int:
    # A new connection per request, so the kernel hands them to either worker.
    with httpx.Client(base_url=url, timeout=10.0) as client:
        return client.post("/v1/predict", json={"inputs": [instance(1.0, 1)]}).status_code


def _drive_until_both_workers_served(server: KdguardProcess, metrics_dir: Path) -> int:
    """Send requests until two worker pids have counted some; how many were sent."""
    sent = 0
    deadline = time.monotonic() + 30
    with ThreadPoolExecutor(max_workers=8) as pool:
        while True:
            statuses = list(pool.map(_predict, [server.url] * 40))
            assert statuses == [200] * len(statuses)
            sent += len(statuses)
            if len([pid for pid, n in _requests_by_pid(metrics_dir).items() if n > 0]) >= 2:
                return sent
            assert time.monotonic() < deadline, f"one worker took every request: {sent} sent"


def _scrape(server: KdguardProcess) -> dict[str, list[tuple[dict[str, str], float]]]:
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    text = httpx.get(f"{server.url}/metrics", timeout=10.0).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def _total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    return sum(value for _, value in samples.get(name, []))


def _worker_pids(server: KdguardProcess) -> list[int]:
    """The supervisor's spawned workers (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    return [
        int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def test_counters_from_two_workers_add_up_in_one_scrape(tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    _seed_stale_counter(metrics_dir)
    with kdguard_server(tmp_path / "kdguard", teacher_url="http://127.0.0.1:9", overrides=(
        _overrides(metrics_dir)
    )) as server:  # fmt: skip
        assert not (metrics_dir / f"counter_{STALE_PID}.db").exists(), "not wiped at start"
        sent = _drive_until_both_workers_served(server, metrics_dir)
        by_pid = _requests_by_pid(metrics_dir)
        samples = _scrape(server)
        server.assert_alive()
    served = [pid for pid, n in by_pid.items() if n > 0]
    assert len(served) == 2, by_pid
    assert sum(by_pid.values()) == sent
    assert _total(samples, REQUESTS) == sent  # both workers, nothing stale
    assert _total(samples, "kdguard_predictions_total") == sent
    # Gauges combine by their mode: no per-process series, one value per label set.
    assert all("pid" not in labels for series in samples.values() for labels, _ in series)
    assert samples["kdguard_fallback_threshold"] == [({"model": "tiny"}, 0.6)]
    assert samples["kdguard_model_info"] == [
        ({"model": "tiny", "version": "1", "kind": "student"}, 1.0)
    ]


def test_a_dead_worker_keeps_its_counts_and_loses_its_gauges(tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    with kdguard_server(tmp_path / "kdguard", teacher_url="http://127.0.0.1:9", overrides=(
        _overrides(metrics_dir)
    )) as server:  # fmt: skip
        sent = _drive_until_both_workers_served(server, metrics_dir)
        victim = max(_requests_by_pid(metrics_dir).items(), key=lambda item: item[1])[0]
        assert victim in _worker_pids(server)
        assert list(metrics_dir.glob(f"gauge_live*_{victim}.db"))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:  # the supervisor starts a replacement, which serves
            pids = _worker_pids(server)
            if victim not in pids and len(pids) == 2 and _predict(server.url) == 200:
                break
            assert time.monotonic() < deadline, f"no replacement worker: {pids}"
            time.sleep(0.2)
        samples = _scrape(server)
        server.assert_alive()
    assert not list(metrics_dir.glob(f"gauge_live*_{victim}.db")), "dead worker's gauges kept"
    assert (metrics_dir / f"counter_{victim}.db").exists()
    assert _total(samples, REQUESTS) >= sent + 1  # the dead worker's requests still count
    assert samples["kdguard_model_info"] == [
        ({"model": "tiny", "version": "1", "kind": "student"}, 1.0)
    ]
