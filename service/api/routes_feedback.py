"""`POST /v1/feedback`: ground-truth labels for request ids the service issued."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from service.api.auth import bearer_or_api_key
from service.api.inputs import REQUEST_ID, load_json, require_json
from service.api.schemas import FeedbackItem, FeedbackResponse, error_responses, request_body
from service.api.state import FEEDBACK_LIMITED, Services
from service.errors import BadInputError, KdguardError, RateLimitedError
from service.persistence.feedback import Label
from service.settings import Scope

router = APIRouter(tags=["feedback"])


@router.post(
    "/v1/feedback",
    summary="Record true labels (one, or a list) for earlier predictions",
    response_model=FeedbackResponse,
    responses=error_responses(400, 401, 403, 404, 409, 413, 415, 422, 429, 503),
    openapi_extra=request_body(FeedbackItem, many=True),
)
async def feedback(request: Request) -> Response:
    services: Services = request.app.state.services
    try:
        client = _client(services, request)
        require_json(request.headers.get("content-type"))
        body = await request.body()
        labels = parse_labels(load_json(body), max_items=services.settings.server.max_batch)
        if services.feedback_limits is not None:
            services.feedback_limits.admit(client, cost=len(labels))
        key = request.headers.get("idempotency-key")
        if key is not None and not 0 < len(key) <= 128:
            raise BadInputError("Idempotency-Key must be 1-128 characters")
        result = await asyncio.to_thread(
            services.feedback.submit, labels, client=client, idempotency_key=key, body=body
        )
    except RateLimitedError:
        services.count_rejected("feedback", FEEDBACK_LIMITED, status=429)
        raise
    except KdguardError as exc:
        services.count_request("feedback", exc.status_code)
        raise
    services.count_request("feedback", 200)
    return Response(orjson.dumps(result), media_type="application/json")


def _client(services: Services, request: Request) -> str:
    if services.keys.require_feedback_key:
        return services.keys.check(bearer_or_api_key(request.headers), Scope.FEEDBACK)
    return request.client.host if request.client else "unknown"


def parse_labels(payload: Any, *, max_items: int) -> list[Label]:
    items = payload if isinstance(payload, list) else [payload]
    if not items:
        raise BadInputError("send at least one label")
    if len(items) > max_items:
        raise BadInputError(f"{len(items)} labels is over the limit of {max_items}")
    labels = []
    for item in items:
        if not isinstance(item, dict) or item.keys() != {"request_id", "label"}:
            raise BadInputError('each label must be {"request_id": "...", "label": <int>}')
        request_id, label = item["request_id"], item["label"]
        if not isinstance(request_id, str) or not REQUEST_ID.match(request_id):
            raise BadInputError("request_id must be a request id this service returned")
        if type(label) is not int:
            raise BadInputError("label must be an integer class index")
        labels.append(Label(request_id, label))
    return labels
