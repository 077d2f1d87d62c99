"""Crash safety of `kdguard serve` as a real process (RELIABILITY.md), on SQLite and PostgreSQL.

SIGKILL during a flush: kdguard is killed and restarted on the same database three times
while predictions and feedback labels flow. Twice the test holds the lock a prediction
flush needs, so the writer's flush is provably under way (its transaction open, waiting)
when the kill lands: once the server dies with its writer child (a container or
process-group kill; on PostgreSQL just as the lock is let go, racing the flush's COPY and
commit), once alone (the OOM killer picks one process; the orphaned writer finishes its
flush). The third kill comes under plain load, right after a flush committed.
Every label answered 200 must be stored exactly once with its label; the prediction rows
one kill costs stay within the writer's queue bound; and whatever
`kdguard_records_written_total` counted before the kill is in the table.

SIGTERM under load: low-confidence requests wait on a slow teacher, so several are really
in flight when the signal comes (to the server and, as a service manager sends it, to its
writer child). They must all be answered 200; the listener closes while they finish; the
process exits 0 within `server.shutdown_grace_s`; and the writer, which had flushed
nothing yet, has stored a row for every prediction answered 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import scratch_postgres
from tests.support.crash import (
    FlushBlocker,
    Ledger,
    Load,
    chunks,
    count_predictions,
    dropped,
    gone,
    ignores_sigterm,
    stored,
    writer_child,
    written,
)
from tests.support.processes import HOST, KdguardProcess, fake_teacher, kdguard_server
from tests.support.traffic import Metrics, scrape, wait_until

pytestmark = pytest.mark.slow

QUEUE_ROWS = 50  # the writer's bound: the most prediction records one kill may cost
START_TIMEOUT_S = 60.0  # a writer child's imports take seconds on a busy 2-core machine


@pytest.fixture(params=["sqlite", "postgresql"])
def crash_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of its own; each kdguard started on it migrates it first."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'crash.db'}"
        return
    with scratch_postgres() as url:
        yield url


def kill(server: KdguardProcess, child: int | None) -> None:
    """SIGKILL the server and, if given, its writer child right after: no clean-up runs.
    The server goes first: a server that outlived its child would insert the flush itself."""
    os.kill(server.pid, signal.SIGKILL)
    if child is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    server.kill()


async def writer_started(child: int) -> None:
    """Wait for the writer child's imports (seconds on a busy machine) before traffic
    competes with them; it ignores SIGTERM from then on and says READY right after."""
    await wait_until(
        lambda: ignores_sigterm(child), timeout_s=START_TIMEOUT_S, what="the writer process"
    )


async def flushes_go_to_writer(probe: httpx.AsyncClient) -> None:
    """Wait for two flushes: the first one after READY reads it, and from then on every
    flush goes to the child (until then the server inserts them itself, and a kill of the
    server alone would take them with it)."""
    await asyncio.sleep(0.1)
    last, moves = written(await scrape(probe)), 0
    deadline = time.monotonic() + 20
    while moves < 2:
        assert time.monotonic() < deadline, "the writer wrote nothing for 20 s under load"
        await asyncio.sleep(0.02)
        now = written(await scrape(probe))
        moves, last = moves + (now > last), now


# -- SIGKILL during a flush --------------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    mode: str  # "locked": the flush waits on the lock; "released": just let go; "load"
    with_writer: bool  # the writer child is killed too


# Three restarts per database (each start costs seconds of imports on two cores). Let go,
# SQLite's busy handler sleeps before it tries again, so the kill still finds the flush
# waiting: "released" is "locked" there. On PostgreSQL the flush goes on at once, and the
# kill races its COPY and commit.
KILLS = {
    "sqlite": (
        Kill("locked", with_writer=True),
        Kill("locked", with_writer=False),
        Kill("load", with_writer=True),
    ),
    "postgresql": (
        Kill("released", with_writer=True),
        Kill("locked", with_writer=False),
        Kill("load", with_writer=True),
    ),
}


@dataclass(frozen=True)
class Round:
    kill: Kill
    answered: set[str]  # request ids of predictions answered 200
    unanswered: int  # predictions the kill cut off
    answered_after_scrape: int  # answered after the last scrape was sent
    written_before_kill: float  # kdguard_records_written_total at the last scrape
    dropped_before_kill: float  # kdguard_records_dropped_total, all reasons
    rows_added: int


async def crash_round(server: KdguardProcess, url: str, spec: Kill, ledger: Ledger) -> Round:
    """Predictions and labels, then a kill while a flush is under way; the round's figures."""
    blocker = FlushBlocker(url)
    rows_before = await asyncio.to_thread(count_predictions, url)
    child = writer_child(server.pid)
    assert child is not None, f"no writer process: {server.describe()}"
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=10.0) as http,
        httpx.AsyncClient(base_url=server.url, timeout=5.0) as probe,
    ):
        await ledger.resolve(http)
        await writer_started(child)
        async with Load(http, predictors=3, labellers=2, ledger=ledger, max_seconds=60) as load:
            await flushes_go_to_writer(probe)
            await wait_until(lambda: len(load.ok()) >= 100, timeout_s=30, what="traffic")
            try:
                if spec.mode == "load":
                    metrics, scraped_at = await flush_just_committed(probe)
                else:
                    await asyncio.to_thread(blocker.hold)
                    metrics, scraped_at = await blocked_flush(probe, load, blocker)
                if spec.mode == "released":
                    blocker.release()
                kill(server, child if spec.with_writer else None)
            finally:
                await asyncio.to_thread(blocker.release)
    # A writer left alone finishes its flush, finds the pipe closed and exits.
    await wait_until(lambda: gone(child), timeout_s=15, what="the writer process to exit")
    rows_after = await asyncio.to_thread(count_predictions, url)
    return Round(
        kill=spec,
        answered=load.answered_ids(),
        unanswered=sum(1 for a in load.answers if a.status == -1),
        answered_after_scrape=len(load.ok(since=scraped_at)),
        written_before_kill=written(metrics),
        dropped_before_kill=dropped(metrics),
        rows_added=rows_after - rows_before,
    )


