"""The write-behind writer on SQLite and PostgreSQL: rows, bounds, outages, shutdown."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, func, select, text

from service.monitoring.instruments import build_instruments
from service.monitoring.records import PredictionBatch, TeacherOutcome
from service.persistence.database import is_postgres, make_engine
from service.persistence.rows import decode_probs
from service.persistence.tables import Prediction, PredictionInput
from service.persistence.writer import PredictionWriter, _chunks
from service.settings import RecordingSettings

_counter = iter(range(10**9))


def batch(n: int = 1, *, teacher: bool = False, inputs: bool = False) -> PredictionBatch:
    probs = np.tile(np.array([0.75, 0.125, 0.125], np.float32), (n, 1))
    q = np.tile(np.array([0.125, 0.75, 0.125], np.float32), (n, 1)) if teacher else None
    outcome = TeacherOutcome.SHADOW if teacher else TeacherOutcome.NOT_ASKED
    return PredictionBatch(
        model="tiny", student_version="1", teacher_version="t1", routing_key=None,
        created_at=time.time(), request_ids=[f"r{next(_counter)}" for _ in range(n)],
        student_probs=probs, teacher_probs=q, teacher_outcome=[outcome] * n, teacher_error=None,
        entropy=np.full(n, 0.5, np.float32), shadow_rate=0.1, fallback_threshold=0.6,
        student_temperature=1.0,
        student_seconds=1e-4,
        teacher_seconds=2e-3 if teacher else None, total_seconds=2e-4,
        inputs=np.ones((n, 4), np.float32) if inputs else None,
    )  # fmt: skip


@pytest.fixture(params=[True, False], ids=["process", "thread"])
def writer_process(request: pytest.FixtureRequest) -> bool:
    """Every writer test runs with inserts in a child process and in the writer thread."""
    return bool(request.param)


class Harness:
    def __init__(self, engine: Engine, writer_process: bool, **settings: object) -> None:
        self.metrics = CollectorRegistry()
        config = RecordingSettings.model_validate(
            {
                "flush_interval_s": 0.02,
                "retry_backoff_s": 0.05,
                "writer_process": writer_process,
                **settings,
            }
        )
        self.writer = PredictionWriter(
            engine, settings=config, instruments=build_instruments(self.metrics), model="tiny"
        )
        self.engine = engine
        self.writer_process = writer_process

    def start(self) -> None:
        """Start the writer; with a writer process, once it is ready to take the flushes."""
        self.writer.start(wait_s=60.0 if self.writer_process else 0.0)
        if self.writer_process:
            assert self.writer._sink._ready  # type: ignore[attr-defined]

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.get_sample_value(name, {"model": "tiny", **labels}) or 0.0

    def count(self, table: type[Prediction] | type[PredictionInput] = Prediction) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(table)).scalar_one())


def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_batches_become_rows_with_their_bins_and_teacher_columns(
    database: Engine, writer_process: bool
) -> None:
    h = Harness(database, writer_process)
    h.start()
    h.writer.record(batch(3, teacher=True, inputs=True))
    h.writer.record(batch(2))
    assert h.writer.flush(10.0)
    with database.connect() as connection:
        rows = connection.execute(select(Prediction).order_by(Prediction.created_at)).all()
    assert len(rows) == 5 and h.count(PredictionInput) == 3
    first, last = rows[0], rows[-1]
    assert first.student_label == 0 and first.conf_bin == 11 and first.conf_fine == 750
    assert first.teacher_label == 1 and first.teacher_p_student == pytest.approx(0.125, abs=1e-6)
    assert first.total_variation == pytest.approx(0.625, abs=1e-6)
    expected_kl = 0.125 * np.log(0.125 / 0.75) + 0.75 * np.log(0.75 / 0.125)
    assert first.kl_teacher_student == pytest.approx(expected_kl, abs=1e-5)
    assert decode_probs(first.student_probs).tolist() == [0.75, 0.125, 0.125]
    assert last.teacher_label is None and last.teacher_probs is None
    assert h.sample("kdguard_records_written_total") == 5
    h.writer.close(5.0)


def test_the_queue_is_bounded_and_drops_are_counted(database: Engine, writer_process: bool) -> None:
    h = Harness(database, writer_process, queue_rows=10)  # not started: nothing drains the queue
    for _ in range(4):
        h.writer.record(batch(3))
    assert h.sample("kdguard_records_dropped_total", reason="queue_full") == 3
    h.start()
    h.writer.close(5.0)  # close flushes what was queued
    assert h.count() == 9


@contextmanager
def outage(engine: Engine) -> Iterator[None]:
    """Make the database refuse writes for real, then bring it back."""
    if is_postgres(engine):
        name = engine.url.database
        admin = make_engine(
            engine.url.set(database="postgres").render_as_string(hide_password=False)
        )
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
            c.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name},
            )
            try:
                yield
            finally:
                c.execute(text(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
        admin.dispose()
        return
    locker = make_engine(engine.url.render_as_string(hide_password=False))
    with locker.connect() as c:
        c.exec_driver_sql("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            c.exec_driver_sql("ROLLBACK")
    locker.dispose()


def test_a_database_outage_buffers_then_drops_and_recovers_by_itself(
    database_url: str, writer_process: bool
) -> None:
    engine = make_engine(database_url, busy_timeout_s=0.1)
    h = Harness(engine, writer_process, queue_rows=20)
    h.start()
    h.writer.record(batch(1))
    assert h.writer.flush(10.0)
    with outage(engine):
        for _ in range(5):
            h.writer.record(batch(3))
        wait_for(lambda: h.sample("kdguard_database_up") == 0)
        for _ in range(5):
            h.writer.record(batch(3))
        # 30 rows offered while down, the queue holds 20: six batches of 3 fit, four do not.
        assert h.sample("kdguard_records_dropped_total", reason="database_down") == 12
        # The gauge shows the queue filling while nothing can be written (a failed retry).
        wait_for(lambda: h.sample("kdguard_writer_queue_rows") == 18)
    wait_for(lambda: h.count() == 1 + 18 and h.sample("kdguard_database_up") == 1)
    h.writer.close(5.0)
    engine.dispose()


def test_duplicate_client_request_ids_are_kept_once(database: Engine, writer_process: bool) -> None:
    h = Harness(database, writer_process)
    h.start()
    b = batch(2)
    h.writer.record(b)
    h.writer.record(b)
    assert h.writer.flush(10.0)
    assert h.count() == 2
    h.writer.close(5.0)


def test_input_retention_keeps_the_newest(database: Engine, writer_process: bool) -> None:
    h = Harness(database, writer_process, input_retention_rows=10)
    h.start()
    for _ in range(8):
        h.writer.record(batch(3, inputs=True))
        assert h.writer.flush(10.0)
    assert 10 <= h.count(PredictionInput) <= 13  # pruned every retention/10 inserted rows
    h.writer.close(5.0)


def test_strings_nulls_and_mixed_batches_read_back_as_their_records(
    database: Engine, writer_process: bool
) -> None:
    """Whatever the mix in one flush, each stored row says what `PredictionBatch.rows()` says."""
    probs = np.array([[0.5, 0.25, 0.25], [0.125, 0.625, 0.25], [0.25, 0.25, 0.5]], np.float32)
    q = np.array([[0.25, 0.5, 0.25], [np.nan] * 3, [0.125, 0.125, 0.75]], np.float32)
    mixed = batch(3, inputs=True)
    mixed.request_ids = ["a", "ключ-" + "x" * 100, "b" * 128]
    mixed.routing_key = "région/東京"
    mixed.student_probs, mixed.teacher_probs = probs, q
    asked, not_asked = TeacherOutcome.FALLBACK, TeacherOutcome.NOT_ASKED
    mixed.teacher_outcome = [asked, not_asked, asked]
    mixed.teacher_seconds = 3e-3
    failed = batch(2)
    failed.teacher_outcome = [TeacherOutcome.FALLBACK_FAILED] * 2
    failed.teacher_error, failed.teacher_version = "timeout", None
    plain = batch(1, teacher=True)
    h = Harness(database, writer_process)
    h.start()
    for b in (mixed, failed, plain):
        h.writer.record(b)
    assert h.writer.flush(30.0)
    h.writer.close(5.0)
    expected = {r.request_id: r for b in (mixed, failed, plain) for r in b.rows()}
    with database.connect() as connection:
        stored = {r.request_id: r for r in connection.execute(select(Prediction)).all()}
        logged = connection.execute(select(PredictionInput.request_id)).scalars().all()
    assert stored.keys() == expected.keys() and sorted(logged) == sorted(mixed.request_ids)
    for rid, record in expected.items():
        row = stored[rid]
        assert (row.model, row.student_version, row.teacher_version, row.routing_key) == (
            record.model, record.student_version, record.teacher_version, record.routing_key,
        )  # fmt: skip
        assert row.served_by_teacher == (record.served_by == "teacher")
        assert (row.degraded, row.teacher_outcome) == (record.degraded, record.teacher_outcome)
        assert row.teacher_error == record.teacher_error
        assert row.student_label == record.student_label
        assert row.teacher_label == record.teacher_label
        assert row.confidence == pytest.approx(record.confidence)
        assert row.entropy == pytest.approx(record.entropy)
        assert row.inclusion_probability == pytest.approx(record.inclusion_probability)
        assert row.student_temperature == record.student_temperature
        assert row.teacher_seconds == record.teacher_seconds
        assert row.total_seconds == pytest.approx(record.total_seconds)
        assert decode_probs(row.student_probs) == pytest.approx(record.student_probs)
        if record.teacher_probs is None:
            assert row.teacher_probs is None and row.total_variation is None
        else:
            assert decode_probs(row.teacher_probs) == pytest.approx(record.teacher_probs)
            tv = 0.5 * np.abs(record.student_probs - record.teacher_probs).sum()
            assert row.total_variation == pytest.approx(tv, abs=1e-6)


def test_a_writer_process_that_dies_is_replaced_and_loses_nothing(database: Engine) -> None:
    h = Harness(database, True)
    sink: Any = h.writer._sink  # the process under test
    h.start()

    def child_ready() -> bool:
        h.writer.record(batch(1))
        assert h.writer.flush(30.0)  # written in-process until the child is ready
        return bool(sink._ready)

    wait_for(child_ready, 60.0)
    child = sink._child
    assert child is not None and child.poll() is None
    child.kill()
    child.wait()
    before = h.count()
    for _ in range(3):
        h.writer.record(batch(2))
    assert h.writer.flush(30.0)
    assert h.count() == before + 6 == h.sample("kdguard_records_written_total")
    assert h.sample("kdguard_database_up") == 1  # the child died, not the database
    wait_for(child_ready, 60.0)
    replacement = sink._child
    assert replacement is not None and replacement.pid != child.pid
    h.writer.close(5.0)
    assert replacement.poll() is not None  # closing the writer ends its process


async def test_started_on_an_event_loop_the_loop_gathers_and_a_blocked_loop_cannot_stall_it(
    database: Engine, writer_process: bool
) -> None:
    h = Harness(database, writer_process)
    h.start()  # on this test's event loop: flushes are gathered there
    for _ in range(3):
        h.writer.record(batch(2, teacher=True))
    assert await asyncio.to_thread(h.writer.flush, 30.0)  # the loop is free to gather
    assert h.count() == 6
    h.writer.record(batch(1))
    started = time.monotonic()
    assert h.writer.flush(30.0)  # blocks the loop itself: the thread gathers after a wait
    assert h.count() == 7 and time.monotonic() - started < 15.0
    await asyncio.to_thread(h.writer.close, 5.0)


@pytest.mark.parametrize("niceness", [0, 7])
def test_the_writer_process_yields_the_cpu_to_the_server(database: Engine, niceness: int) -> None:
    h = Harness(database, True, writer_niceness=niceness)
    h.start()
    child: Any = h.writer._sink._child  # type: ignore[attr-defined]
    try:
        fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        # Field 19 of stat is the nice value; `os.sched_getscheduler` reads the class.
        assert int(fields[16]) - os.getpriority(os.PRIO_PROCESS, 0) == niceness
        batch_class = os.sched_getscheduler(child.pid) == os.SCHED_BATCH
        assert batch_class == (niceness > 0)
        h.writer.record(batch(3))
        assert h.writer.flush(30.0)
        assert h.count() == 3
    finally:
        h.writer.close(5.0)


def test_sqlite_statements_come_in_a_few_sizes() -> None:
    """Every flush size maps onto the same dozen statement sizes (prepared once each)."""
    most = 1000
    seen: set[int] = set()
    for rows in range(0, 20_000, 7):
        sizes = _chunks(rows, most)
        assert sum(sizes) == rows and all(0 < s <= most for s in sizes)
        assert sizes == sorted(sizes, reverse=True)
        seen.update(sizes)
    assert seen == {most} | {1 << b for b in range(10)}  # 1000 and 1, 2, 4, ..., 512
