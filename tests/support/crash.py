"""Helpers for tests that kill or stop `kdguard serve` mid-traffic (see test_crash_safety.py).

`Load` runs prediction clients, and label clients that post feedback for the request ids
those got, in bounded loops; every answer is kept with its request id. `Ledger` keeps
every label sent and what the service said about it, across restarts. `FlushBlocker`
holds the lock a prediction flush needs, so a test knows a flush is under way. The rest
finds the writer child of a server in /proc and reads what the database holds.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Connection, Engine, func, select, text
from sqlalchemy.engine import make_url

from service.persistence.database import make_engine
from service.persistence.tables import Feedback, Prediction
from tests.support.traffic import Metrics, Sample, predict, sample_value

NOT_STORED = {404, 409, 429, 503}  # feedback answers that promise nothing was stored
WRITER_CHILD = b"service.persistence.writer_process"


# -- clients -----------------------------------------------------------------------------


@dataclass
class Ledger:
    """Every label sent, and what the service answered, across restarts of the service."""

    assigned: dict[str, int] = field(default_factory=dict)
    acknowledged: dict[str, int] = field(default_factory=dict)
    unresolved: dict[str, int] = field(default_factory=dict)  # sent; no answer came back
    stored_unanswered: int = 0  # unresolved labels a later server said it already had
    unexpected: list[str] = field(default_factory=list)

    def label_for(self, request_id: str) -> int:
        return self.assigned.setdefault(request_id, len(self.assigned) % 3)

    async def post(self, http: httpx.AsyncClient, labels: dict[str, int]) -> dict[str, Any]:
        """POST the labels: on 200 they are acknowledged; with no answer, their fate is open."""
        body = [{"request_id": rid, "label": label} for rid, label in labels.items()]
        try:
            response = await http.post("/v1/feedback", json=body)
        except httpx.HTTPError:
            self.unresolved.update(labels)
            return {"status": -1}
        if response.status_code == 200:
            result: dict[str, Any] = response.json()
            if result["accepted"] + result["unchanged"] != len(labels):
                self.unexpected.append(f"feedback 200 does not add up: {result} for {labels}")
            self.acknowledged.update(labels)
            return {"status": 200, **result}
        if response.status_code not in NOT_STORED:
            self.unexpected.append(f"feedback {response.status_code}: {response.text[:300]}")
        return {"status": response.status_code}

    async def resolve(self, http: httpx.AsyncClient) -> None:
        """Send again the labels whose answer a kill cut off, to a server that is up."""
        pending, self.unresolved = self.unresolved, {}
        for chunk in chunks(list(pending.items()), 100):
            result = await self.post(http, dict(chunk))
            if result["status"] == 200:
                self.stored_unanswered += result["unchanged"]


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Load:
    """Prediction clients alternating confident and low-confidence requests, clients that
    send confident ones only, and label clients posting one to three labels at a time for
    the ids they got, until told to stop or `max_seconds` pass. A client stops at its
    first request that gets no HTTP answer (the server is gone or has closed its
    listener). `outstanding` maps each prediction in flight to (send time, low)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        predictors: int,
        confident: int = 0,
        labellers: int = 0,
        ledger: Ledger | None = None,
        pause_s: float = 0.01,
        max_seconds: float = 30.0,
    ) -> None:
        self.answers: list[Sample] = []
        self.outstanding: dict[int, tuple[float, bool]] = {}
        self._http = http
        self._ledger = ledger or Ledger()
        self._ids: asyncio.Queue[str] = asyncio.Queue()
        self._pause_s = pause_s
        self._end = time.monotonic() + max_seconds
        self._stop = asyncio.Event()
        self._tokens = itertools.count()
        self._counts = (predictors, confident, labellers)
        self._tasks: list[asyncio.Task[None]] = []

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self._end

    async def _predictor(self, index: int) -> None:
        for n in itertools.count():
            if not self._running():
                return
            alternate = index < self._counts[0]
            token, low = next(self._tokens), alternate and (n + index) % 2 == 1
            self.outstanding[token] = (time.monotonic(), low)
            answer = await predict(self._http, low=low, cls=n % 3)
            del self.outstanding[token]
            self.answers.append(answer)
            if answer.status == -1:
                return
            if answer.request_id is not None:
                self._ids.put_nowait(answer.request_id)
            await asyncio.sleep(self._pause_s)

    async def _labeller(self) -> None:
        while self._running():
            try:
                batch = [await asyncio.wait_for(self._ids.get(), 0.1)]
            except TimeoutError:
                continue
            while len(batch) < 3 and not self._ids.empty():
                batch.append(self._ids.get_nowait())
            labels = {rid: self._ledger.label_for(rid) for rid in batch}
            if (await self._ledger.post(self._http, labels))["status"] == -1:
                return

    def ok(self, since: float = 0.0) -> list[Sample]:
        """Predictions answered 200 (at or after `since`)."""
        return [a for a in self.answers if a.status == 200 and a.received >= since]

    def answered_ids(self) -> set[str]:
        return {a.request_id for a in self.ok() if a.request_id is not None}

    def waiting_low(self, *, older_than_s: float, younger_than_s: float) -> int:
        """Low-confidence predictions in flight, sent within the given ages."""
        now = time.monotonic()
        return sum(
            1
            for sent, low in self.outstanding.values()
            if low and older_than_s < now - sent < younger_than_s
        )

    async def __aenter__(self) -> Load:
        predictors, confident, labellers = self._counts
        clients = range(predictors + confident)
        self._tasks = [asyncio.create_task(self._predictor(i)) for i in clients]
        self._tasks += [asyncio.create_task(self._labeller()) for _ in range(labellers)]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


