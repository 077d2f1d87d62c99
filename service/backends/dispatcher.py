"""One priority queue for all teacher work, drained by a fixed number of workers.

Fallback jobs (a client is waiting) always go before shadow jobs (nobody is waiting).
The queue is bounded in rows: a shadow job that does not fit is dropped and counted; a
fallback job that does not fit first evicts queued shadow work, and only fails if the
queue is full of fallbacks. Each worker takes whatever has accumulated (up to
`max_batch` rows) and makes one teacher call, so calls are micro-batched under load
without adding latency when idle. The number of workers is the concurrency cap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service.backends.circuit import CircuitBreaker, State
from service.backends.onnx import Array
from service.backends.teacher import TEACHER_ERROR_REASONS, TeacherBackend
from service.errors import TeacherError
from service.monitoring.instruments import CIRCUIT_STATES, Instruments
from service.settings import TeacherSettings

log = logging.getLogger(__name__)

ShadowCallback = Callable[[Array | None, str | None, float], None]
"""Called with (probabilities or None, failure reason or None, teacher seconds)."""


@dataclass(slots=True, eq=False)
class _Job:
    x: Array
    deadline: float
    future: asyncio.Future[tuple[Array, float]] | None = None  # fallback: a caller waits
    on_done: ShadowCallback | None = None  # shadow: a callback, nobody waits
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.rows = int(self.x.shape[0])

    @property
    def abandoned(self) -> bool:
        return self.future is not None and self.future.done()

    def fail(self, reason: str) -> None:
        if self.future is not None:
            if not self.future.done():
                self.future.set_exception(TeacherError(reason))
        elif self.on_done is not None:
            self.on_done(None, reason, 0.0)


class TeacherDispatcher:
    def __init__(
        self,
        backend: TeacherBackend,
        *,
        model: str,
        settings: TeacherSettings,
        instruments: Instruments,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self._settings = settings
        self._clock = clock
        self._fallback: deque[_Job] = deque()
        self._shadow: deque[_Job] = deque()
        self._rows = {"fallback": 0, "shadow": 0}
        self._work = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._closed = False
        m = instruments
        self._errors = {
            reason: m.teacher_errors.labels(model, reason) for reason in TEACHER_ERROR_REASONS
        }
        self._dropped = m.shadow_dropped
        self._model = model
        self._depth_fallback = m.teacher_queue_depth.labels(model, "fallback")
        self._depth_shadow = m.teacher_queue_depth.labels(model, "shadow")
        self._in_flight = m.teacher_in_flight.labels(model)
        self._batch_rows = m.teacher_batch_rows.labels(model)
        self._latency = m.latency
        circuit_gauge = m.circuit_state.labels(model)
        circuit_gauge.set(CIRCUIT_STATES["closed"])

        def on_change(state: State) -> None:
            circuit_gauge.set(CIRCUIT_STATES[state])
            log.warning("teacher circuit is now %s", state)

        self.breaker = CircuitBreaker(
            failure_threshold=settings.circuit.failure_threshold,
            reset_after_s=settings.circuit.reset_after_s,
            clock=clock,
            on_change=on_change,
        )

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._workers = [
            asyncio.create_task(self._worker(), name=f"kdguard-teacher-{i}")
            for i in range(self._settings.max_concurrency)
        ]

    async def close(self) -> None:
        """Stop the workers and fail whatever is still queued."""
        self._closed = True
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        while self._fallback or self._shadow:
            self._pop().fail("shutdown")
        self._update_depth()
        await self.backend.aclose()

    # -- submitting --------------------------------------------------------------------

    def refusal(self) -> str | None:
        """Why a fallback submitted now would be refused at once (counted as such), or None.

        The engine asks before it prepares a fallback, so that while the circuit is open a
        low-confidence row costs a check and a counter, not a copy and a raised TeacherError.
        """
        if not self._closed and not self.breaker.rejects():
            return None
        reason = "shutdown" if self._closed else "circuit_open"
        self._errors[reason].inc()
        return reason

    async def fallback(self, x: Array) -> tuple[Array, float]:
        """Teacher probabilities for x within the deadline, or TeacherError(reason)."""
        deadline_s = self._settings.deadline_s
        if (reason := self.refusal()) is not None:
            raise TeacherError(reason)
        future: asyncio.Future[tuple[Array, float]] = asyncio.get_running_loop().create_future()
        job = _Job(x, deadline=self._clock() + deadline_s, future=future)
        if not self._make_room(job.rows):
            raise self._refuse("queue_full")
        self._push("fallback", job)
        try:
            async with asyncio.timeout(deadline_s):
                return await future
        except TimeoutError:
            raise self._refuse("timeout") from None

    def shadow(self, x: Array, on_done: ShadowCallback) -> bool:
        """Queue a shadow call; False (counted, and `on_done` told why) if it was dropped
        right away, so the caller still records the rows it sampled."""
        reason = None
        if self._closed:
            reason = "shutdown"
        elif self.breaker.rejects():
            reason = "circuit_open"
        elif self._queued_rows + x.shape[0] > self._settings.queue_capacity:
            reason = "queue_full"
        if reason is not None:
            self._dropped.labels(self._model, reason).inc()
            on_done(None, reason, 0.0)
            return False
        deadline = self._clock() + self._settings.shadow_timeout_s
        self._push("shadow", _Job(x, deadline=deadline, on_done=on_done))
        return True

    @property
    def _queued_rows(self) -> int:
        return self._rows["fallback"] + self._rows["shadow"]

    def _refuse(self, reason: str) -> TeacherError:
        self._errors[reason].inc()
        return TeacherError(reason)

    def _make_room(self, rows: int) -> bool:
        """Evict queued shadow work (newest first) until `rows` fit."""
        capacity = self._settings.queue_capacity
        while self._queued_rows + rows > capacity and self._shadow:
            evicted = self._shadow.pop()
            self._rows["shadow"] -= evicted.rows
            self._dropped.labels(self._model, "preempted").inc()
            evicted.fail("preempted")
        return self._queued_rows + rows <= capacity or self._queued_rows == 0

    def _push(self, kind: str, job: _Job) -> None:
        (self._fallback if kind == "fallback" else self._shadow).append(job)
        self._rows[kind] += job.rows
        self._update_depth()
        self._work.set()

    def _pop(self) -> _Job:
        kind = "fallback" if self._fallback else "shadow"
        job = (self._fallback if kind == "fallback" else self._shadow).popleft()
        self._rows[kind] -= job.rows
        return job

    def _update_depth(self) -> None:
        self._depth_fallback.set(self._rows["fallback"])
        self._depth_shadow.set(self._rows["shadow"])

    # -- working -----------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            await self._work.wait()
            batch = self._take(self._settings.max_batch)
            wait = self._settings.shadow_batch_wait_s
            rows = sum(j.rows for j in batch)
            if batch and wait > 0 and rows < self._settings.max_batch and _shadow_only(batch):
                # Nobody waits on shadow work: trade a little of its latency for bigger batches.
                await asyncio.sleep(wait)
                batch += self._take(self._settings.max_batch - rows)
            if not self._fallback and not self._shadow:
                self._work.clear()
            if batch:
                await self._run(batch)

    def _take(self, budget: int) -> list[_Job]:
        """Up to `budget` rows, fallbacks first; skip jobs whose caller gave up."""
        batch: list[_Job] = []
        rows = 0
        now = self._clock()
        while self._fallback or self._shadow:
            head = self._fallback[0] if self._fallback else self._shadow[0]
            if rows + head.rows > budget and (batch or budget < self._settings.max_batch):
                break
            job = self._pop()
            if job.abandoned:
                continue
            if job.deadline <= now:
                self._fail_expired(job)
                continue
            batch.append(job)
            rows += job.rows
        self._update_depth()
        return batch

    def _fail_expired(self, job: _Job) -> None:
        if job.on_done is not None:
            self._dropped.labels(self._model, "expired").inc()
        job.fail("timeout")

    async def _run(self, batch: list[_Job]) -> None:
        if not self.breaker.allow():
            self._fail_batch(batch, "circuit_open")
            return
        x = batch[0].x if len(batch) == 1 else np.concatenate([j.x for j in batch])
        timeout = max(min(j.deadline for j in batch) - self._clock(), 0.001)
        self._batch_rows.observe(x.shape[0])
        self._in_flight.inc()
        started = self._clock()
        try:
            async with asyncio.timeout(timeout):
                probs = await self.backend.probabilities(x, timeout)
        except TeacherError as exc:
            self._on_failure(batch, exc.reason)
            return
        except TimeoutError:
            self._on_failure(batch, "timeout")
            return
        except Exception:
            log.exception("teacher backend raised an unexpected error")
            self._on_failure(batch, "internal")
            return
        finally:
            self._in_flight.dec()
        self.breaker.success()
        self._deliver(batch, probs, self._clock() - started)

    def _on_failure(self, batch: list[_Job], reason: str) -> None:
        self.breaker.failure()
        self._errors[reason].inc()
        self._fail_batch(batch, reason)

    def _fail_batch(self, batch: list[_Job], reason: str) -> None:
        for job in batch:
            if job.on_done is not None:
                self._dropped.labels(self._model, reason).inc()
            job.fail(reason)

    def _deliver(self, batch: list[_Job], probs: Array, seconds: float) -> None:
        start = 0
        for job in batch:
            part = probs[start : start + job.rows]
            start += job.rows
            if job.future is not None:
                if not job.future.done():
                    job.future.set_result((part, seconds))
            elif job.on_done is not None:
                job.on_done(part, None, seconds)


def _shadow_only(batch: list[_Job]) -> bool:
    return all(job.future is None for job in batch)
