"""What a job body gets to work with, and what it gives back."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import Engine

from service.registry import ModelRegistry
from service.settings import Settings

Progress = Callable[[float, str], None]
"""Report progress: a fraction in [0, 1] and a short human-readable message."""


class JobCancelled(Exception):
    """Raised by `JobContext.report` when the job was cancelled; bodies let it propagate."""


@dataclass(frozen=True)
class JobContext:
    """One job's inputs.

    `model` is the deployment name (the student is `model`, its teacher `model-teacher`
    unless configured otherwise); `params` are the job's own parameters (from its trigger
    rule, the admin API or the CLI) and `evidence` the metric windows that fired it.
    `now` is the job's reference time (seconds since the epoch): bodies select data
    created before it, so a job re-run on the same database sees the same rows.
    """

    job_id: int
    kind: str
    model: str
    settings: Settings
    database: Engine
    registry: ModelRegistry
    now: float
    params: Mapping[str, Any] = field(default_factory=dict)
    evidence: Mapping[str, Any] = field(default_factory=dict)
    progress: Progress = lambda fraction, message: None

    def report(self, fraction: float, message: str) -> None:
        self.progress(min(max(fraction, 0.0), 1.0), message)


class JobBody(Protocol):
    def __call__(self, ctx: JobContext) -> dict[str, Any]: ...
