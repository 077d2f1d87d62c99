"""`kdguard job`, `kdguard jobs`, `kdguard rollout` and `kdguard worker`.

They act on the database directly, through the same repository functions as the admin
API; running servers follow every change within `jobs.apply_interval_s`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection

from service.errors import BadInputError, NotFoundError
from service.persistence import loop
from service.persistence.database import make_engine
from service.settings import Settings

T = TypeVar("T")
KINDS = ("recalibrate", "retune_threshold", "redistill")


def add_commands(commands: Any) -> None:
    job = commands.add_parser("job", help="run one job in this process")
    job.add_argument("--config", type=Path, help="YAML settings file")
    job_actions = job.add_subparsers(dest="action", required=True)
    run = job_actions.add_parser("run", help="execute job ID here, with a progress bar")
    run.add_argument("id", type=int)
    run.set_defaults(handler=_job_run)

    jobs = commands.add_parser("jobs", help="list, show, trigger and cancel jobs")
    jobs.add_argument("--config", type=Path, help="YAML settings file")
    actions = jobs.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="jobs, newest first")
    listing.add_argument("--status", action="append", help="filter by status (repeatable)")
    listing.add_argument("--kind", choices=KINDS)
    listing.set_defaults(handler=_jobs_list)
    show = actions.add_parser("show", help="one job as JSON")
    show.add_argument("id", type=int)
    show.set_defaults(handler=_jobs_show)
    trigger = actions.add_parser("trigger", help="create a job by hand")
    trigger.add_argument("kind", choices=KINDS)
    trigger.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE",
        help="a job parameter (JSON, or a bare string), e.g. --param mode=budget",
    )  # fmt: skip
    trigger.add_argument("--run", action="store_true", help="run it here instead of on a server")
    trigger.set_defaults(handler=_jobs_trigger)
    cancel = actions.add_parser("cancel", help="cancel a pending or running job")
    cancel.add_argument("id", type=int)
    cancel.set_defaults(handler=_jobs_cancel)

    rollout = commands.add_parser("rollout", help="list, start, advance, promote, roll back")
    rollout.add_argument("--config", type=Path, help="YAML settings file")
    steps = rollout.add_subparsers(dest="action", required=True)
    steps.add_parser("list", help="rollouts, newest first").set_defaults(handler=_rollout_list)
    start = steps.add_parser("start", help="put a registered candidate version in shadow")
    start.add_argument("version")
    start.set_defaults(handler=_rollout_start)
    for name, helptext in (("advance", "shadow → A/B"), ("promote", "make it serve"),
                           ("rollback", "take it out of traffic")):  # fmt: skip
        step = steps.add_parser(name, help=helptext)
        step.add_argument("id", type=int)
        step.set_defaults(handler=_rollout_step, step=name)

    worker = commands.add_parser("worker", help="a Celery worker that executes jobs")
    worker.add_argument("--config", type=Path, help="YAML settings file")
    worker.set_defaults(handler=_worker)


def _db(settings: Settings, work: Callable[[Connection], T]) -> T:
    engine = make_engine(settings.database.url.get_secret_value())
    try:
        with engine.begin() as connection:
            return work(connection)
    finally:
        engine.dispose()


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


class ProgressBar:
    """A one-line bar on a terminal; a line per 10% step otherwise (logs, CI)."""

    def __init__(self, stream: Any = sys.stderr, width: int = 30) -> None:
        self._stream, self._width = stream, width
        self._tty = bool(getattr(stream, "isatty", lambda: False)())
        self._last_step = -1

    def __call__(self, fraction: float, message: str) -> None:
        if self._tty:
            filled = int(fraction * self._width)
            bar = "#" * filled + "." * (self._width - filled)
            self._stream.write(f"\r[{bar}] {fraction:4.0%} {message[:60]:<60}")
            self._stream.flush()
            return
        step = int(fraction * 10)
        if step > self._last_step:
            self._last_step = step
            print(f"{fraction:4.0%} {message}", file=self._stream)

    def done(self) -> None:
        if self._tty:
            self._stream.write("\n")


def _job_run(args: argparse.Namespace, settings: Settings) -> int:
    from service.jobs.execute import execute_job

    bar = ProgressBar()
    job = execute_job(settings, args.id, runner="cli", on_progress=bar)
    bar.done()
    _print_json({"id": job.id, "status": job.status, "result": job.result, "error": job.error})
    return 0 if job.status == "succeeded" else 1


def _job_json(job: loop.JobRow) -> dict[str, Any]:
    return {k: v for k, v in vars(job).items() if k != "heartbeat_at"}


def _jobs_list(args: argparse.Namespace, settings: Settings) -> int:
    jobs = _db(settings, lambda c: loop.list_jobs(c, model=settings.model.name,
                                                  status=args.status, kind=args.kind))  # fmt: skip
    for job in jobs:
        print(f"{job.id:>5}  {job.kind:<17} {job.status:<10} {job.progress:4.0%}  "
              f"{job.rule or '':<24} {job.error or job.progress_message or ''}")  # fmt: skip
    return 0


def _jobs_show(args: argparse.Namespace, settings: Settings) -> int:
    _print_json(_job_json(_db(settings, lambda c: loop.get_job(c, args.id))))
    return 0


def _params(pairs: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BadInputError(f"--param takes KEY=VALUE, got {pair!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value  # a bare word is a string
    return params


def _jobs_trigger(args: argparse.Namespace, settings: Settings) -> int:
    params = _params(args.param)
    job = _db(
        settings,
        lambda c: loop.create_job(
            c, model=settings.model.name, kind=args.kind, rule=f"manual:{args.kind}",
            params=params, evidence={"manual": True, "actor": "cli"}, actor="cli",
        ),
    )  # fmt: skip
    print(f"job {job.id} ({job.kind}) pending", file=sys.stderr)
    if args.run:
        args.id = job.id
        return _job_run(args, settings)
    _print_json(_job_json(job))
    return 0


def _jobs_cancel(args: argparse.Namespace, settings: Settings) -> int:
    job = _db(settings, lambda c: loop.cancel_job(c, args.id, actor="cli"))
    print(f"job {job.id}: {job.status}{' (stop requested)' if job.cancel_requested else ''}")
    return 0


def _rollout_json(row: loop.RolloutRow) -> dict[str, Any]:
    return dict(vars(row))


def _rollout_list(args: argparse.Namespace, settings: Settings) -> int:
    for row in _db(settings, lambda c: loop.list_rollouts(c, settings.model.name)):
        verdict = row.statistics.get("verdict", "-")
        print(f"{row.id:>4}  {row.incumbent_version:>6} → {row.candidate_version:<6} "
              f"{row.stage:<12} share={row.traffic_share:.2f}  gate={verdict}")  # fmt: skip
    return 0


def _rollout_start(args: argparse.Namespace, settings: Settings) -> int:
    from service.backends.onnx import load_onnx_model
    from service.registry import ModelRegistry

    registry = ModelRegistry(settings.registry.root)
    load_onnx_model(registry, registry.manifest(settings.model.name, args.version))  # validate

    def work(connection: Connection) -> loop.RolloutRow:
        state = loop.read_state(connection, settings.model.name)
        if state is None:
            raise NotFoundError("no serving state yet: start the server once first")
        return loop.create_rollout(
            connection, model=settings.model.name, candidate_version=args.version,
            incumbent_version=state.student_version,
            config=settings.rollout.model_dump(mode="json"), actor="cli",
        )  # fmt: skip

    _print_json(_rollout_json(_db(settings, work)))
    return 0


def _rollout_step(args: argparse.Namespace, settings: Settings) -> int:
    from service.jobs.controller import advance_rollout, promote_rollout, rollback_rollout
    from service.registry import ModelRegistry

    registry = ModelRegistry(settings.registry.root)

    def work(connection: Connection) -> loop.RolloutRow:
        if args.step == "advance":
            return advance_rollout(connection, args.id, actor="cli",
                                   default_share=settings.rollout.ab_share)  # fmt: skip
        if args.step == "promote":
            return promote_rollout(connection, registry, args.id, actor="cli")
        return rollback_rollout(connection, args.id, actor="cli")

    row = _db(settings, work)
    print(f"rollout {row.id}: {row.stage} (servers follow within "
          f"{settings.jobs.apply_interval_s:.0f} s)")  # fmt: skip
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from service.jobs.celery_app import worker_main

    worker_main(settings)
    return 0
