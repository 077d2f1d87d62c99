"""A controllable fake teacher: a minimal Open Inference Protocol v2 server, run as a process.

    python -m tests.support.fake_teacher_server --port P --classes 3 --features 4

Routes:

- `GET /v2/health/ready` (and `/v2/health/live`): 200.
- `POST /v2/models/{name}/infer`: one FP32 input [n, features] as JSON; answers the output
  `logits` [n, classes]: 10 at the class of the largest of the first `classes` features,
  0 elsewhere (so the teacher is sure, and its label is easy to predict in a test).
- `POST /control {"mode": ..., "delay_s": ...}`: change behaviour at run time (see MODES).
- `GET /stats`: infer calls received, rows answered, calls in flight now, the most in
  flight at once, and how many calls the client abandoned (closed the connection first).
- `POST /stats/reset`: zero the counters (the current in-flight count is kept).

A call that waits (`slow`, `hang`) watches its connection: when the client gives up and
closes it, the call ends and stops counting as in flight. So `max_in_flight` measures how
many calls the client really had open at once, which is what a concurrency cap bounds.
A call counts as in flight only once it has been open for SETTLE_S: a client that gives
up on a call (closing its connection) and at once sends the next one on a new connection
can reach this server a few event-loop iterations before it has processed the old close,
which would read as one call too many for a fraction of a millisecond. A call beyond a
real cap stays open far longer (until the client's deadline) and is counted. `events`
in the stats lists the latest (monotonic time, "start" | "end", call number) events.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

SETTLE_S = 0.005
MODES = {
    "ok": "answer correctly (after delay_s, if set)",
    "slow": "answer correctly after delay_s",
    "hang": "accept the request and never answer (until the client disconnects)",
    "nan": "answer with a NaN logit (encoded as JSON null, as orjson and JS encode NaN)",
    "wrong_shape": "answer a well-formed tensor with one row too many",
    "wrong_classes": "answer [n, classes + 1] logits (an extra class column)",
    "truncated": "answer 200 with a JSON body cut off half way",
    "http500": "answer 500 with a JSON error",
}


@dataclass
class _State:
    classes: int
    features: int
    mode: str = "ok"
    delay_s: float = 0.0
    calls: int = 0
    rows: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    abandoned: int = 0
    events: deque[tuple[float, str, int]] = field(default_factory=lambda: deque(maxlen=100))

    def stats(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "delay_s": self.delay_s,
            "calls": self.calls,
            "rows": self.rows,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "abandoned": self.abandoned,
            "events": list(self.events),
        }


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


async def _wait_for_disconnect(request: Request) -> None:
    """Return once the client has closed the connection (the body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _disconnected_within(request: Request, seconds: float | None) -> bool:
    """Wait `seconds` (forever if None); True if the client disconnected first."""
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({watcher}, timeout=seconds)
        return watcher in done
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def _logits(state: _State, body: bytes) -> tuple[int, list[float | None]] | Response:
    """The logits for a request, flattened, or an error response for a bad request."""
    try:
        payload = orjson.loads(body)
        (tensor,) = payload["inputs"]
        rows, features = (int(d) for d in tensor["shape"])
        data = [float(v) for v in tensor["data"]]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        return _json({"error": f"bad request: {exc!r}"}, 400)
    if features != state.features or len(data) != rows * features or rows < 1:
        return _json({"error": f"expected [n, {state.features}] FP32 data"}, 400)
    logits: list[float | None] = []
    for r in range(rows):
        head = data[r * features : r * features + state.classes]
        top = max(range(state.classes), key=lambda k: head[k])
        logits += [10.0 if k == top else 0.0 for k in range(state.classes)]
    return rows, logits


def build_app(classes: int, features: int) -> Starlette:
    if features < classes:
        raise ValueError("features must be >= classes")
    state = _State(classes=classes, features=features)

    async def ready(request: Request) -> Response:
        return _json({"ready": True})

    async def infer(request: Request) -> Response:
        state.calls += 1
        call = state.calls
        counted = False

        def count() -> None:
            nonlocal counted
            counted = True
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)

        state.events.append((time.monotonic(), "start", call))
        # A call counts as in flight once it has been open SETTLE_S (see the module doc).
        handle = asyncio.get_running_loop().call_later(SETTLE_S, count)
        try:
            return await _answer(request)
        finally:
            handle.cancel()
            if counted:
                state.in_flight -= 1
            state.events.append((time.monotonic(), "end", call))

    async def _answer(request: Request) -> Response:
        body = await request.body()
        mode, delay = state.mode, state.delay_s
        wait = None if mode == "hang" else delay
        if (mode == "hang" or delay > 0) and await _disconnected_within(request, wait):
            state.abandoned += 1
            return _json({"error": "client went away"}, 499)
        if mode == "http500":
            return _json({"error": "the fake teacher failed on purpose"}, 500)
        result = _logits(state, body)
        if isinstance(result, Response):
            return result
        rows, logits = result
        state.rows += rows
        shape = [rows, state.classes]
        if mode == "nan":
            logits[0] = None  # NaN in JSON: orjson, JSON.stringify and others write null
        elif mode == "wrong_shape":
            logits += logits[-state.classes :]
            shape = [rows + 1, state.classes]
        elif mode == "wrong_classes":
            k = state.classes
            logits = [v for r in range(rows) for v in [*logits[r * k : (r + 1) * k], 0.0]]
            shape = [rows, k + 1]
        name = request.path_params["name"]
        output = {"name": "logits", "datatype": "FP32", "shape": shape, "data": logits}
        content = orjson.dumps({"model_name": name, "outputs": [output]})
        if mode == "truncated":
            content = content[: len(content) // 2]
        return Response(content, media_type="application/json")

    async def control(request: Request) -> Response:
        try:
            payload = orjson.loads(await request.body())
            mode = str(payload.get("mode", state.mode))
            delay_s = float(payload.get("delay_s", 0.0))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
            return _json({"error": f"bad control request: {exc!r}"}, 400)
        if mode not in MODES:
            return _json({"error": f"unknown mode {mode!r}; one of {sorted(MODES)}"}, 400)
        if delay_s < 0:
            return _json({"error": "delay_s must be >= 0"}, 400)
        state.mode, state.delay_s = mode, delay_s
        return _json(state.stats())

    async def stats(request: Request) -> Response:
        return _json(state.stats())

    async def reset_stats(request: Request) -> Response:
        state.calls = state.rows = state.abandoned = 0
        state.max_in_flight = state.in_flight
        return _json(state.stats())

    return Starlette(
        routes=[
            Route("/v2/health/ready", ready, methods=["GET"]),
            Route("/v2/health/live", ready, methods=["GET"]),
            Route("/v2/models/{name}/infer", infer, methods=["POST"]),
            Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
            Route("/control", control, methods=["POST"]),
            Route("/stats", stats, methods=["GET"]),
            Route("/stats/reset", reset_stats, methods=["POST"]),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--features", type=int, default=4)
    args = parser.parse_args(argv)
    uvicorn.run(
        build_app(args.classes, args.features),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
