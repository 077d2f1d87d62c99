"""The `kdguard` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from pydantic import SecretStr

from service.errors import KdguardError
from service.settings import Settings, describe_settings, load_settings

log = logging.getLogger("kdguard")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config) if getattr(args, "config", None) else load_settings()
    except (KdguardError, ValueError) as exc:
        print(f"kdguard: invalid configuration: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # One line per teacher or traffic request would drown everything else.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    try:
        result: int = args.handler(args, settings)
    except KdguardError as exc:
        print(f"kdguard: {exc.message}", file=sys.stderr)
        return 1
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdguard", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="build the digits models if missing and serve them")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument("--data-dir", type=Path, default=Path(".kdguard"))
    demo.add_argument("--traffic", action="store_true", help="drive drifting traffic at it")
    demo.add_argument("--rate", type=float, default=50.0, help="traffic requests per second")
    demo.add_argument("--duration", type=float, default=600.0, help="traffic seconds")
    demo.add_argument("--build-only", action="store_true", help="build the models and exit")
    demo.set_defaults(handler=_demo)

    serve = commands.add_parser("serve", help="serve the configured deployment")
    serve.add_argument("--config", type=Path, help="YAML settings file")
    serve.set_defaults(handler=_serve)

    migrate_cmd = commands.add_parser("migrate", help="upgrade the configured database to head")
    migrate_cmd.add_argument("--config", type=Path, help="YAML settings file")
    migrate_cmd.add_argument("--revision", default="head", help="target revision (default head)")
    migrate_cmd.add_argument("--downgrade", action="store_true", help="downgrade to --revision")
    migrate_cmd.set_defaults(handler=_migrate)

    registry = commands.add_parser("registry", help="list, add and activate model versions")
    registry.add_argument("--config", type=Path, help="YAML settings file")
    actions = registry.add_subparsers(required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="list models and versions")
    listing.set_defaults(handler=_registry_list)
    add = actions.add_parser("add", help="register an ONNX file as a new version")
    add.add_argument("file", type=Path)
    add.add_argument("--name", required=True)
    add.add_argument("--role", choices=["student", "teacher"], required=True)
    add.add_argument("--classes", required=True, help="comma-separated class names")
    add.add_argument("--temperature", type=float, default=1.0)
    add.add_argument("--activate", action="store_true", help="validate and make it active")
    add.set_defaults(handler=_registry_add)

    config = commands.add_parser("config", help="print the effective settings")
    config.add_argument("--config", type=Path, help="YAML settings file")
    config.add_argument("--describe", action="store_true", help="print every setting as a table")
    config.set_defaults(handler=_config)
    from service.loop_cli import add_commands

    add_commands(commands)  # job, jobs, rollout, worker
    return parser


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from service.persistence import migrate
    from service.persistence.database import make_engine

    engine = make_engine(settings.database.url.get_secret_value())
    if args.downgrade:
        migrate.downgrade(engine, args.revision)
    else:
        migrate.upgrade(engine, args.revision)
    print(f"database at {engine.url.render_as_string(hide_password=True)}: {args.revision}")
    engine.dispose()
    return 0


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    options: dict[str, Any] = {
        "host": settings.server.host,
        "port": settings.server.port,
        "loop": "uvloop",
        "http": "httptools",
        "access_log": False,
        "log_level": settings.log_level.lower(),
        # Whole seconds, rounded up: a fraction truncated to 0 would read as "no limit".
        "timeout_graceful_shutdown": math.ceil(settings.server.shutdown_grace_s),
    }
    if settings.server.workers > 1:
        return _serve_workers(args, settings, options)
    from service.monitoring.exposition import multiprocess_dir, prepare_multiprocess_dir

    if (directory := multiprocess_dir()) is not None:  # set from outside: still start clean
        prepare_multiprocess_dir(directory)
    from service.app import create_app

    sys.setswitchinterval(settings.server.gil_switch_interval_s)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    uvicorn.run(create_app(settings), **options)
    return 0


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM ends `kdguard serve` with status 0.

    uvicorn handles SIGTERM itself (stop accepting, finish in-flight requests, run the
    lifespan shutdown that flushes the writer), then restores the handler it found and
    raises the signal again. Under the default handler the process would die of it after
    that clean stop (status 143, -15 to Python), which supervisors report as a failure.
    A SIGTERM that comes before uvicorn has installed its handler ends start-up here.
    """
    raise SystemExit(0)