async def timed_scrape(probe: httpx.AsyncClient) -> tuple[Metrics, float]:
    """A scrape and when it was sent: a record made after the server read its counters
    belongs to a prediction answered after that moment."""
    sent = time.monotonic()
    return await scrape(probe), sent


async def flush_just_committed(probe: httpx.AsyncClient) -> tuple[Metrics, float]:
    """A scrape right after `kdguard_records_written_total` moved: under this load the
    writer wakes again within `flush_interval_s` with the next rows."""
    before = written(await scrape(probe))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        metrics, sent = await timed_scrape(probe)
        if written(metrics) > before:
            return metrics, sent
        await asyncio.sleep(0.005)
    raise AssertionError("the writer wrote nothing for 20 s under load")


async def blocked_flush(
    probe: httpx.AsyncClient, load: Load, blocker: FlushBlocker
) -> tuple[Metrics, float]:
    """Wait until a flush is stuck on the lock and the queue fills behind it (past the
    bound, records are dropped and counted); a scrape taken just then."""
    held_at = time.monotonic()
    await wait_until(blocker.writer_waits, timeout_s=10, what="the writer to wait on the lock")
    await asyncio.sleep(0.2)  # the server counts a flush just after it committed
    stalled = written(await scrape(probe))
    answered = len(load.ok())
    await wait_until(lambda: len(load.ok()) > answered, timeout_s=10, what="traffic")
    await asyncio.sleep(0.3)  # six flush intervals: a writer not held up would have written
    metrics, sent = await timed_scrape(probe)
    assert written(metrics) == stalled, "the writer wrote past the lock"
    # Well within SQLite's 5 s busy timeout, so the flush is still waiting at the kill.
    while dropped(metrics) == 0 and time.monotonic() - held_at < 1.5:
        await asyncio.sleep(0.05)
        metrics, sent = await timed_scrape(probe)
    return metrics, sent


async def repost_acknowledged(http: httpx.AsyncClient, ledger: Ledger) -> int:
    """Send every acknowledged label again; how many were stored anew (should be none)."""
    accepted = 0
    for chunk in chunks(list(ledger.acknowledged.items()), 200):
        result = await ledger.post(http, dict(chunk))
        assert result["status"] == 200, result
        accepted += result["accepted"]
    return accepted


