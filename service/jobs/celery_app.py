"""The Celery application behind `kdguard worker` and the celery runner.

One task, `kdguard.run_job(job_id)`, which runs the same `execute_job` as every other
runner. Acknowledged late and not retried: a worker that dies mid-job leaves the job
running with a stale heartbeat, and the controller fails it, rather than running a
training job twice behind the user's back.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from service.settings import Settings, load_settings


def make_celery(settings: Settings) -> Celery:
    app = Celery("kdguard", broker=settings.jobs.broker_url.get_secret_value())
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.jobs.queue,
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
    )

    @app.task(name="kdguard.run_job")  # type: ignore[untyped-decorator]
    def run_job(job_id: int) -> str:
        from service.jobs.execute import execute_job

        return execute_job(settings, job_id, runner="celery").status

    return app


def worker_main(settings: Settings | None = None, argv: list[str] | None = None) -> None:
    """Run a worker on the configured queue (what `kdguard worker` does)."""
    app = make_celery(settings or load_settings())
    args: list[Any] = [
        "worker",
        "--loglevel=INFO",
        "--concurrency=1",
        "-Q",
        app.conf.task_default_queue,
    ]
    app.worker_main(argv or args)
