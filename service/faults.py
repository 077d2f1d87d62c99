"""Named fault points that tests arm from outside, to prove the service survives them.

`KDGUARD_FAULTS="job.body=crash,writer.flush=fail"` arms points by name in every process
that inherits the environment (job children and workers included). Actions:
- `crash`: the process kills itself with SIGKILL (what the OOM killer does);
- `hang`: the calling thread sleeps for an hour (a stuck dependency);
- `fail`: raises `FaultInjected`.
Unarmed points cost one dictionary lookup. The variable is read from the process
environment only, never from a request.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "KDGUARD_FAULTS"


class FaultInjected(RuntimeError):
    """Raised by a fault point armed with `fail`."""


def armed() -> dict[str, str]:
    spec = os.environ.get(ENV, "")
    points = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition("=")
        points[name] = action or "fail"
    return points


def point(name: str) -> None:
    action = armed().get(name)
    if action is None:
        return
    if action == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "hang":
        time.sleep(3600)
    raise FaultInjected(f"fault point {name} armed with {action!r}")