def report_kills(url: str, rounds: list[Round], ids: set[str], ledger: Ledger, again: int) -> None:
    print(f"\nSIGKILL on {make_url(url).get_backend_name()}: queue bound {QUEUE_ROWS} rows")
    for r in rounds:
        print(
            f"  {r.kill.mode:>8} {'+ writer' if r.kill.with_writer else 'alone':>8}: "
            f"answered {len(r.answered)}, cut off {r.unanswered}; before the kill counted "
            f"written {r.written_before_kill:.0f}, dropped {r.dropped_before_kill:.0f}; rows "
            f"added {r.rows_added}; lost {len(r.answered - ids)} (at most {QUEUE_ROWS} held "
            f"+ {r.dropped_before_kill:.0f} dropped + {r.answered_after_scrape} answered after "
            "the last scrape)"
        )
    print(
        f"  labels: sent {len(ledger.assigned)}, acknowledged {len(ledger.acknowledged)}, "
        f"stored though the kill cut off the answer {ledger.stored_unanswered}, "
        f"stored again when all acknowledged ones were sent again {again}"
    )


async def test_sigkill_during_a_flush_loses_no_acknowledged_label(
    tmp_path: Path, crash_database: str
) -> None:
    url = crash_database
    overrides = {
        "database": {"url": url},
        "recording": {"flush_interval_s": 0.05, "batch_rows": 50, "queue_rows": QUEUE_ROWS},
        "monitoring": {"enabled": False},
        "feedback": {"rate_per_s": 0},  # the last server takes every label again at once
    }
    ledger = Ledger()
    rounds: list[Round] = []
    with fake_teacher(tmp_path / "teacher") as teacher:
        for number, spec in enumerate(KILLS[make_url(url).get_backend_name()]):
            work_dir = tmp_path / f"kdguard-{number}"
            with kdguard_server(work_dir, teacher_url=teacher.url, overrides=overrides) as server:
                rounds.append(await crash_round(server, url, spec, ledger))
        work_dir = tmp_path / "kdguard-after"
        with kdguard_server(work_dir, teacher_url=teacher.url, overrides=overrides) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as http:
                await ledger.resolve(http)
                again = await repost_acknowledged(http, ledger)
    ids, labels, repeated = stored(url)
    report_kills(url, rounds, ids, ledger, again)

    assert not ledger.unexpected, ledger.unexpected
    assert not ledger.unresolved, "a label's fate is still unknown after the last restart"
    assert len(ledger.acknowledged) >= 50, "too few labels to prove anything"
    lost = {rid: v for rid, v in ledger.acknowledged.items() if labels.get(rid) != v}
    assert not lost, f"acknowledged labels lost or changed: {lost}"
    assert labels == ledger.acknowledged, "a label is stored that was never acknowledged"
    assert again == 0, "an acknowledged label was stored a second time"
    assert repeated == 0, "a request id is stored twice"
    for r in rounds:
        lost_rows = len(r.answered - ids)
        # What the writer held at the kill (the bound at most), plus what it had dropped:
        # counted by the last scrape, or at most everything answered after it.
        assert lost_rows <= QUEUE_ROWS + r.dropped_before_kill + r.answered_after_scrape, r
        assert r.rows_added >= r.written_before_kill, f"counted as written, not stored: {r}"
        assert r.rows_added <= len(r.answered) + r.unanswered, f"rows nobody asked for: {r}"
        if r.kill.mode == "locked" and r.kill.with_writer:
            assert lost_rows > 0, f"the kill cut no flush short: {r}"
        if r.kill.mode == "locked" and not r.kill.with_writer:
            assert r.rows_added > r.written_before_kill, f"the orphaned flush is lost: {r}"


# -- SIGTERM under load ------------------------------------------------------------------

GRACE_S = 6.0
TEACHER_DELAY_S = 1.5  # low-confidence requests wait this long: in flight at the signal
# A request that reaches an idle keep-alive connection in the instant uvicorn closes it was
# never read by the server: only requests sent this long before the signal count as its.
IN_FLIGHT_MARGIN_S = 0.05


