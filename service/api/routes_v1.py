"""kdguard's own JSON API: `POST /v1/predict` (the handler lives in `inference.py`)."""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.api import inference
from service.api.schemas import PredictRequest, PredictResponse, error_responses, request_body
from service.api.state import Services

router = APIRouter(tags=["inference"])


@router.post(
    "/v1/predict",
    summary="Predict with the student, falling back to the teacher when unsure",
    response_model=PredictResponse,
    responses=error_responses(400, 401, 403, 413, 415, 503),
    openapi_extra=request_body(PredictRequest),
)
async def predict(request: Request) -> Response:
    services: Services = request.app.state.services
    body = await request.body()
    reply = await inference.counted(
        services, "rest", partial(inference.predict, services, request.headers, body)
    )
    return to_response(reply)


def to_response(reply: inference.Reply) -> Response:
    return Response(reply.body, reply.status, reply.headers, media_type=reply.media_type)