# -- processes ---------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def writer_child(pid: int) -> int | None:
    """The pid of the prediction writer process that process `pid` started, if it runs."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int(_stat_fields(int(entry.name))[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid and WRITER_CHILD in cmdline:
            return int(entry.name)
    return None


def gone(pid: int) -> bool:
    """True once `pid` has exited (reaped, or a zombie nobody has reaped yet)."""
    try:
        return _stat_fields(pid)[0] == "Z"
    except OSError:
        return True


def ignores_sigterm(pid: int) -> bool:
    """The writer child ignores SIGTERM once its imports are done (it is about to be ready)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    (mask,) = (line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask, 16) & (1 << (signal.SIGTERM - 1)))


# -- the database ------------------------------------------------------------------------


class FlushBlocker:
    """Holds the lock a prediction flush needs, so the writer's next flush waits inside its
    transaction: PostgreSQL `LOCK TABLE predictions IN SHARE MODE` (a feedback insert
    only key-share-locks the prediction it refers to and goes on), SQLite `BEGIN
    IMMEDIATE` (every write waits, feedback too; reads go on under WAL)."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._engine: Engine | None = None
        self._pg: Connection | None = None
        self._sqlite: sqlite3.Connection | None = None

    def hold(self) -> None:
        if not self._url.startswith("sqlite"):
            self._engine = make_engine(self._url, pool_size=1)
            self._pg = self._engine.connect()
            self._pg.begin()
            self._pg.execute(text("LOCK TABLE predictions IN SHARE MODE"))
            return
        path = make_url(self._url).database
        assert path is not None
        self._sqlite = sqlite3.connect(
            path, timeout=10.0, isolation_level=None, check_same_thread=False
        )
        self._sqlite.execute("BEGIN IMMEDIATE")

    def writer_waits(self) -> bool:
        """PostgreSQL: some session waits for the lock (only a flush asks for it). SQLite
        cannot tell: True (the caller sees the flush stall in the written counter)."""
        if self._pg is None:
            return True
        query = text(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
            "WHERE c.relname = 'predictions' AND NOT l.granted"
        )
        waiting: int = self._pg.execute(query).scalar_one()
        return waiting > 0

    def release(self) -> None:
        """Let the waiting flush go on (idempotent)."""
        if self._pg is not None:
            self._pg.rollback()
            self._pg.close()
            self._pg = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        if self._sqlite is not None:
            self._sqlite.rollback()
            self._sqlite.close()
            self._sqlite = None


def count_predictions(url: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            count = connection.execute(select(func.count()).select_from(Prediction)).scalar_one()
    finally:
        engine.dispose()
    return int(count)


def stored(url: str) -> tuple[set[str], dict[str, int], int]:
    """Prediction ids, feedback labels by request id, and rows that repeat a request id."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            ids = list(connection.execute(select(Prediction.request_id)).scalars())
            rows = connection.execute(select(Feedback.request_id, Feedback.label)).all()
    finally:
        engine.dispose()
    labels = {rid: label for rid, label in rows}
    return set(ids), labels, len(ids) - len(set(ids)) + len(rows) - len(labels)


def written(metrics: Metrics) -> float:
    return sample_value(metrics, "kdguard_records_written_total")


def dropped(metrics: Metrics) -> float:
    reasons = ("queue_full", "database_down", "shutdown")
    return sum(sample_value(metrics, "kdguard_records_dropped_total", reason=r) for r in reasons)
