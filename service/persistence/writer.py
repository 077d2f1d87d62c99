"""The write-behind prediction writer: the request path never waits for the database.

`record()` (on the event loop) appends a batch to a bounded queue, or drops it and counts
why. A writer thread wakes every `flush_interval_s` (or when `batch_rows` are waiting),
turns batches into rows and inserts them in one transaction. If the database is down the
batches stay queued (up to the bound) and the thread retries with backoff; it resumes by
itself. `close()` flushes what is left, within a time limit, on shutdown.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from itertools import chain
from typing import Any

import psycopg
from prometheus_client import Counter
from sqlalchemy import Connection, Engine, delete, select
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from service.monitoring.instruments import Instruments
from service.monitoring.records import PredictionBatch
from service.persistence.database import is_postgres
from service.persistence.rows import Rows, input_rows, prediction_rows
from service.persistence.tables import Prediction, PredictionInput
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
        self._dropped: dict[str, Counter] = {
            r: instruments.records_dropped.labels(model, r)
            for r in ("queue_full", "database_down", "shutdown")
        }
        self._written = instruments.records_written.labels(model)
        self._queue_gauge = instruments.writer_queue_rows.labels(model)
        self._up_gauge = instruments.database_up.labels(model)
        self._flush_seconds = instruments.writer_flush_seconds.labels(model)
        self._insert = _insert_ignoring_duplicates(engine)
        self._postgres = is_postgres(engine)
        self._since_prune = 0.0

    def start(self) -> None:
        self._up_gauge.set(1)
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
        self._thread.join(timeout=5.0)

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
            taken = self._take()
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
            with self._drained:
                self._queued_rows -= sum(len(b) for b in taken)
                self._queue_gauge.set(self._queued_rows)
                self._drained.notify_all()
                more = self._queued_rows >= self._settings.batch_rows or (
                    self._flush_waiters > 0 and self._queued_rows > 0
                )
            if not more:
                return True

    def _take(self) -> list[PredictionBatch]:
        taken: list[PredictionBatch] = []
        rows = 0
        with self._lock:
            while self._queue and rows < self._settings.batch_rows:
                batch = self._queue.popleft()
                taken.append(batch)
                rows += len(batch)
        return taken

    def _put_back(self, taken: list[PredictionBatch]) -> None:
        with self._lock:
            self._queue.extendleft(reversed(taken))

    def _write(self, batches: list[PredictionBatch]) -> bool:
        started = time.perf_counter()
        predictions = prediction_rows(batches)
        inputs = input_rows(batches)
        try:
            try:
                self._insert_all(predictions, inputs, fast=True)
            except IntegrityError:
                # COPY cannot skip a duplicate client-supplied request id; INSERT can.
                self._insert_all(predictions, inputs, fast=False)
        except SQLAlchemyError as exc:
            if self._database_up:
                log.warning(
                    "database write failed, records stay queued: %s", exc.__class__.__name__
                )
            self._set_up(False)
            return False
        self._set_up(True)
        self._written.inc(len(predictions))
        self._flush_seconds.observe(time.perf_counter() - started)
        return True

    def _insert_all(self, predictions: Rows, inputs: Rows, *, fast: bool) -> None:
        with self._engine.begin() as connection:
            for table, rows in ((Prediction, predictions), (PredictionInput, inputs)):
                if not rows:
                    continue
                if not fast:
                    connection.execute(self._insert(table), rows.dicts())
                elif self._postgres:
                    _copy(connection, table.__tablename__, rows)
                else:
                    _sqlite_insert_or_ignore(connection, table.__tablename__, rows)
            self._prune_inputs(connection, len(inputs))

    def _prune_inputs(self, connection: Any, added: int) -> None:
        """Keep at most `input_retention_rows` logged inputs (checked every so often)."""
        self._since_prune += added
        retention = self._settings.input_retention_rows
        if self._since_prune < max(retention // 10, 1):
            return
        self._since_prune = 0
        cutoff = connection.execute(
            select(PredictionInput.created_at)
            .order_by(PredictionInput.created_at.desc())
            .offset(retention)
            .limit(1)
        ).scalar()
        if cutoff is not None:
            connection.execute(delete(PredictionInput).where(PredictionInput.created_at < cutoff))

    def _set_up(self, up: bool) -> None:
        if up != self._database_up:
            log.warning("database is %s", "back" if up else "unreachable")
        self._database_up = up
        self._up_gauge.set(1 if up else 0)


def _copy(connection: Connection, table: str, rows: Rows) -> None:
    """PostgreSQL COPY: several times faster than INSERT for many small rows."""
    columns = ", ".join(rows.names)
    driver = connection.connection.driver_connection
    assert driver is not None
    statement = f"COPY {table} ({columns}) FROM STDIN"
    try:
        with driver.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows.tuples:
                copy.write_row(row)
    except psycopg.errors.IntegrityError as exc:  # the raw driver's errors are not wrapped
        raise IntegrityError(statement, None, exc) from exc
    except psycopg.Error as exc:
        raise OperationalError(statement, None, exc) from exc


def _sqlite_insert_or_ignore(connection: Connection, table: str, rows: Rows) -> None:
    """Multi-row INSERT OR IGNORE, a few hundred rows per statement.

    The sqlite3 module releases the GIL around every statement step; with executemany
    that is once per row, and each time the writer must win the GIL back from a busy
    event loop. One statement per chunk pays that once per chunk (measured under load:
    ~3,000 rows/s with executemany, the queue growing until it dropped).
    """
    width = len(rows.names)
    per_statement = max(1, _SQLITE_MAX_VARIABLES // width)
    columns = ", ".join(rows.names)
    one_row = "(" + ", ".join("?" * width) + ")"
    for start in range(0, len(rows.tuples), per_statement):
        chunk = rows.tuples[start : start + per_statement]
        values = ", ".join([one_row] * len(chunk))
        statement = f"INSERT OR IGNORE INTO {table} ({columns}) VALUES {values}"  # noqa: S608
        connection.exec_driver_sql(statement, tuple(chain.from_iterable(chunk)))


_SQLITE_MAX_VARIABLES = 32_766  # SQLITE_MAX_VARIABLE_NUMBER since SQLite 3.32


def _insert_ignoring_duplicates(engine: Engine) -> Callable[[type[Any]], Any]:
    """INSERT ... ON CONFLICT DO NOTHING: a client-supplied request id seen twice is kept once."""
    from sqlalchemy.dialects import postgresql, sqlite

    dialect_insert: Any = postgresql.insert if is_postgres(engine) else sqlite.insert

    def build(table: type[Any]) -> Any:
        return dialect_insert(table).on_conflict_do_nothing()

    return build
