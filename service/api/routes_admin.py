"""Admin API: model versions, activation, routing thresholds. Admin-scoped keys only."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from service.api.auth import require
from service.api.schemas import (
    ModelPublic,
    RoutingPublic,
    RoutingUpdate,
    VersionPublic,
    error_responses,
)
from service.api.state import ServicesDep
from service.errors import NotFoundError
from service.registry import Manifest
from service.settings import Scope

AdminKey = Annotated[str, Depends(require(Scope.ADMIN))]
router = APIRouter(prefix="/v1/admin", tags=["admin"], responses=error_responses(400, 401, 403))


@router.get("/models", summary="Models with their versions")
async def list_models(services: ServicesDep, _: AdminKey) -> list[ModelPublic]:
    registry = services.deployment.registry
    return [_model(services, name) for name in registry.names()]


@router.get("/models/{name}", summary="One model with its versions", responses=error_responses(404))
async def get_model(name: str, services: ServicesDep, _: AdminKey) -> ModelPublic:
    if name not in services.deployment.registry.names():
        raise NotFoundError(f"unknown model {name!r}")
    return _model(services, name)


@router.post(
    "/models/{name}/versions/{version}/activate",
    summary="Validate, warm and activate a student version without a restart",
    responses=error_responses(404, 409, 422),
)
async def activate(name: str, version: str, services: ServicesDep, key: AdminKey) -> VersionPublic:
    deployment = services.deployment
    if name != deployment.name:
        raise NotFoundError(f"this server serves {deployment.name!r}, not {name!r}")
    if services.controller is None:
        manifest = await deployment.activate_student(version)
    else:
        manifest = await services.controller.activate(version, actor=f"admin:{key}")
    return _version(manifest, active=True)


@router.get("/routing", summary="Cascade threshold τ and shadow rate π₀")
async def get_routing(services: ServicesDep, _: AdminKey) -> RoutingPublic:
    engine = services.deployment.engine
    return RoutingPublic(
        fallback_threshold=engine.fallback_threshold, shadow_rate=engine.shadow_rate
    )


@router.put("/routing", summary="Change τ and/or π₀ at run time", responses=error_responses(422))
async def set_routing(update: RoutingUpdate, services: ServicesDep, key: AdminKey) -> RoutingPublic:
    engine = services.deployment.engine
    tau = (
        engine.fallback_threshold
        if update.fallback_threshold is None
        else update.fallback_threshold
    )
    rate = engine.shadow_rate if update.shadow_rate is None else update.shadow_rate
    if services.controller is None:
        engine.set_routing(tau, rate)
    else:
        await services.controller.set_routing(tau, rate, actor=f"admin:{key}")
    return RoutingPublic(
        fallback_threshold=engine.fallback_threshold, shadow_rate=engine.shadow_rate
    )


def _model(services: ServicesDep, name: str) -> ModelPublic:
    registry = services.deployment.registry
    active = registry.active(name)
    versions = [
        _version(m, active=active.get(m.role) == m.version) for m in registry.versions(name)
    ]
    return ModelPublic(name=name, active=active, versions=versions)


def _version(manifest: Manifest, *, active: bool) -> VersionPublic:
    return VersionPublic(
        name=manifest.name,
        version=manifest.version,
        role=manifest.role,
        sha256=manifest.sha256,
        temperature=manifest.temperature,
        class_names=list(manifest.class_names),
        created_at=manifest.created_at,
        active=active,
        metadata=manifest.metadata,
    )
