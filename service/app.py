"""`create_app(settings)`: the only place the service is assembled.

Nothing is built at import time. The lifespan loads and validates the student, builds the
teacher backend and its dispatcher, the engine and the Prometheus instruments, and tears
them down in reverse on shutdown. Tests build their own app with their own settings and
may swap the teacher backend or the recorder at the seams.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.telemetry import TelemetryConfig
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from sqlalchemy import Engine
from starlette.responses import PlainTextResponse, Response

from service import __version__
from service.api import (
    routes_admin,
    routes_feedback,
    routes_loop,
    routes_monitoring,
    routes_oip,
    routes_v1,
)
from service.api.auth import KeyRing
from service.api.errors import install_error_handlers
from service.api.fastpath import InferenceFastPath
from service.api.middleware import BodyLimitMiddleware
from service.api.state import Services
from service.backends.dispatcher import TeacherDispatcher
from service.backends.onnx import load_onnx_model
from service.backends.remote import RemoteTeacher
from service.backends.teacher import LocalTeacher, TeacherBackend
from service.errors import ConfigError, TeacherError
from service.jobs.controller import Controller
from service.jobs.runners import make_runner
from service.monitoring.exposition import (
    exposition,
    forget_previous_process_with_my_pid,
    multiprocess_dir,
)
from service.monitoring.instruments import Instruments, build_instruments
from service.monitoring.monitor import Monitor
from service.monitoring.records import NullRecorder, Recorder
from service.persistence import migrate
from service.persistence.database import make_engine, session_factory
from service.persistence.feedback import FeedbackStore
from service.persistence.writer import PredictionWriter
from service.registry import ModelRegistry
from service.routing.deployment import Deployment
from service.routing.engine import InferenceEngine
from service.settings import ServerSettings, Settings, load_settings

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    *,
    metrics_registry: CollectorRegistry | None = None,
    teacher: TeacherBackend | None = None,
    recorder: Recorder | None = None,
) -> FastAPI:
    """Build the ASGI app. `teacher` replaces the configured teacher backend (tests)."""
    registry = metrics_registry or CollectorRegistry()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        instruments = build_instruments(registry)
        database = make_engine(
            settings.database.url.get_secret_value(), pool_size=settings.database.pool_size
        )
        if settings.database.auto_migrate:
            await asyncio.to_thread(migrate.upgrade, database)
        writer = None
        if recorder is None and settings.recording.enabled:
            writer = PredictionWriter(
                database, settings=settings.recording, instruments=instruments,
                model=settings.model.name,
            )  # fmt: skip
            writer.start()
        deployment = await _build_deployment(settings, instruments, teacher, recorder or writer)
        sessions = session_factory(database)
        services = Services(
            settings=settings,
            deployment=deployment,
            instruments=instruments,
            metrics_registry=registry,
            keys=KeyRing(settings.auth),
            sessions=sessions,
            monitor=_monitor(settings, database, deployment, instruments),
            feedback=FeedbackStore(
                sessions,
                num_classes=lambda: deployment.engine.student.manifest.num_classes,
                bucket_s=settings.recording.bucket_s,
                flush_writer=None if writer is None else _settle(settings, deployment, writer),
            ),
        )
        services.controller = Controller(
            settings=settings, database=database, deployment=deployment,
            instruments=instruments, runner=make_runner(settings, database),
        )  # fmt: skip
        try:
            await services.controller.start()
        except Exception as exc:  # the database may be down: serve, and follow it later
            log.warning("could not read the stored serving state (%s); serving as configured", exc)
        app.state.services = services
        controlling = asyncio.create_task(services.controller.run(), name="kdguard-controller")
        tasks: list[asyncio.Task[None]] = []
        if services.monitor is not None:
            tasks.append(asyncio.create_task(services.monitor.run(), name="kdguard-monitor"))
        tune_collector(settings.server)
        services.ready = True
        log.info("serving %s student %s", deployment.name, deployment.engine.student.version)
        try:
            yield
        finally:
            services.ready = False
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            services.controller.stop()
            await controlling
            await services.controller.close()
            await deployment.engine.close()  # shadow work still queued ends as dropped records
            if writer is not None:
                await asyncio.to_thread(writer.close, settings.server.shutdown_grace_s)
            database.dispose()

    app = FastAPI(
        title="kdguard",
        version=__version__,
        summary="A distilled student model served with its teacher beside it.",
        lifespan=lifespan,
        telemetry=TelemetryConfig(
            tracing=settings.server.opentelemetry,
            metrics=settings.server.opentelemetry,
            logs=settings.server.opentelemetry,
        ),
    )
    install_error_handlers(app)
    # Added last = outermost: the byte limit applies to the fast path too.
    if settings.server.fast_path:
        app.add_middleware(InferenceFastPath)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.server.max_body_bytes)
    app.include_router(routes_v1.router)
    app.include_router(routes_oip.router)
    app.include_router(routes_feedback.router)
    app.include_router(routes_monitoring.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_loop.router)

    @app.get(
        "/metrics",
        tags=["operations"],
        summary="Prometheus exposition",
        response_class=PlainTextResponse,  # documents text/plain, as it answers
    )
    async def metrics(request: Request) -> Response:
        return Response(exposition(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def create_app_from_environment() -> FastAPI:
    """The app of one worker of `kdguard serve` with `server.workers > 1`.

    Settings come from `KDGUARD_CONFIG` and the environment, as the parent set them.
    """
    settings = load_settings()
    sys.setswitchinterval(settings.server.gil_switch_interval_s)
    if (directory := multiprocess_dir()) is not None:
        forget_previous_process_with_my_pid(directory)
    return create_app(settings)


def _monitor(
    settings: Settings, database: Engine, deployment: Deployment, instruments: Instruments
) -> Monitor | None:
    if not settings.monitoring.enabled:
        return None
    return Monitor(
        database=database,
        settings=settings.monitoring,
        model=deployment.name,
        student=lambda: deployment.engine.student.manifest,
        registry=deployment.registry,
        instruments=instruments,
    )


def _settle(
    settings: Settings, deployment: Deployment, writer: PredictionWriter
) -> Callable[[float], bool]:
    """For feedback naming an unknown id: wait for the shadow calls pending now to record
    their rows, then for the writer to store everything queued. True when both finished."""

    def settle(timeout: float) -> bool:
        shadows = deployment.engine.wait_for_shadows(settings.teacher.shadow_timeout_s + 0.5)
        return writer.flush(timeout) and shadows

    return settle


async def _build_deployment(
    settings: Settings,
    instruments: Instruments,
    teacher: TeacherBackend | None,
    recorder: Recorder | None,
) -> Deployment:
    registry = ModelRegistry(settings.registry.root)
    name = settings.model.name
    manifest = (
        registry.manifest(name, settings.model.student_version)
        if settings.model.student_version
        else registry.active_manifest(name, "student")
    )
    student = await asyncio.to_thread(load_onnx_model, registry, manifest)
    backend = teacher or await _teacher_backend(settings, registry, student.manifest.num_classes)
    dispatcher = None
    if backend is not None:
        await _warm_teacher(backend, student.manifest.input.features)
        dispatcher = TeacherDispatcher(
            backend, model=name, settings=settings.teacher, instruments=instruments
        )
        dispatcher.start()
    engine = InferenceEngine(
        model_name=name,
        student=student,
        dispatcher=dispatcher,
        routing=settings.routing,
        instruments=instruments,
        recorder=recorder or NullRecorder(),
        input_sample_rate=settings.recording.input_sample_rate,
        inline_max_rows=settings.server.inline_max_rows,
        student_threads=settings.server.student_threads,
    )
    return Deployment(registry=registry, engine=engine, instruments=instruments)


async def _warm_teacher(backend: TeacherBackend, features: int) -> None:
    """A teacher that is down at start-up is not fatal: the student serves, degraded."""
    try:
        await backend.warm_up(features)
    except TeacherError as exc:
        log.warning("teacher warm-up failed (%s: %s); serving, fallbacks degrade until it answers",
                    exc.reason, exc.message)  # fmt: skip


async def _teacher_backend(
    settings: Settings, registry: ModelRegistry, num_classes: int
) -> TeacherBackend | None:
    config = settings.teacher
    if config.mode == "none":
        return None
    if config.mode == "remote":
        return RemoteTeacher(
            config.remote, num_classes=num_classes, max_connections=config.max_concurrency
        )
    name = settings.teacher_name
    manifest = (
        registry.manifest(name, config.local_version)
        if config.local_version
        else registry.active_manifest(name, "teacher")
    )
    model = await asyncio.to_thread(load_onnx_model, registry, manifest)
    if model.manifest.num_classes != num_classes:
        raise ConfigError(
            f"teacher {name} has {model.manifest.num_classes} classes, student {num_classes}"
        )
    teacher = await asyncio.to_thread(
        LocalTeacher, model, threads=config.max_concurrency, inline_max_s=config.local_inline_max_s
    )
    log.info(
        "local teacher %s/%s: %.0f us + %.1f us/row; inline up to %.0f us",
        name, manifest.version, teacher.fixed_s * 1e6, teacher.per_row_s * 1e6,
        config.local_inline_max_s * 1e6,
    )  # fmt: skip
    return teacher


def tune_collector(server: ServerSettings) -> None:
    """Apply the server's garbage collector settings (process-wide) once start-up is done."""
    if server.gc_threshold is not None:
        gc.set_threshold(server.gc_threshold, *gc.get_threshold()[1:])
    if server.gc_freeze:
        gc.collect()
        gc.freeze()
