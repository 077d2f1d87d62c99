"""Shared fixtures: a registry of tiny models, settings, and an app with its lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.backends.teacher import TeacherBackend
from service.registry import ModelRegistry
from service.settings import Settings
from tests.support.fakes import FakeTeacher, ListRecorder
from tests.support.models import make_tiny_registry

ADMIN_KEY = "admin-key-0123456789abcdef"
PREDICT_KEY = "predict-key-0123456789abcdef"


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return make_tiny_registry(tmp_path / "registry")


def make_settings(registry_root: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "registry": {"root": registry_root},
        "model": {"name": "tiny"},
        "routing": {"fallback_threshold": 0.6, "shadow_rate": 0.0, "seed": 7},
        "teacher": {"deadline_s": 0.2, "circuit": {"failure_threshold": 3, "reset_after_s": 0.3}},
        "auth": {
            "api_keys": [
                {"name": "ops", "key": ADMIN_KEY, "scopes": ["admin", "predict"]},
                {"name": "client", "key": PREDICT_KEY, "scopes": ["predict"]},
            ]
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return Settings(**base)


@pytest.fixture(params=[True, False], ids=["fast_path", "fastapi_routes"])
def settings(registry: ModelRegistry, request: pytest.FixtureRequest) -> Settings:
    """Every test that uses it runs through both the ASGI fast path and FastAPI's routes."""
    return make_settings(registry.root, server={"fast_path": request.param})


@pytest.fixture
def fake_teacher() -> FakeTeacher:
    return FakeTeacher()


@pytest.fixture
def recorder() -> ListRecorder:
    return ListRecorder()


@asynccontextmanager
async def running_app(
    settings: Settings,
    *,
    teacher: TeacherBackend | None = None,
    recorder: ListRecorder | None = None,
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app with its lifespan running, and a client that talks to it in-process."""
    app = create_app(
        settings, metrics_registry=CollectorRegistry(), teacher=teacher, recorder=recorder
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://kdguard") as client:
            yield app, client


AppFactory = Callable[..., AbstractAsyncContextManager[tuple[FastAPI, httpx.AsyncClient]]]


@pytest.fixture
async def client(
    settings: Settings, fake_teacher: FakeTeacher, recorder: ListRecorder
) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(settings, teacher=fake_teacher, recorder=recorder) as (_, http):
        yield http
