"""Open Inference Protocol v2 (KServe / Triton HTTP): health, metadata, readiness, infer.

The deployment's name is the model name; its versions are the registered student
versions, of which the active one is loaded and ready.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from service import __version__
from service.api import inference
from service.api.errors import error_response
from service.api.oip import metadata
from service.api.routes_v1 import to_response
from service.api.schemas import InferRequestBody, InferResponseBody, error_responses, request_body
from service.api.state import Services, ServicesDep
from service.registry import Manifest

router = APIRouter(prefix="/v2", tags=["open inference protocol"])
Handler = Callable[..., Awaitable[Any]]


@router.get("/health/live", summary="Liveness")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="Readiness", responses=error_responses(503))
async def ready(services: ServicesDep) -> Response:
    if not services.ready:
        return error_response(503, "not ready", "unavailable")
    return Response(b'{"ready":true}', media_type="application/json")


@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, object]:
    return {"name": "kdguard", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get("/models/{name}", summary="Model metadata", responses=error_responses(404))
async def model_metadata(name: str, services: ServicesDep) -> dict[str, object]:
    return metadata(inference.serving_manifest(services, name), _versions(services, name))


@router.get(
    "/models/{name}/versions/{version}",
    summary="Model version metadata",
    responses=error_responses(404),
)
async def version_metadata(name: str, version: str, services: ServicesDep) -> dict[str, object]:
    return metadata(inference.version_manifest(services, name, version), [version])


@router.get("/models/{name}/ready", summary="Model readiness", responses=error_responses(404, 503))
async def model_ready(name: str, services: ServicesDep) -> Response:
    return _ready_response(services, inference.serving_manifest(services, name))


@router.get(
    "/models/{name}/versions/{version}/ready",
    summary="Model version readiness",
    responses=error_responses(404, 503),
)
async def version_ready(name: str, version: str, services: ServicesDep) -> Response:
    return _ready_response(services, inference.loaded_manifest(services, name, version))


def _infer_route(path: str, summary: str) -> Callable[[Handler], Handler]:
    return router.post(
        path,
        summary=summary,
        response_model=InferResponseBody,
        responses=error_responses(400, 401, 403, 404, 413, 415, 503),
        openapi_extra=request_body(InferRequestBody),
    )


@_infer_route("/models/{name}/infer", "Infer")
async def infer(name: str, request: Request) -> Response:
    return await _infer(request, name, None)


@_infer_route("/models/{name}/versions/{version}/infer", "Infer with a version")
async def infer_version(name: str, version: str, request: Request) -> Response:
    return await _infer(request, name, version)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    services: Services = request.app.state.services
    body = await request.body()
    work = partial(inference.infer, services, request.headers, body, name, version)
    return to_response(await inference.counted(services, "oip", work))


def _ready_response(services: Services, manifest: Manifest) -> Response:
    if not services.ready:
        return error_response(503, "not ready", "unavailable")
    body = f'{{"name":"{manifest.name}","version":"{manifest.version}","ready":true}}'
    return Response(body.encode(), media_type="application/json")


def _versions(services: Services, name: str) -> list[str]:
    return [m.version for m in services.deployment.registry.versions(name, "student")]
