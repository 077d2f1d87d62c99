"""Traffic and metrics helpers for tests that drive real kdguard processes over HTTP.

`Traffic` runs a few concurrent clients in a bounded loop (count and time), half of the
requests confident (the student answers) and half below τ (the teacher should); every
answer is kept as a `Sample`. `PacedTraffic` sends the same mix at a fixed rate over raw
keep-alive `Connection`s, for tests that time kdguard: httpx spends about a millisecond
of the client's CPU per request, which on two cores shows in kdguard's timings. `scrape`
reads `/metrics` into a flat dict.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from tests.support.models import instance
from tests.support.processes import HOST

LOW = 0.05  # student confidence ≈ 0.37 < τ = 0.6: goes to the teacher
CONFIDENT = 1.0  # student confidence ≈ 0.96: the student answers

Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# -- traffic -----------------------------------------------------------------------------


@contextlib.contextmanager
def steady_client() -> Iterator[None]:
    """Time kdguard, not this process's garbage collector.

    A pytest process that has imported torch, scikit-learn, schemathesis and the rest holds
    some 400,000 tracked objects, and a full collection of them takes 0.2-0.3 s: every
    request in flight then looks that much slower (a burst's rejections measured 0.31 s
    in one full run, 15 ms alone). Collect once, freeze what is there, and let the
    collector traverse only what the timed traffic allocates.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


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


class Connection:
    """One keep-alive HTTP/1.1 connection over asyncio streams (kdguard's answers to
    these requests always carry a Content-Length)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection(HOST, port))

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body)."""
        head = (
            f"POST {path} HTTP/1.1\r\nhost: {HOST}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        )
        self._writer.write(head.encode() + body)
        lines = (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        }
        return status, headers, await self._reader.readexactly(int(headers["content-length"]))

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


class PacedTraffic:
    """Requests to `/v1/predict` at a fixed rate, whatever the answers' latency (an open
    loop), alternately confident and low-confidence: windows before, during and after a
    fault carry the same load. Bounded in count and time; a request due while every one
    of its `connections` is busy is skipped and counted."""

    def __init__(
        self, port: int, *, per_second: float, max_seconds: float, connections: int = 16
    ) -> None:
        self.samples: list[Sample] = []
        self.skipped = 0
        self._port = port
        self._interval_s = 1.0 / per_second
        self._max_requests = int(per_second * max_seconds)
        self._connections = connections
        self._idle: deque[Connection] = deque()
        self._outstanding: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None

    def low(self, since: float = 0.0, until: float = math.inf) -> list[Sample]:
        """Low-confidence samples sent at or after `since` and answered by `until`."""
        return [s for s in self.samples if s.low and s.sent >= since and s.received <= until]

    def confident(self, since: float = 0.0, until: float = math.inf) -> list[Sample]:
        """Confident samples (the student answers them) sent and answered in the window."""
        return [s for s in self.samples if not s.low and s.sent >= since and s.received <= until]

    async def _send(self, n: int, connection: Connection) -> None:
        low = n % 2 == 1
        body = orjson.dumps({"inputs": [instance(LOW if low else CONFIDENT, n // 2 % 3)]})
        sent = time.monotonic()
        try:
            async with asyncio.timeout(5.0):
                status, _, content = await connection.post("/v1/predict", body)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            await connection.aclose()
            self.samples.append(Sample(sent, time.monotonic(), low, -1, error=repr(exc)))
            with contextlib.suppress(OSError):
                self._idle.append(await Connection.open(self._port))
            return
        received = time.monotonic()
        self._idle.append(connection)  # taken from the other end: none idles for long
        if status != 200:
            self.samples.append(Sample(sent, received, low, status, error=content.decode()))
            return
        (p,) = orjson.loads(content)["predictions"]
        self.samples.append(
            Sample(
                sent, received, low, 200, p["served_by"], p["degraded"], p["confidence"],
                request_id=p["request_id"],
            )
        )  # fmt: skip

    async def _run(self) -> None:
        started = time.monotonic()
        for n in range(self._max_requests):
            with contextlib.suppress(TimeoutError):
                delay_s = started + n * self._interval_s - time.monotonic()
                await asyncio.wait_for(self._stop.wait(), max(delay_s, 0.0))
            if self._stop.is_set():
                return
            if not self._idle:
                self.skipped += 1
                continue
            task = asyncio.create_task(self._send(n, self._idle.popleft()))
            self._outstanding.add(task)
            task.add_done_callback(self._outstanding.discard)

    async def __aenter__(self) -> PacedTraffic:
        self._idle = deque([await Connection.open(self._port) for _ in range(self._connections)])
        self._sender = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._sender is not None:
            await self._sender
        await asyncio.gather(*self._outstanding)
        for connection in self._idle:
            await connection.aclose()


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
