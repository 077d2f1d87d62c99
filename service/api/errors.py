"""The one place errors become HTTP responses: `{"error": message, "code": code}`.

The body follows the Open Inference Protocol (`error` is a string, so Triton and KServe
clients show the message) and adds a stable machine-readable `code`.
"""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Match

from service.errors import KdguardError

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
    415: "unsupported_media_type", 422: "unprocessable", 503: "unavailable",
}  # fmt: skip


def error_body(message: str, code: str) -> bytes:
    """The one error body every path sends (FastAPI handlers, fast path, middleware)."""
    return orjson.dumps({"error": message, "code": code})


def error_response(
    status: int, message: str, code: str, headers: dict[str, str] | None = None
) -> Response:
    body = error_body(message, code)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


async def _kdguard_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, KdguardError)
    if exc.status_code >= 500 and exc.status_code != 503:
        log.error("%s on %s: %s", exc.code, request.url.path, exc.message)
    return error_response(exc.status_code, exc.message, exc.code, exc.headers)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return error_response(422, "; ".join(parts) or "invalid request", "unprocessable")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # The router names only the first route on the path; a path served by several
        # (GET and PUT /v1/admin/routing) must list every method it allows.
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return error_response(exc.status_code, str(exc.detail), code, headers)


_METHODS = ("DELETE", "GET", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> list[str]:
    """The methods some route fully matches on this path (rare: only after a 405)."""
    allowed = []
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return error_response(500, "internal server error", "internal_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(KdguardError, _kdguard_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