def _serve_workers(args: argparse.Namespace, settings: Settings, options: dict[str, Any]) -> int:
    """Several worker processes on one port; each builds its app from the environment.

    The database is migrated once here, not raced by every worker. The workers are spawned
    (fresh interpreters), so the variables set here reach them before prometheus_client is
    imported: that is what puts them in multiprocess mode.
    """
    import tempfile

    import uvicorn

    from service.monitoring.exposition import MULTIPROC_ENV, prepare_multiprocess_dir

    if settings.database.auto_migrate:
        from service.persistence import migrate
        from service.persistence.database import make_engine

        engine = make_engine(settings.database.url.get_secret_value())
        migrate.upgrade(engine)
        engine.dispose()
        os.environ["KDGUARD_DATABASE__AUTO_MIGRATE"] = "false"
    if getattr(args, "config", None):
        os.environ["KDGUARD_CONFIG"] = str(Path(args.config).resolve())
    with contextlib.ExitStack() as stack:
        directory = settings.server.metrics_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="kdguard-metrics-"))
        )
        prepare_multiprocess_dir(directory)
        os.environ[MULTIPROC_ENV] = str(directory.resolve())
        log.info("%d workers; Prometheus multiprocess files in %s", settings.server.workers,
                 directory)  # fmt: skip
        uvicorn.run(
            "service.app:create_app_from_environment",
            factory=True,
            workers=settings.server.workers,
            **options,
        )
    return 0


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from service.demo.digits import ensure_digits
    from service.registry import ModelRegistry

    data_dir: Path = args.data_dir
    settings = settings.model_copy(
        update={
            "data_dir": data_dir,
            "registry": settings.registry.model_copy(update={"root": data_dir / "registry"}),
            "server": settings.server.model_copy(update={"host": args.host, "port": args.port}),
            "model": settings.model.model_copy(update={"name": "digits"}),
            "database": settings.database.model_copy(
                update={"url": SecretStr(f"sqlite:///{data_dir / 'kdguard.db'}")}
            ),
            # Short windows and a short label horizon so the loop is visible in minutes.
            "monitoring": settings.monitoring.model_copy(
                update={
                    "windows": ["1m", "5m"],
                    "interval_s": 5.0,
                    "min_samples": 50,
                    "label_delay_horizon_s": 60.0,
                    # The demo's student agrees with its teacher closely, even on drifted
                    # digits: a tighter flip threshold than the production default.
                    "flip_threshold": 0.03,
                }
            ),
            **_demo_loop(settings),
        }
    )
    registry = ModelRegistry(settings.registry.root)
    if ensure_digits(registry, name="digits", progress=lambda line: print(line, file=sys.stderr)):
        print(f"built the digits teacher and student in {registry.root}", file=sys.stderr)
    if args.build_only:
        return 0
    asyncio.run(_serve_demo(settings, traffic=args.traffic, rate=args.rate, duration=args.duration))
    return 0


DEMO_ADMIN_KEY = "kdguard-demo-admin-key"


