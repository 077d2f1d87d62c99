"""A lean ASGI front for the two inference routes.

FastAPI's router, dependency solving and Request/Response objects cost more per request
than running a small student model. This middleware answers `POST /v1/predict` and
`POST /v2/models/{name}[/versions/{v}]/infer` itself, calling the same handlers as the
FastAPI routes (`inference.py`): same parsing, checks, errors and metrics. Everything else
passes through to FastAPI. `server.fast_path: false` turns it off.
"""

from __future__ import annotations

import logging
from functools import partial

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import inference
from service.api.errors import error_body
from service.api.state import Services

log = logging.getLogger(__name__)

_OIP_PREFIX = "/v2/models/"


class InferenceFastPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path == "/v1/predict":
            kind, target = "rest", None
        elif path.startswith(_OIP_PREFIX) and (target := _oip_target(path)) is not None:
            kind = "oip"
        else:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:  # the client went away
            return
        services: Services = scope["app"].state.services
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if target is None:
            work = partial(inference.predict, services, headers, body)
        else:
            work = partial(inference.infer, services, headers, body, target[0], target[1])
        try:
            reply = await inference.counted(services, kind, work)
        except Exception:
            log.exception("unhandled error on %s", path)
            services.count_request(kind, 500)
            reply = inference.Reply(error_body("internal server error", "internal_error"), 500)
        await _send(send, reply)


def _oip_target(path: str) -> tuple[str, str | None] | None:
    """(model, version) for an OIP infer path, else None."""
    parts = path[len(_OIP_PREFIX) :].split("/")
    if len(parts) == 2 and parts[1] == "infer" and parts[0]:
        return parts[0], None
    if len(parts) == 4 and parts[1] == "versions" and parts[3] == "infer" and parts[0] and parts[2]:
        return parts[0], parts[2]
    return None


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _send(send: Send, reply: inference.Reply) -> None:
    headers = [
        (b"content-type", reply.media_type.encode()),
        (b"content-length", str(len(reply.body)).encode()),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in reply.headers.items()]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})
