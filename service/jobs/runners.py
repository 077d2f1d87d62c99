"""Where jobs run: a child process of the server (default), or Celery workers.

The process runner starts `python -m service.jobs.child JOB_ID` with the server's
settings on stdin, so a crash, an OOM kill or a runaway job ends that process only: the
server notices the exit, fails the job with the reason, and keeps serving. A job past
`jobs.timeout_s`, or one cancelled while running, is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from typing import Protocol

from sqlalchemy import Engine

from service.persistence import loop
from service.settings import Settings, settings_json

log = logging.getLogger(__name__)

CANCEL_POLL_S = 0.5


class Runner(Protocol):
    name: str

    async def submit(self, job: loop.JobRow) -> None:
        """Hand a pending job over; returns once it is on its way (not when it ends)."""

    async def close(self) -> None: ...


class ProcessRunner:
    """Each job in its own child process, at most `jobs.max_running` at once."""

    name = "process"

    def __init__(self, settings: Settings, database: Engine) -> None:
        self._settings = settings
        self._database = database
        self._slots = asyncio.Semaphore(settings.jobs.max_running)
        self._tasks: set[asyncio.Task[None]] = set()
        self._children: dict[int, asyncio.subprocess.Process] = {}

    async def submit(self, job: loop.JobRow) -> None:
        if self._slots.locked():
            return  # stays pending; the controller offers it again next round
        await self._slots.acquire()
        claimed = await asyncio.to_thread(self._claim, job.id)
        if not claimed:
            self._slots.release()
            return
        task = asyncio.create_task(self._supervise(job), name=f"kdguard-job-{job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _claim(self, job_id: int) -> bool:
        with self._database.begin() as connection:
            return loop.claim_job(connection, job_id, runner=self.name)

    async def _supervise(self, job: loop.JobRow) -> None:
        try:
            outcome = await self._run_child(job)
            if outcome is not None:
                status, error = outcome
                await asyncio.to_thread(self._finish, job.id, status, error)
        except Exception:
            log.exception("supervising job %s failed", job.id)
            await asyncio.to_thread(self._finish, job.id, "failed", "runner error")
        finally:
            self._slots.release()

    async def _run_child(self, job: loop.JobRow) -> tuple[str, str] | None:
        """Run the child to its end; a (status, error) when the child could not say."""
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.jobs.child", str(job.id),
            stdin=asyncio.subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        self._children[job.id] = child
        try:
            return await self._watch(job, child)
        finally:
            self._children.pop(job.id, None)

    async def _watch(
        self, job: loop.JobRow, child: asyncio.subprocess.Process
    ) -> tuple[str, str] | None:
        assert child.stdin is not None
        child.stdin.write(settings_json(self._settings).encode())
        child.stdin.write(b"\n")
        await child.stdin.drain()
        child.stdin.close()
        deadline = time.monotonic() + self._settings.jobs.timeout_s
        while True:
            try:
                code = await asyncio.wait_for(child.wait(), CANCEL_POLL_S)
                break
            except TimeoutError:
                pass
            if time.monotonic() > deadline:
                _kill(child.pid)
                await child.wait()
                return "failed", f"timed out after {self._settings.jobs.timeout_s:.0f} s"
            if await asyncio.to_thread(self._cancel_requested, job.id):
                _kill(child.pid)
                await child.wait()
                return "cancelled", "cancelled while running"
        if code == 0:
            return None  # the child stored the job's end itself
        if code < 0:
            return "failed", f"job process killed by {signal.Signals(-code).name}"
        return "failed", f"job process exited with status {code}"

    def _cancel_requested(self, job_id: int) -> bool:
        with self._database.connect() as connection:
            return loop.get_job(connection, job_id).cancel_requested

    def _finish(self, job_id: int, status: str, error: str) -> None:
        with self._database.begin() as connection:
            loop.finish_job(connection, job_id, status=status, error=error)

    async def close(self) -> None:
        """Stop: jobs still running are killed and failed, so they can be triggered again."""
        for job_id, child in list(self._children.items()):
            _kill(child.pid)
            await child.wait()
            await asyncio.to_thread(
                self._finish, job_id, "failed", "interrupted: the server shut down"
            )
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class CeleryRunner:
    """Jobs go to a Celery queue; `kdguard worker` processes run them."""

    name = "celery"

    def __init__(self, settings: Settings, database: Engine) -> None:
        from service.jobs.celery_app import make_celery

        self._database = database
        self._app = make_celery(settings)
        self._queue = settings.jobs.queue

    async def submit(self, job: loop.JobRow) -> None:
        if not await asyncio.to_thread(self._mark, job.id):
            return
        await asyncio.to_thread(
            self._app.send_task, "kdguard.run_job", args=[job.id], queue=self._queue
        )

    def _mark(self, job_id: int) -> bool:
        with self._database.begin() as connection:
            return loop.mark_dispatched(connection, job_id, runner=self.name)

    async def close(self) -> None:
        self._app.close()


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # the job and anything it started


def make_runner(settings: Settings, database: Engine) -> Runner | None:
    if settings.jobs.runner == "process":
        return ProcessRunner(settings, database)
    if settings.jobs.runner == "celery":
        return CeleryRunner(settings, database)
    return None