def _demo_loop(settings: Settings) -> dict[str, Any]:
    """The closed loop at demo speed: 1-minute windows, short cooldowns, small gates.

    The demo serves with an admin key (printed at start) unless keys are configured, so
    the job and rollout APIs can be watched.
    """
    from service.settings import ApiKey, Scope, TriggerRule

    every = {"window": "1m", "min_samples": 50, "cooldown_s": 180.0}
    rules = [
        TriggerRule(name="miscalibrated", metric="ece", statistic="alert", comparison=">=",
                    value=1.0, consecutive=1, unless_alerting=["accuracy_gap"],
                    action="recalibrate", **every),
        TriggerRule(name="accuracy-gap", metric="accuracy_gap", statistic="ci_low",
                    comparison=">", consecutive=1, action="redistill", **every),
        TriggerRule(name="flips", metric="flip_rate", statistic="ci_low", comparison=">",
                    consecutive=2, matured_only=False, action="redistill", **every),
        TriggerRule(name="entropy-drift", metric="entropy_drift_js", statistic="alert",
                    comparison=">=", value=1.0, consecutive=1, matured_only=False,
                    action="alert_only", **every),
    ]  # fmt: skip
    keys = settings.auth.api_keys or [
        ApiKey(
            name="demo",
            key=SecretStr(DEMO_ADMIN_KEY),
            scopes=[Scope.ADMIN, Scope.PREDICT, Scope.FEEDBACK],
        )
    ]
    return {
        "triggers": settings.triggers.model_copy(update={"rules": rules}),
        "rollout": settings.rollout.model_copy(
            update={"min_pairs": 200, "min_labelled": 50, "sample_rate": 0.5, "ab_share": 0.5}
        ),
        "recording": settings.recording.model_copy(update={"input_sample_rate": 0.5}),
        # More shadow traffic: tighter intervals on the label-free metrics within a minute.
        "routing": settings.routing.model_copy(update={"shadow_rate": 0.5}),
        "auth": settings.auth.model_copy(update={"api_keys": keys}),
    }


async def _serve_demo(settings: Settings, *, traffic: bool, rate: float, duration: float) -> None:
    import uvicorn

    from service.app import create_app

    sys.setswitchinterval(settings.server.gil_switch_interval_s)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.server.host,
        port=settings.server.port,
        loop="none",
        access_log=False,
        log_level=settings.log_level.lower(),
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    base = f"http://{settings.server.host}:{settings.server.port}"
    print(f"kdguard demo: model 'digits' at {base} (try {base}/docs)", file=sys.stderr)
    if any(k.key.get_secret_value() == DEMO_ADMIN_KEY for k in settings.auth.api_keys):
        print(f"admin API key (demo only): {DEMO_ADMIN_KEY}", file=sys.stderr)
    if traffic:
        while not server.started and not serving.done():  # noqa: ASYNC110 - uvicorn sets a bool
            await asyncio.sleep(0.05)
        driver = asyncio.create_task(_drive_demo_traffic(base, rate, duration))
        await serving
        driver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await driver
    else:
        await serving


async def _drive_demo_traffic(base: str, rate: float, duration: float) -> None:
    from service.demo.digits import digits_splits
    from service.demo.traffic import (
        DriftSchedule,
        Phase,
        TrafficGenerator,
        TrafficStats,
        drive,
        send_feedback,
    )

    # A minute of clean digits, then occlusion that stays: the loop has something to repair.
    schedule = DriftSchedule((Phase("clean", 60.0), Phase("occlusion", 1e9, "occlude", 0.7)))
    generator = TrafficGenerator(digits_splits(), schedule, seed=0)
    last_report = 0.0

    def report(stats: TrafficStats) -> None:
        nonlocal last_report
        if stats.elapsed_s - last_report < 10.0:
            return
        last_report = stats.elapsed_s
        served = ", ".join(f"{k} {v}" for k, v in sorted(stats.by_served_by.items()))
        print(
            f"traffic {stats.elapsed_s:5.0f}s phase={stats.phase:<10} sent={stats.sent} "
            f"accuracy={stats.accuracy:.3f} degraded={stats.degraded} labels={stats.labels_sent} "
            f"served_by: {served}",
            file=sys.stderr,
        )

    stats = TrafficStats()
    # Half the true labels come back, 15 s late: the labelled metrics mature behind the rest.
    labels = asyncio.create_task(send_feedback(base, stats, delay_s=15.0, share=0.5))
    watcher = asyncio.create_task(_watch_loop(base))
    try:
        await drive(
            base, rate_per_s=rate, duration_s=duration, generator=generator, on_tick=report,
            stats=stats,
        )  # fmt: skip
    finally:
        labels.cancel()
        watcher.cancel()


