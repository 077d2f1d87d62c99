"""Traffic and metrics helpers for tests that drive real kdguard processes over HTTP.

`Traffic` runs a few concurrent clients in a bounded loop (count and time), half of the
requests confident (the student answers) and half below τ (the teacher should); every
answer is kept as a `Sample`. `scrape` reads `/metrics` into a flat dict.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.models import instance

LOW = 0.05  # student confidence ≈ 0.37 < τ = 0.6: goes to the teacher
CONFIDENT = 1.0  # student confidence ≈ 0.96: the student answers

Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# -- traffic -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    sent: float
    received: float
    low: bool
    status: int  # -1: no HTTP answer at all
    served_by: str | None = None
    degraded: bool | None = None
    confidence: float | None = None
    error: str | None = None
    request_id: str | None = None

    @property
    def seconds(self) -> float:
        return self.received - self.sent


async def predict(http: httpx.AsyncClient, *, low: bool, cls: int = 0) -> Sample:
    body = {"inputs": [instance(LOW if low else CONFIDENT, cls)]}
    sent = time.monotonic()
    try:
        response = await http.post("/v1/predict", json=body)
    except httpx.HTTPError as exc:
        return Sample(sent, time.monotonic(), low, -1, error=repr(exc))
    received = time.monotonic()
    if response.status_code != 200:
        return Sample(sent, received, low, response.status_code, error=response.text)
    (p,) = response.json()["predictions"]
    return Sample(
        sent, received, low, 200, p["served_by"], p["degraded"], p["confidence"],
        request_id=p["request_id"],
    )  # fmt: skip


class Traffic:
    """`workers` clients in a loop, alternating confident and low-confidence requests."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        workers: int = 6,
        pause_s: float = 0.01,
        max_seconds: float = 20.0,
        max_requests_per_worker: int = 2000,
        low_only: bool = False,
    ) -> None:
        self.samples: list[Sample] = []
        self._http = http
        self._workers = workers
        self._pause_s = pause_s
        self._max_seconds = max_seconds
        self._max_requests = max_requests_per_worker
        self._low_only = low_only
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _worker(self, index: int) -> None:
        end = time.monotonic() + self._max_seconds
        for n in range(self._max_requests):
            if self._stop.is_set() or time.monotonic() > end:
                return
            low = self._low_only or (n + index) % 2 == 0
            self.samples.append(await predict(self._http, low=low, cls=n % 3))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._pause_s)

    def low(self, since: float = 0.0, until: float = float("inf")) -> list[Sample]:
        """Low-confidence samples sent at or after `since` and answered by `until`."""
        return [s for s in self.samples if s.low and s.sent >= since and s.received <= until]

    async def __aenter__(self) -> Traffic:
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self._workers)]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def wait_until(
    condition: Callable[[], bool], *, timeout_s: float, what: str, interval_s: float = 0.02
) -> float:
    """Poll `condition` until it holds; returns the time it first did (monotonic)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(interval_s)


# -- metrics -----------------------------------------------------------------------------


async def scrape(http: httpx.AsyncClient) -> Metrics:
    response = await http.get("/metrics")
    assert response.status_code == 200, response.text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def sample_value(metrics: Metrics, name: str, **labels: str) -> float:
    key = (name, tuple(sorted({"model": "tiny", **labels}.items())))
    assert key in metrics, f"{name}{labels} is not exported"
    return metrics[key]
