"""Teacher targets for the re-distillation transfer set.

Targets are the teacher's log-probabilities at its serving temperature: for a recorded
output q that is log q, for a teacher run here it is log softmax(z / T_teacher); both
differ from the teacher's scaled logits by a per-row constant, which the KD loss ignores.

- `teacher_targets="logged"` (default): the output recorded at serving time where there
  is one (fallback and shadow requests), else the local teacher run on the logged input.
  Without a local teacher (remote mode) rows with no recorded output are left out, and
  the rest carry weights 1/π in the gate metrics (they are a π-sample of traffic).
- `teacher_targets="run"`: the local teacher run on every row (exact, no float16).
- `average_teacher_versions`: every registered teacher version that answered logged
  traffic (and the current one) runs on every row; the targets are the log of their
  mean probabilities.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from service.backends.onnx import load_onnx_model
from service.errors import NotFoundError
from service.jobs.context import JobContext
from service.jobs.redistill_options import RedistillOptions
from service.persistence.transfer import TransferRows
from service.registry import Manifest, ModelRegistry
from service.training.recipe import (
    average_teacher_logits,
    logits_from_probs,
    logits_from_teacher,
)

FloatArray = npt.NDArray[np.float64]
CHUNK_ROWS = 4096


@dataclass(frozen=True, eq=False)
class Targets:
    """The rows kept and, row for row, the teacher's log-probabilities and a weight."""

    rows: TransferRows
    logits: FloatArray
    weights: FloatArray
    name: str
    version: str
    method: str
    sources: dict[str, int]
    logged_versions: dict[str, int]
    averaged_versions: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        """For the run manifest."""
        return {
            "name": self.name,
            "version": self.version,
            "method": self.method,
            "sources": self.sources,
            "logged_versions": self.logged_versions,
            "averaged_versions": self.averaged_versions,
            "dropped": self.dropped,
            "notes": self.notes,
        }


def teacher_targets(ctx: JobContext, rows: TransferRows, options: RedistillOptions) -> Targets:
    """Targets for `rows` as `options` ask (see the module docstring)."""
    name = ctx.settings.teacher_name
    local = local_teacher(ctx)
    recorded = rows.recorded
    seen = Counter(
        v or "unknown" for v, r in zip(rows.teacher_versions, recorded, strict=True) if r
    )
    logged_versions = dict(sorted(seen.items()))
    notes: list[str] = []
    if options.average_teacher_versions:
        versions = _runnable(ctx.registry, name, [*logged_versions, *_version_of(local)])
        if len(versions) >= 2:
            logits = average_teacher_logits(
                [_run(ctx.registry, v, rows.x, options.threads) for v in versions]
            )
            return Targets(
                rows=rows, logits=logits, weights=np.ones(len(rows)), name=name,
                version="+".join(v.version for v in versions),
                method="mean probabilities of the teacher versions run on every row",
                sources={"run": len(rows)}, logged_versions=logged_versions,
                averaged_versions=[v.version for v in versions],
            )  # fmt: skip
        found = [v.version for v in versions]
        notes.append(f"averaging needs two registered teacher versions, found {found}")
    if options.teacher_targets == "run":
        if local is None:
            raise ValueError(
                f"teacher_targets='run' needs a local teacher; {name!r} is not in the registry "
                f"or the teacher is remote (teacher.mode={ctx.settings.teacher.mode!r})"
            )
        return Targets(
            rows=rows, logits=_run(ctx.registry, local, rows.x, options.threads),
            weights=np.ones(len(rows)), name=name, version=local.version,
            method="the local teacher run on every row", sources={"run": len(rows)},
            logged_versions=logged_versions, notes=notes,
        )  # fmt: skip
    return _logged_first(ctx.registry, rows, local, name, logged_versions, notes, options)


def local_teacher(ctx: JobContext) -> Manifest | None:
    """The teacher this deployment runs in-process, or None (remote, none, or missing)."""
    settings = ctx.settings
    if settings.teacher.mode != "local":
        return None
    try:
        if settings.teacher.local_version is not None:
            return ctx.registry.manifest(settings.teacher_name, settings.teacher.local_version)
        return ctx.registry.active_manifest(settings.teacher_name, "teacher")
    except NotFoundError:
        return None


def _logged_first(
    registry: ModelRegistry,
    rows: TransferRows,
    local: Manifest | None,
    name: str,
    logged_versions: dict[str, int],
    notes: list[str],
    options: RedistillOptions,
) -> Targets:
    recorded = rows.recorded
    logits = np.zeros(rows.teacher_probs.shape)
    logits[recorded] = logits_from_probs(rows.teacher_probs[recorded])
    missing = ~recorded
    if local is not None:
        if missing.any():
            logits[missing] = _run(registry, local, rows.x[missing], options.threads)
        return Targets(
            rows=rows, logits=logits, weights=np.ones(len(rows)), version=local.version,
            method="logged teacher outputs where recorded, else the local teacher run",
            sources={"logged": int(recorded.sum()), "run": int(missing.sum())}, name=name,
            logged_versions=logged_versions, notes=notes,
        )  # fmt: skip
    # Only teacher-observed rows can stay: a π-sample of traffic, hence weights 1/π.
    keep = np.flatnonzero(recorded)
    pi = rows.inclusion_probability[keep]
    weights = np.where(np.isfinite(pi) & (pi > 0), 1.0 / np.where(pi > 0, pi, 1.0), 1.0)
    version = max(logged_versions, key=lambda v: logged_versions[v]) if logged_versions else "none"
    return Targets(
        rows=rows.take(keep), logits=logits[keep], weights=weights, version=version,
        method="logged teacher outputs only (no local teacher); gate metrics weighted 1/pi",
        sources={"logged": len(keep)}, dropped={"no_teacher_output": int(missing.sum())},
        name=name, logged_versions=logged_versions, notes=notes,
    )  # fmt: skip


def _version_of(manifest: Manifest | None) -> list[str]:
    return [] if manifest is None else [manifest.version]


def _runnable(registry: ModelRegistry, name: str, versions: list[str]) -> list[Manifest]:
    """The registered teacher versions among `versions` (each once, in version order)."""
    try:
        registered = {m.version: m for m in registry.versions(name, "teacher")}
    except NotFoundError:
        return []
    return [m for version, m in registered.items() if version in set(versions)]


def _run(
    registry: ModelRegistry, manifest: Manifest, x: npt.NDArray[np.float32], threads: int
) -> FloatArray:
    """The teacher version's log-probabilities at its serving temperature."""
    model = load_onnx_model(registry, manifest, threads=threads)
    parts = [
        logits_from_teacher(
            model.logits(np.ascontiguousarray(x[i : i + CHUNK_ROWS])), manifest.temperature
        )
        for i in range(0, len(x), CHUNK_ROWS)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, manifest.num_classes))
