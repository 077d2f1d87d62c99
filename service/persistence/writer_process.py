"""The prediction writer's child process: `python -m service.persistence.writer_process`.

Started by `writer.ProcessSink`. Reads pickled messages from stdin: first its config
(database URL, SQLite busy timeout, recording settings), answered with READY once it
can write; then one list of `Gathered` parts per flush, inserted in one transaction and
answered on stdout with None (committed) or the name of the database error. Ends at end
of input, which is also what it sees when the serving process dies, so it never
outlives it. SIGINT and SIGTERM are ignored: a terminal's Ctrl-C or a service manager's
stop reaches the whole process group, and the serving process still wants its final
flush written on the way out; it closes the pipe (or kills the child) itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle  # frames from the serving process that started us  # nosec B403
import signal
import sys

from service.persistence.database import make_engine
from service.persistence.rows import Gathered
from service.persistence.writer import READY, Inserter, send
from service.settings import RecordingSettings


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Answers go to the original stdout only; anything printed by accident goes to stderr.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    requests = sys.stdin.buffer
    # Pickle is safe here: the only writer of this pipe is the process that started us.
    config = pickle.load(requests)  # noqa: S301  # nosec B301
    settings = RecordingSettings.model_validate(config["settings"])
    yield_cpu(settings.writer_niceness)
    engine = make_engine(config["url"], pool_size=1, busy_timeout_s=config["busy_timeout_s"])
    inserter = Inserter(engine, settings)
    send(answers, READY)
    try:
        while True:
            try:
                rows = pickle.load(requests)  # noqa: S301  # nosec B301
            except EOFError:
                return 0
            if not (isinstance(rows, list) and all(isinstance(r, Gathered) for r in rows)):
                raise TypeError(f"expected a list of Gathered rows, got {type(rows).__name__}")
            outcome = inserter.write(rows)
            try:
                send(answers, outcome)
            except BrokenPipeError:  # the server died; what it sent is written: done
                with contextlib.suppress(OSError):  # the unsent answer cannot go anywhere
                    answers.close()
                return 0
    finally:
        engine.dispose()


def yield_cpu(niceness: int) -> None:
    """Let the serving process win the CPU whenever both want it.

    On a host with few cores, a flush (tens of milliseconds of row building and
    driver work) that the scheduler puts on the serving process's core delays every
    answer waiting behind it. Records wait a second anyway; with a nice value and the
    batch class the flush runs in the server's idle moments instead.
    """
    if niceness <= 0:
        return
    with contextlib.suppress(OSError):  # not allowed here: schedule as before
        os.nice(niceness)
    with contextlib.suppress(OSError, AttributeError):  # SCHED_BATCH is Linux-only
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


if __name__ == "__main__":
    sys.exit(main())
