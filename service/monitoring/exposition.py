"""`/metrics` for one process, or for several worker processes on one host.

With several workers (`server.workers > 1`) prometheus_client keeps each process's values
in memory-mapped files in one directory, named by `PROMETHEUS_MULTIPROC_DIR`, and a scrape
merges them. prometheus_client reads that variable when it is first imported, so it must be
set before a worker starts. Two things keep the merged numbers right:

- the directory starts empty: counters left by a previous run would be added in;
- a dead worker's live gauges go (`mark_process_dead`): its last queue depth or in-flight
  count would otherwise stay in every sum. Its counters stay, so totals never go backwards.

Dead workers are found at scrape time (any supervisor restarts them: uvicorn's, gunicorn's,
a container runtime's), so nothing depends on a hook in the supervisor.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import cast

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import multiprocess as _multiprocess

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# prometheus_client's multiprocess module is untyped; these are its signatures.
_mark_process_dead = cast(Callable[[int, str], None], _multiprocess.mark_process_dead)
_MultiProcessCollector = cast(
    Callable[[CollectorRegistry, str], object], _multiprocess.MultiProcessCollector
)

# prometheus_client names files <type>_<mode>_<pid>.db (gauges) or <type>_<pid>.db.
_LIVE_GAUGE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")


def multiprocess_dir() -> Path | None:
    """The multiprocess directory this process writes to, or None in single-process mode."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def prepare_multiprocess_dir(path: Path) -> None:
    """Create `path` and remove the metric files a previous run left in it.

    Only prometheus_client's own `*.db` files go: a misconfigured path is never emptied.
    """
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)


def forget_previous_process_with_my_pid(path: Path) -> None:
    """A new worker may reuse a dead one's pid: drop that one's live gauges first."""
    _mark_process_dead(os.getpid(), str(path))


def reap_dead_workers(path: Path) -> list[int]:
    """Remove the live gauges of every worker that is no longer running; their pids."""
    dead = sorted(
        {
            int(match.group(1))
            for name in os.listdir(path)
            if (match := _LIVE_GAUGE_FILE.match(name)) and not _running(int(match.group(1)))
        }
    )
    for pid in dead:
        _mark_process_dead(pid, str(path))
    return dead


def exposition(registry: CollectorRegistry) -> bytes:
    """The text exposition: this process's `registry`, or every worker's files merged."""
    directory = multiprocess_dir()
    if directory is None:
        return generate_latest(registry)
    reap_dead_workers(directory)
    merged = CollectorRegistry()
    _MultiProcessCollector(merged, str(directory))
    return generate_latest(merged)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:  # a worker that died but was not yet waited for is a zombie: dead all the same
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust the signal check
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"
