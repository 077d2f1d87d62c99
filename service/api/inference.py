"""The two inference endpoints as plain functions of (services, headers, body) → Reply.

Both the FastAPI routes (which also document them in OpenAPI) and the ASGI fast path
(`fastpath.py`) call these, so parsing, checks, errors and metrics are the same code
whichever way a request arrives.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import orjson

from service.api.auth import bearer_or_api_key
from service.api.errors import error_body
from service.api.inputs import (
    check_request_ids,
    check_routing_key,
    load_json,
    require_json,
    to_batch,
)
from service.api.oip import encode_infer, parse_infer
from service.api.state import OVERLOADED, Services
from service.errors import (
    BadInputError,
    KdguardError,
    NotFoundError,
    UnavailableError,
    UnsupportedMediaTypeError,
)
from service.registry import Manifest
from service.routing.engine import Answer
from service.settings import Scope

log = logging.getLogger(__name__)

PREDICT_FIELDS = frozenset({"inputs", "request_ids", "routing_key"})
_OIP_BODY_TYPES = ("application/json", "application/octet-stream")
_JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Reply:
    body: bytes
    status: int = 200
    media_type: str = _JSON
    headers: dict[str, str] = field(default_factory=dict)


def error_reply(exc: KdguardError) -> Reply:
    return Reply(error_body(exc.message, exc.code), exc.status_code, _JSON, exc.headers)


OVERLOADED_REPLY = Reply(
    error_body("too many requests in flight; retry shortly", "overloaded"),
    503,
    headers={"Retry-After": "1"},
)


async def counted(services: Services, kind: str, work: Callable[[], Awaitable[Reply]]) -> Reply:
    """Admit a request, run its handler, turn KdguardErrors into replies, count the outcome.

    Admission bounds the requests in flight (`server.max_in_flight`): one over the bound
    gets 503 with `Retry-After` at once, before its handler starts.
    """
    if services.in_flight >= services.settings.server.max_in_flight:
        services.count_rejected(kind, OVERLOADED)
        return OVERLOADED_REPLY
    services.in_flight += 1
    try:
        reply = await work()
    except KdguardError as exc:
        reply = error_reply(exc)
    finally:
        services.in_flight -= 1
    services.count_request(kind, reply.status)
    return reply


def _admit(services: Services, headers: Mapping[str, str]) -> None:
    if not services.ready:
        raise UnavailableError("the server is not ready", headers={"Retry-After": "1"})
    if services.keys.require_predict_key:
        services.keys.check(bearer_or_api_key(headers), Scope.PREDICT)


async def predict(services: Services, headers: Mapping[str, str], body: bytes) -> Reply:
    """`POST /v1/predict`."""
    _admit(services, headers)
    require_json(headers.get("content-type"))
    parsed = load_json(body)
    if not isinstance(parsed, dict):
        raise BadInputError('the body must be a JSON object: {"inputs": [[...], ...]}')
    unknown = parsed.keys() - PREDICT_FIELDS
    if unknown:
        raise BadInputError(
            f"unknown field(s): {sorted(unknown)}; allowed: {sorted(PREDICT_FIELDS)}"
        )
    engine = services.deployment.engine
    x = to_batch(
        parsed.get("inputs"),
        features=engine.student.manifest.input.features,
        max_batch=services.settings.server.max_batch,
    )
    answer = await engine.predict(
        x,
        request_ids=check_request_ids(parsed.get("request_ids"), len(x)),
        routing_key=check_routing_key(parsed.get("routing_key")),
    )
    return Reply(orjson.dumps({"predictions": _predictions(answer)}))


def _predictions(answer: Answer) -> list[dict[str, object]]:
    names = answer.class_names
    return [
        {
            "request_id": request_id,
            "label": label,
            "class_name": names[label],
            "confidence": confidence,
            "served_by": "teacher" if by_teacher else "student",
            "model_version": answer.model_version,
            "degraded": degraded,
        }
        for request_id, label, confidence, by_teacher, degraded in zip(
            answer.request_ids,
            answer.labels.tolist(),
            answer.confidence.tolist(),
            answer.by_teacher.tolist(),
            answer.degraded.tolist(),
            strict=True,
        )
    ]


async def infer(
    services: Services, headers: Mapping[str, str], body: bytes, name: str, version: str | None
) -> Reply:
    """`POST /v2/models/{name}[/versions/{version}]/infer` (Open Inference Protocol)."""
    manifest = (
        serving_manifest(services, name)
        if version is None
        else loaded_manifest(services, name, version)
    )
    _admit(services, headers)
    content_type = headers.get("content-type")
    if content_type and content_type.split(";", 1)[0].strip().lower() not in _OIP_BODY_TYPES:
        raise UnsupportedMediaTypeError(f"expected one of {_OIP_BODY_TYPES}, got {content_type}")
    parsed = parse_infer(
        body,
        headers.get("inference-header-content-length"),
        manifest=manifest,
        max_batch=services.settings.server.max_batch,
    )
    ids = [parsed.id] if parsed.id is not None and len(parsed.x) == 1 else None
    answer = await services.deployment.engine.predict(parsed.x, request_ids=ids)
    content, header_length = encode_infer(parsed, answer, model=name)
    if header_length is None:
        return Reply(content)
    return Reply(
        content,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(header_length)},
    )


def serving_manifest(services: Services, name: str) -> Manifest:
    if name != services.deployment.name:
        raise NotFoundError(
            f"unknown model {name!r}; this server serves {services.deployment.name!r}"
        )
    return services.deployment.engine.student.manifest


def version_manifest(services: Services, name: str, version: str) -> Manifest:
    serving = serving_manifest(services, name)
    if version == serving.version:
        return serving
    manifest = services.deployment.registry.manifest(name, version)
    if manifest.role != "student":
        raise NotFoundError(f"model {name!r} has no version {version!r}")
    return manifest


def loaded_manifest(services: Services, name: str, version: str) -> Manifest:
    manifest = version_manifest(services, name, version)
    serving = services.deployment.engine.student.manifest
    if manifest.version != serving.version:
        raise UnavailableError(
            f"version {version} of {name!r} is registered but not loaded; "
            f"version {serving.version} is serving"
        )
    return manifest
