"""Shared fixtures: a registry of tiny models, settings, and an app with its lifespan."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from service.app import create_app
from service.backends.teacher import TeacherBackend
from service.persistence import migrate
from service.persistence.database import make_engine
from service.persistence.tables import Base
from service.registry import ModelRegistry
from service.settings import Settings
from tests.support.fakes import FakeTeacher, ListRecorder
from tests.support.models import make_tiny_registry

POSTGRES_ADMIN_URL = os.environ.get(
    "KDGUARD_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
ADMIN_KEY = "admin-key-0123456789abcdef"
PREDICT_KEY = "predict-key-0123456789abcdef"


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return make_tiny_registry(tmp_path / "registry")


def make_settings(registry_root: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "registry": {"root": registry_root},
        "database": {"url": f"sqlite:///{registry_root.parent / 'kdguard.db'}"},
        # In-thread writes: a writer process per app would add its start-up to every test
        # (tests/integration/test_writer.py and the e2e tests cover the process).
        "recording": {"flush_interval_s": 0.05, "writer_process": False},
        # Many apps share one test process: nothing to freeze, and the collector left as is.
        "server": {"gc_freeze": False, "gc_threshold": None},
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


# -- databases: every DB test runs on SQLite and on the local PostgreSQL -----------------


@contextmanager
def scratch_postgres() -> Iterator[str]:
    """A new, empty PostgreSQL database, dropped afterwards."""
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"kdguard_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """One migrated PostgreSQL database for the session (tables are emptied per test)."""
    with scratch_postgres() as url:
        engine = make_engine(url)
        migrate.upgrade(engine)
        engine.dispose()
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'kdguard.db'}"
        engine = make_engine(url)
        migrate.upgrade(engine)
        engine.dispose()
        yield url
        return
    shared: str = request.getfixturevalue("postgres_url")
    yield shared
    engine = make_engine(shared)
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture
def database(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()