async def _watch_loop(base: str, every_s: float = 5.0) -> None:
    """Print each job and rollout change the demo's loop makes, as it happens."""
    import httpx

    seen: dict[str, str] = {}
    headers = {"X-API-Key": DEMO_ADMIN_KEY}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=5.0) as client:
        while True:
            await asyncio.sleep(every_s)
            try:
                jobs = (await client.get("/v1/admin/jobs")).json()
                rollouts = (await client.get("/v1/admin/rollouts")).json()
            except (httpx.HTTPError, ValueError):
                continue
            if not isinstance(jobs, list) or not isinstance(rollouts, list):
                continue  # e.g. keys configured without the demo key: nothing to show
            for job in jobs:
                line = (f"job {job['id']} {job['kind']} ({job['rule']}): {job['status']}"
                        + (f" - {job['error']}" if job["error"] else ""))  # fmt: skip
                if job["status"] == "succeeded" and job["result"]:
                    line += f" {_brief(job['result'])}"
                if seen.get(f"job{job['id']}") != job["status"]:
                    seen[f"job{job['id']}"] = job["status"]
                    print(f"loop: {line}", file=sys.stderr)
            for rollout in rollouts:
                stats = rollout["statistics"]
                state = f"{rollout['stage']}/{stats.get('verdict', '-')}"
                if seen.get(f"rollout{rollout['id']}") != state:
                    seen[f"rollout{rollout['id']}"] = state
                    print(f"loop: rollout {rollout['id']} {rollout['incumbent_version']} -> "
                          f"{rollout['candidate_version']}: {rollout['stage']}, gate "
                          f"{stats.get('verdict', '-')} {'; '.join(stats.get('reasons', []))}",
                          file=sys.stderr)  # fmt: skip


def _brief(result: dict[str, Any]) -> str:
    keys = ("accepted", "temperature", "fallback_threshold", "candidate_version")
    return " ".join(f"{k}={result[k]}" for k in keys if k in result)


def _registry_list(args: argparse.Namespace, settings: Settings) -> int:
    from service.registry import ModelRegistry

    registry = ModelRegistry(settings.registry.root)
    for name in registry.names():
        active = registry.active(name)
        for m in registry.versions(name):
            mark = "*" if active.get(m.role) == m.version else " "
            print(f"{mark} {name}/{m.version}  {m.role:<7}  T={m.temperature:.3f}  {m.created_at}")
    return 0


def _registry_add(args: argparse.Namespace, settings: Settings) -> int:
    from service.backends.onnx import input_spec_of, load_onnx_model
    from service.registry import InputSpec, ModelRegistry

    registry = ModelRegistry(settings.registry.root)
    data = Path(args.file).read_bytes()
    input_name, features, output_name = input_spec_of(data)
    manifest = registry.register(
        name=args.name,
        role=args.role,
        model=data,
        input=InputSpec(name=input_name, features=features),
        output_name=output_name,
        class_names=[c.strip() for c in args.classes.split(",")],
        temperature=args.temperature,
    )
    load_onnx_model(registry, manifest)  # validate now, not at activation time
    print(f"registered {manifest.name}/{manifest.version} ({manifest.role})")
    if args.activate:
        registry.set_active(manifest.name, manifest.role, manifest.version)
        print(f"activated {manifest.name}/{manifest.version}; running servers pick it up "
              "through the admin API")  # fmt: skip
    return 0


def _config(args: argparse.Namespace, settings: Settings) -> int:
    if args.describe:
        print(describe_settings())
        return 0
    print(settings.model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
