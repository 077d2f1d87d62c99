"""The write-behind prediction writer: the request path never waits for the database.

`record()` (on the event loop) appends a batch to a bounded queue, or drops it and counts
why. A writer thread wakes every `flush_interval_s` (or when `batch_rows` are waiting),
gathers the batches into columns and has them inserted in one transaction. If the
database is down the batches stay queued (up to the bound) and the thread retries with
backoff; it resumes by itself. `close()` flushes what is left, within a time limit.

Where the insert runs (`recording.writer_process`): by default in a child process
(`service.persistence.writer_process`), which gets each flush as one pickled frame over a
pipe and answers when it is committed. The serving process then only gathers and pickles:
row building, the driver and every database round trip happen under another process's
GIL. A writer thread that did them here had to win the GIL back from the busy event loop
after each round trip and each large numpy call, hundreds of times a second, and each
time the event loop stalled (measured: ~0.75x throughput with recording on). Otherwise,
or for an in-memory SQLite database, the writer thread inserts itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import pickle  # frames to and from the writer child we start  # nosec B403
import subprocess  # starts that child  # nosec B404
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from select import select as readable
from typing import IO, Any, Protocol

import numpy as np
import psycopg
from prometheus_client import Counter
from sqlalchemy import Connection, Engine, Table, delete, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from service.monitoring.instruments import Instruments
from service.monitoring.records import PredictionBatch
from service.persistence.database import is_postgres
from service.persistence.rows import Gathered, Rows, gather, input_rows, merge, prediction_rows
from service.persistence.sums import add_sums, prediction_sums
from service.persistence.tables import EntropySums, PredictionInput, PredictionSums
from service.settings import RecordingSettings

log = logging.getLogger(__name__)


class PredictionWriter:
    def __init__(
        self, engine: Engine, *, settings: RecordingSettings, instruments: Instruments, model: str
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._queue: deque[PredictionBatch] = deque()
        self._queued_rows = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._drained = threading.Condition(self._lock)
        self._stopping = False
        self._flush_waiters = 0
        self._database_up = True
        self._thread = threading.Thread(target=self._run, name="kdguard-writer", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dropped: dict[str, Counter] = {
            r: instruments.records_dropped.labels(model, r)
            for r in ("queue_full", "database_down", "shutdown")
        }
        self._written = instruments.records_written.labels(model)
        self._queue_gauge = instruments.writer_queue_rows.labels(model)
        self._up_gauge = instruments.database_up.labels(model)
        self._flush_seconds = instruments.writer_flush_seconds.labels(model)
        self._sink: Sink = (
            ProcessSink(engine, settings)
            if settings.writer_process and not _in_memory(engine)
            else Inserter(engine, settings)
        )

    def start(self, wait_s: float = 0.0) -> None:
        """Start writing; wait up to `wait_s` for the writer process to be ready.

        Started on an event loop (the server's lifespan), the writer has that loop gather
        each flush and free its batches, between requests: a few C-level passes over the
        batches. Done by the writer thread, the same work made the thread and the busy
        loop trade the GIL back and forth dozens of times per flush.
        """
        with contextlib.suppress(RuntimeError):  # no running loop: the thread gathers
            self._loop = asyncio.get_running_loop()
        self._up_gauge.set(1)
        self._sink.start(wait_s)
        self._thread.start()

    # -- the event loop side -------------------------------------------------------------

    def record(self, batch: PredictionBatch) -> None:
        rows = len(batch)
        with self._lock:
            if self._stopping or self._queued_rows + rows > self._settings.queue_rows:
                reason = "shutdown" if self._stopping else (
                    "queue_full" if self._database_up else "database_down"
                )  # fmt: skip
                self._dropped[reason].inc(rows)
                return
            self._queue.append(batch)
            self._queued_rows += rows
            if self._queued_rows >= self._settings.batch_rows:
                self._wake.set()

    # -- control -------------------------------------------------------------------------

    def flush(self, timeout: float) -> bool:
        """Ask for an immediate write and wait until the queue is empty (True) or timeout."""
        deadline = time.monotonic() + timeout
        with self._drained:
            self._flush_waiters += 1
            self._wake.set()
            try:
                while self._queued_rows:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._drained.wait(left)
            finally:
                self._flush_waiters -= 1
        return True

    def close(self, timeout: float) -> None:
        """Flush what is queued (within `timeout`), stop, count anything left as dropped."""
        self.flush(timeout)
        with self._lock:
            self._stopping = True
            left = self._queued_rows
            self._queue.clear()
            self._queued_rows = 0
        if left:
            self._dropped["shutdown"].inc(left)
            log.warning("dropped %d prediction records at shutdown", left)
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        self._sink.close(force=self._thread.is_alive())

    @property
    def database_up(self) -> bool:
        return self._database_up

    # -- the writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        backoff = self._settings.retry_backoff_s
        while not self._stopping:
            self._wake.wait(self._settings.flush_interval_s)
            self._wake.clear()
            if self._drain():
                backoff = self._settings.retry_backoff_s
                continue
            # The database refused: keep the rows, wait, try again (interruptible).
            self._wake.wait(backoff)
            backoff = min(backoff * 2, self._settings.retry_backoff_max_s)

    def _drain(self) -> bool:
        """Write a batch, and more only while a full one waits (or someone waits on flush):
        chasing every few new rows would turn one large transaction into many small ones,
        each paying its own round trips and commit. False if the database failed."""
        while True:
            taken, rows = self._take()
            if not taken:
                return True
            try:
                written = self._write(taken)
            except Exception:  # the thread must outlive any bug: keep the rows, retry later
                log.exception("prediction writer failed unexpectedly; records stay queued")
                written = False
            if not written:
                self._put_back(taken)
                return False
            self._on_loop(taken.clear)  # free the batches where they were made
            del taken
            with self._drained:
                self._queued_rows = max(self._queued_rows - rows, 0)  # close() may have cleared
                self._queue_gauge.set(self._queued_rows)
                self._drained.notify_all()
                more = self._queued_rows >= self._settings.batch_rows or (
                    self._flush_waiters > 0 and self._queued_rows > 0
                )
            if not more:
                return True

    def _take(self) -> tuple[list[PredictionBatch], int]:
        """Up to `batch_rows` rows from the queue, and their count. `record()` waits on the
        lock meanwhile, so the usual case (everything fits) takes the queue whole."""
        with self._lock:
            if self._queued_rows <= self._settings.batch_rows:
                taken = list(self._queue)
                self._queue.clear()
                return taken, self._queued_rows
            taken, rows = [], 0
            while self._queue and rows < self._settings.batch_rows:
                batch = self._queue.popleft()
                taken.append(batch)
                rows += len(batch)
        return taken, rows

    def _put_back(self, taken: list[PredictionBatch]) -> None:
        with self._lock:
            self._queue.extendleft(reversed(taken))
            # Set here too, not only after a write: while the database is down this is
            # the only place the gauge can show the queue filling up towards its bound.
            self._queue_gauge.set(self._queued_rows)

    def _write(self, batches: list[PredictionBatch]) -> bool:
        started = time.perf_counter()
        # In parts: on the event loop, each part is one short pause between requests.
        rows = [
            self._gather(batches[i : i + _GATHER_BATCHES])
            for i in range(0, len(batches), _GATHER_BATCHES)
        ]
        failure = self._sink.write(rows)
        if failure is not None:
            if self._database_up:
                log.warning("database write failed, records stay queued: %s", failure)
            self._set_up(False)
            return False
        self._set_up(True)
        self._written.inc(sum(map(len, rows)))
        self._flush_seconds.observe(time.perf_counter() - started)
        return True

    def _gather(self, batches: list[PredictionBatch]) -> Gathered:
        """`gather(batches)`, run on the event loop when there is one (see `start`)."""
        done: concurrent.futures.Future[Gathered] = concurrent.futures.Future()

        def run() -> None:
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(gather(batches))
                except BaseException as exc:  # handed to the writer thread, which logs it
                    done.set_exception(exc)

        if not self._on_loop(run):
            return gather(batches)
        try:
            return done.result(timeout=_LOOP_WAIT_S)
        except concurrent.futures.TimeoutError:
            if done.cancel():  # the loop is stuck or stopping: do it here
                return gather(batches)
            return done.result()  # it is running on the loop right now

    def _on_loop(self, callback: Callable[[], object]) -> bool:
        """Schedule `callback` on the event loop; False if there is no loop to run it."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return False
        try:
            loop.call_soon_threadsafe(callback)
        except RuntimeError:  # closed in the meantime
            return False
        return True

    def _set_up(self, up: bool) -> None:
        if up != self._database_up:
            log.warning("database is %s", "back" if up else "unreachable")
        self._database_up = up
        self._up_gauge.set(1 if up else 0)


class Sink(Protocol):
    def start(self, wait_s: float) -> None: ...

    def write(self, rows: list[Gathered]) -> str | None:
        """Insert the rows in one transaction: None, or why the database refused them."""
        ...

    def close(self, *, force: bool = False) -> None: ...


class Inserter:
    """Inserts gathered rows and adds their share to the window sums, in one transaction.

    The fast path inserts every row (binary COPY into PostgreSQL, multi-row INSERT into
    SQLite) and fails whole on a request id already stored; the flush is then inserted
    again skipping duplicates, and only the rows that went in are added to the sums.
    """

    def __init__(self, engine: Engine, settings: RecordingSettings) -> None:
        self._engine = engine
        self._retention = settings.input_retention_rows
        self._bucket_s = settings.bucket_s
        self._insert = _insert_ignoring_duplicates(engine)
        self._postgres = is_postgres(engine)
        self._since_prune = 0

    def write(self, rows: list[Gathered]) -> str | None:
        # One set of rows per flush: building them costs per column, not only per row.
        flush = merge(rows)
        predictions, inputs = prediction_rows(flush), input_rows(flush)
        try:
            try:
                self._insert_all(predictions, inputs, fast=True)
            except IntegrityError:
                # COPY cannot skip a duplicate client-supplied request id; INSERT can.
                self._insert_all(predictions, inputs, fast=False)
        except SQLAlchemyError as exc:
            return exc.__class__.__name__
        return None

    def start(self, wait_s: float) -> None:
        return None

    def close(self, *, force: bool = False) -> None:
        return None

    def _insert_all(self, predictions: Rows, inputs: Rows, *, fast: bool) -> None:
        with self._engine.begin() as connection:
            inserted = self._insert_rows(connection, predictions, fast=fast)
            self._insert_rows(connection, inputs, fast=fast)
            by_decile, by_entropy = prediction_sums(inserted, self._bucket_s)
            add_sums(connection, PredictionSums, by_decile)
            add_sums(connection, EntropySums, by_entropy)
            self._prune_inputs(connection, len(inputs))

    def _insert_rows(self, connection: Connection, rows: Rows, *, fast: bool) -> Rows:
        """Insert `rows`; the ones that went in (all of them on the fast path)."""
        if not rows:
            return rows
        if fast:
            if self._postgres:
                _copy(connection, rows.table.name, rows)
            else:
                _sqlite_insert(connection, rows.table.name, rows)
            return rows
        key = rows.table.c.request_id
        new = set(
            connection.execute(self._insert(rows.table).returning(key), rows.dicts()).scalars()
        )
        kept = []  # the first row of each new id (an id twice in one flush went in once)
        for i, request_id in enumerate(rows.request_ids()):
            if request_id in new:
                new.discard(request_id)
                kept.append(i)
        return rows.take(np.asarray(kept, np.intp))

    def _prune_inputs(self, connection: Any, added: int) -> None:
        """Keep at most `input_retention_rows` logged inputs (checked every so often)."""
        self._since_prune += added
        if self._since_prune < max(self._retention // 10, 1):
            return
        self._since_prune = 0
        cutoff = connection.execute(
            select(PredictionInput.created_at)
            .order_by(PredictionInput.created_at.desc())
            .offset(self._retention)
            .limit(1)
        ).scalar()
        if cutoff is not None:
            connection.execute(delete(PredictionInput).where(PredictionInput.created_at < cutoff))


class ProcessSink:
    """Hands each flush to a child process (`python -m service.persistence.writer_process`).

    One request, one answer: the flush's `Gathered` parts, pickled, go down the child's
    stdin in one write; the outcome comes back on its stdout. The writer thread blocks on
    the answer with the GIL released, so a flush costs this process a few GIL round trips
    whatever its size. Until the child says it is ready (its imports take a second or
    more), and after it dies until a new one is, flushes are inserted here instead: records are
    never held back by the child's start-up.
    """

    def __init__(self, engine: Engine, settings: RecordingSettings) -> None:
        self._config = {
            "url": engine.url.render_as_string(hide_password=False),
            "busy_timeout_s": _busy_timeout_s(engine),
            "settings": settings.model_dump(mode="json"),
        }
        self._inline = Inserter(engine, settings)
        self._child: subprocess.Popen[bytes] | None = None
        self._ready = False
        self._started_at = -_RESTART_AFTER_S

    def start(self, wait_s: float) -> None:
        """Start the child now, so its imports overlap the rest of start-up."""
        if self._child is None:
            self._start()
        if wait_s > 0:
            self._ready_child(wait_s)

    def write(self, rows: list[Gathered]) -> str | None:
        child = self._ready_child()
        if child is None:
            return self._inline.write(rows)
        assert child.stdin is not None and child.stdout is not None
        try:
            send(child.stdin, rows)
            # Our own child, over our own pipe: nothing else can write to it.
            answer = pickle.load(child.stdout)  # noqa: S301  # nosec B301
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            # Committed or not, writing again is safe: duplicates are skipped.
            log.warning("prediction writer process is gone (%s)", exc.__class__.__name__)
            self._stop(force=True)
            return self._inline.write(rows)
        if answer is not None and not isinstance(answer, str):
            raise TypeError(f"unexpected answer from the writer process: {answer!r}")
        return answer

    def close(self, *, force: bool = False) -> None:
        self._stop(force=force)

    def _ready_child(self, wait_s: float = 0.0) -> subprocess.Popen[bytes] | None:
        if self._child is None:
            if time.monotonic() - self._started_at < _RESTART_AFTER_S:
                return None  # it keeps dying: not a new process every flush
            self._start()
        child = self._child
        assert child is not None and child.stdout is not None
        if self._ready:
            return child
        if not readable([child.stdout], [], [], wait_s)[0]:
            return None  # still starting
        try:
            hello = pickle.load(child.stdout)  # noqa: S301  # as above  # nosec B301
        except (EOFError, pickle.UnpicklingError):
            hello = None
        if hello != READY:
            log.warning("prediction writer process failed to start (exit %s)", child.poll())
            self._stop(force=True)
            return None
        self._ready = True
        return child

    def _start(self) -> subprocess.Popen[bytes]:
        # No shell; our own interpreter with fixed arguments.
        child = subprocess.Popen(  # nosec B603
            [sys.executable, "-m", "service.persistence.writer_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert child.stdin is not None
        send(child.stdin, self._config)
        self._child, self._ready, self._started_at = child, False, time.monotonic()
        return child

    def _stop(self, *, force: bool) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        ready, self._ready = self._ready, False
        assert child.stdin is not None and child.stdout is not None
        # End of input lets a ready child finish and exit by itself; one still starting has
        # been sent nothing but its config and is simply stopped.
        if ready and not force:
            try:
                child.stdin.close()
                child.wait(timeout=5.0)
            except (OSError, subprocess.TimeoutExpired):
                force = True
        if force or not ready:
            child.kill()
            child.wait()
        for stream in (child.stdin, child.stdout):
            with contextlib.suppress(OSError):  # unsent bytes of a frame to a killed child
                stream.close()


READY = "ready"  # the writer process's first message
_LOOP_WAIT_S = 2.0  # longest wait for the event loop to gather part of a flush
_GATHER_BATCHES = 512  # batches gathered in one go (~1 ms of the event loop's time)
_RESTART_AFTER_S = 1.0


def send(stream: IO[bytes], message: object) -> None:
    """One pickled message in one write (a pipe: the reader's load() gets it whole)."""
    stream.write(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
    stream.flush()


def _in_memory(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite" and make_url(engine.url).database in (
        None,
        "",
        ":memory:",
    )


def _busy_timeout_s(engine: Engine) -> float:
    """SQLite's busy timeout on this engine's connections, for the child's own engine."""
    if engine.dialect.name != "sqlite":
        return 5.0
    with engine.connect() as connection:
        return float(connection.exec_driver_sql("PRAGMA busy_timeout").scalar_one()) / 1000


def _copy(connection: Connection, table: str, rows: Rows) -> None:
    """PostgreSQL binary COPY of a payload built in one go (see `Rows.copy_binary`).

    COPY is several times faster than INSERT for many small rows, and handing psycopg
    one buffer instead of a row at a time keeps the per-row work out of Python.
    """
    columns = ", ".join(rows.names)
    driver = connection.connection.driver_connection
    assert driver is not None
    statement = f"COPY {table} ({columns}) FROM STDIN (FORMAT BINARY)"
    payload = rows.copy_binary()
    try:
        with driver.cursor() as cursor, cursor.copy(statement) as copy:
            copy.write(payload)
    except psycopg.errors.IntegrityError as exc:  # the raw driver's errors are not wrapped
        raise IntegrityError(statement, None, exc) from exc
    except psycopg.Error as exc:
        raise OperationalError(statement, None, exc) from exc


def _sqlite_insert(connection: Connection, table: str, rows: Rows) -> None:
    """Multi-row INSERT, a few hundred rows per statement.

    The sqlite3 module releases the GIL around every statement step; with executemany
    that is once per row, and each time the writer must win the GIL back from a busy
    event loop. One statement per chunk pays that once per chunk (measured under load:
    ~3,000 rows/s with executemany, the queue growing until it dropped).
    """
    width = len(rows.names)
    columns = ", ".join(rows.names)
    one_row = "(" + ", ".join("?" * width) + ")"
    values = rows.flat()
    start = 0
    for count in _chunks(len(rows), max(1, _SQLITE_MAX_VARIABLES // width)):
        placeholders = ", ".join([one_row] * count)
        # Names from our own table definitions; every value is a bound parameter.
        statement = f"INSERT INTO {table} ({columns}) VALUES {placeholders}"  # noqa: S608  # nosec B608
        chunk = values[start * width : (start + count) * width]
        connection.exec_driver_sql(statement, tuple(chunk))
        start += count


def _chunks(rows: int, most: int) -> list[int]:
    """Statement sizes for `rows` rows: full ones of `most` rows, then the rest in powers
    of two, largest first.

    The sqlite3 module keeps the last 128 distinct statements prepared, and one of a few
    hundred rows is a large program: a new size every flush grew the writer's memory by
    megabytes a minute until the cache was full of them. Powers of two keep it to a
    dozen statements, each prepared once and then reused.
    """
    sizes = [most] * (rows // most)
    rest = rows % most
    sizes += [1 << bit for bit in range(rest.bit_length() - 1, -1, -1) if rest >> bit & 1]
    return sizes


_SQLITE_MAX_VARIABLES = 32_766  # SQLITE_MAX_VARIABLE_NUMBER since SQLite 3.32


def _insert_ignoring_duplicates(engine: Engine) -> Callable[[Table], Any]:
    """INSERT ... ON CONFLICT DO NOTHING: a client-supplied request id seen twice is kept once."""
    from sqlalchemy.dialects import postgresql, sqlite

    dialect_insert: Any = postgresql.insert if is_postgres(engine) else sqlite.insert

    def build(table: Table) -> Any:
        return dialect_insert(table).on_conflict_do_nothing()

    return build