async def listener_closed(port: int, timeout_s: float) -> float:
    """Connect again and again until the port refuses; when it first did."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            return time.monotonic()
        writer.close()
        await writer.wait_closed()
        if time.monotonic() > deadline:
            raise AssertionError(f"port {port} still accepts {timeout_s}s after SIGTERM")
        await asyncio.sleep(0.01)


async def test_sigterm_under_load_finishes_in_flight_requests_and_flushes(
    tmp_path: Path, crash_database: str
) -> None:
    url = crash_database
    overrides = {
        "database": {"url": url},
        "server": {"shutdown_grace_s": GRACE_S},
        "teacher": {"deadline_s": 3 * TEACHER_DELAY_S, "max_concurrency": 16},
        # Nothing is flushed before the signal: every row must come from the shutdown flush.
        "recording": {"flush_interval_s": 600.0, "batch_rows": 100_000},
        "monitoring": {"enabled": False},
    }
    work_dir = tmp_path / "kdguard"
    with (
        fake_teacher(tmp_path / "teacher") as teacher,
        kdguard_server(work_dir, teacher_url=teacher.url, overrides=overrides) as server,
    ):
        teacher.control("slow", TEACHER_DELAY_S)
        child = writer_child(server.pid)
        assert child is not None, f"no writer process: {server.describe()}"
        await writer_started(child)
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=10.0) as http,
            httpx.AsyncClient(base_url=server.url, timeout=5.0) as probe,
            Load(http, predictors=8, confident=2, max_seconds=60) as load,
        ):
            await wait_until(
                lambda: (
                    len(load.ok()) >= 200
                    and load.waiting_low(older_than_s=0.1, younger_than_s=0.5) >= 3
                ),
                timeout_s=20,
                what="requests waiting on the teacher",
            )
            metrics = await scrape(probe)
            server.killed = True  # on purpose: it is meant to exit now
            signalled = time.monotonic()
            server.proc.terminate()
            os.kill(child, signal.SIGTERM)  # a service manager stops the whole group
            refused_at = await listener_closed(server.port, timeout_s=GRACE_S)
            exit_code = await asyncio.to_thread(server.proc.wait, 3 * GRACE_S)
            exited_s = time.monotonic() - signalled
    ids, _, _ = stored(url)

    def since(moment: float) -> float:
        return moment - signalled

    pending = [a for a in load.answers if a.sent < signalled < a.received]
    in_flight = [a for a in pending if a.sent < signalled - IN_FLIGHT_MARGIN_S]
    just_sent = [a for a in pending if a.sent >= signalled - IN_FLIGHT_MARGIN_S]
    after = [a for a in load.answers if a.sent >= signalled]
    answered = load.answered_ids()
    print(
        f"\nSIGTERM on {make_url(url).get_backend_name()}: {len(in_flight)} requests in flight "
        f"({sum(a.low for a in in_flight)} waiting on the teacher), statuses "
        f"{sorted(a.status for a in in_flight)}; {len(just_sent)} sent in the last "
        f"{IN_FLIGHT_MARGIN_S * 1000:.0f} ms, statuses {sorted(a.status for a in just_sent)}; "
        f"listener closed after {since(refused_at):.3f}s; last in-flight answer after "
        f"{max((since(a.received) for a in in_flight), default=0.0):.3f}s; exit {exit_code} "
        f"after {exited_s:.2f}s (grace {GRACE_S:.0f}s); sent after the signal {len(after)} "
        f"({sum(a.status == 200 for a in after)} answered, "
        f"{sum(a.status == -1 for a in after)} refused); rows for "
        f"{len(answered & ids)}/{len(answered)} answered predictions; written before the "
        f"signal {written(metrics):.0f}"
    )
    assert not [a for a in in_flight if a.status != 200], in_flight
    assert sum(a.low for a in in_flight) >= 3, "too few requests were in flight at the signal"
    assert refused_at < max(a.received for a in in_flight), "accepting while it drained"
    assert all(a.status in (200, -1) for a in just_sent + after), just_sent + after
    assert exit_code == 0, server.describe()
    assert exited_s <= GRACE_S, f"took {exited_s:.2f}s to exit; grace {GRACE_S}s"
    assert (written(metrics), dropped(metrics)) == (0, 0)
    assert "prediction records at shutdown" not in server.output(), server.output()
    # The writer child ignored its SIGTERM and wrote the last flush itself.
    assert "writer process" not in server.output(), server.output()
    assert answered <= ids, f"{len(answered - ids)} answered predictions were never written"
