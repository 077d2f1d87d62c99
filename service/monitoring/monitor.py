"""The monitor loop: evaluate metric windows, store them, and set the quality gauges.

Windows are tumbling, aligned to the epoch and keyed on prediction time. Each pass
re-evaluates the current window and every earlier one that has not matured yet (labels
arrive late), upserts a `metric_windows` row per metric, and sets the gauges from the
same numbers: label-free metrics from the current window, labelled ones (gap, ECE) from
the latest matured window. On PostgreSQL one replica evaluates at a time (a transaction
advisory lock); SQLite is single-process.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, delete, func, insert, select

from service.monitoring.instruments import Instruments
from service.monitoring.metrics import FINE_BINS, EntropyReference, MetricValue
from service.persistence.aggregates import WindowStats, window_stats
from service.persistence.database import is_postgres
from service.persistence.tables import EntropyReferenceRow, MetricWindow
from service.registry import Manifest, ModelRegistry
from service.settings import MonitoringSettings, duration_seconds

log = logging.getLogger(__name__)

LABELLED = frozenset({"accuracy_gap", "ece"})
_ADVISORY_KEY = 0x6B64677561726400  # "kdguard\0": one evaluator across replicas
_STATE_CODE = {"ok": 0.0, "alert": 1.0, "insufficient": -1.0}


@dataclass(frozen=True)
class Window:
    name: str
    start: float
    end: float
    rows: int
    label_completeness: float
    matured: bool
    values: dict[str, MetricValue]


class Monitor:
    def __init__(
        self,
        *,
        database: Engine,
        settings: MonitoringSettings,
        model: str,
        student: Callable[[], Manifest],
        registry: ModelRegistry,
        instruments: Instruments,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = database
        self._settings = settings
        self._model = model
        self._student = student
        self._registry = registry
        self._gauges = instruments
        self._clock = clock
        self._lengths = {w: duration_seconds(w) for w in settings.windows}

    async def run(self) -> None:
        """Evaluate forever; a failing pass is logged and the next one tried."""
        while True:
            await asyncio.sleep(self._settings.interval_s)
            try:
                await asyncio.to_thread(self.evaluate)
            except Exception:  # a database outage must not end monitoring
                log.exception("monitor pass failed")

    def evaluate(self) -> list[Window]:
        """One pass over every configured window; [] if another replica holds the lock."""
        now = self._clock()
        with self._db.begin() as connection:
            if (
                is_postgres(self._db)
                and not connection.execute(
                    select(func.pg_try_advisory_xact_lock(_ADVISORY_KEY))
                ).scalar()
            ):
                return []
            reference = self._reference(connection, now)
            windows = [
                window
                for name, length in self._lengths.items()
                for window in self._evaluate_window(connection, name, length, now, reference)
            ]
        self._set_gauges(windows)
        return windows

    def _evaluate_window(
        self,
        connection: Connection,
        name: str,
        length: float,
        now: float,
        reference: EntropyReference | None,
    ) -> list[Window]:
        """The current and previous windows, and every stored one still waiting for labels."""
        current = math.floor(now / length) * length
        pending = connection.execute(
            select(MetricWindow.window_start)
            .where(
                MetricWindow.model == self._model,
                MetricWindow.window == name,
                MetricWindow.matured.is_(False),
                MetricWindow.window_start < current - length,
            )
            .distinct()
        ).scalars()
        out = []
        for start in sorted({current, current - length, *pending}):
            window = self._compute(connection, name, start, start + length, now, reference)
            if window.rows:
                self._store(connection, window, now)
                out.append(window)
        return out

    def _compute(
        self,
        connection: Connection,
        name: str,
        start: float,
        end: float,
        now: float,
        reference: EntropyReference | None,
    ) -> Window:
        s = self._settings
        stats = window_stats(connection, model=self._model, start=start, end=end)
        kappa = stats.label_completeness
        matured = end <= now and (
            kappa >= s.label_completeness_target or now - end >= s.label_delay_horizon_s
        )
        values = {
            "flip_rate": stats.flip.result(s.flip_threshold, min_n=s.min_samples),
            "accuracy_gap": stats.gap.result(s.gap_threshold, min_n=s.min_samples),
            "teacher_gap": stats.teacher_gap.result(min_n=s.min_samples),
            "ece": stats.calibration.result(floor=s.ece_floor, min_n=s.min_samples),
        }
        if reference is not None:
            values["entropy_drift_js"] = stats.drift(reference).result(
                reference, min_n=s.min_samples, w1_floor=s.drift_w1_floor
            )
        return Window(name, start, end, stats.rows, kappa, matured, values)

    def _store(self, connection: Connection, window: Window, now: float) -> None:
        connection.execute(
            delete(MetricWindow).where(
                MetricWindow.model == self._model,
                MetricWindow.window == window.name,
                MetricWindow.window_start == window.start,
            )
        )
        for metric, value in window.values.items():
            connection.execute(
                insert(MetricWindow).values(
                    model=self._model,
                    metric=metric,
                    window=window.name,
                    window_start=window.start,
                    window_end=window.end,
                    value=_finite(value.value),
                    ci_low=_finite(value.ci_low),
                    ci_high=_finite(value.ci_high),
                    n=value.n,
                    n_eff=value.n_eff,
                    threshold=None if value.threshold is None else _finite(value.threshold),
                    state=value.state,
                    label_completeness=window.label_completeness,
                    matured=window.matured,
                    computed_at=now,
                    details=_json_details(value),
                )
            )

    def _set_gauges(self, windows: list[Window]) -> None:
        newest: dict[str, Window] = {}
        shown: dict[tuple[str, str], MetricValue] = {}
        for window in sorted(windows, key=lambda w: w.start):
            newest[window.name] = window
            for metric, value in window.values.items():
                if metric in LABELLED and not window.matured:
                    continue  # labelled metrics are shown (and alert) on matured windows only
                shown[(window.name, metric)] = value
        for (name, metric), value in shown.items():
            gauges = self._gauges.quality[metric]
            gauges.value.labels(self._model, name).set(value.value)
            gauges.ci_low.labels(self._model, name).set(value.ci_low)
            gauges.ci_high.labels(self._model, name).set(value.ci_high)
            threshold = math.nan if value.threshold is None else value.threshold
            gauges.threshold.labels(self._model, name).set(threshold)
            gauges.samples.labels(self._model, name).set(value.n)
            gauges.effective_samples.labels(self._model, name).set(value.n_eff)
            gauges.alert.labels(self._model, name).set(_STATE_CODE[value.state])
        for name, window in newest.items():
            self._gauges.label_completeness.labels(self._model, name).set(window.label_completeness)

    def _reference(self, connection: Connection, now: float) -> EntropyReference | None:
        """The frozen reference of the serving student version, frozen on first need."""
        manifest = self._student()
        frozen = connection.execute(
            select(EntropyReferenceRow.reference).where(
                EntropyReferenceRow.model == self._model,
                EntropyReferenceRow.version == manifest.version,
            )
        ).scalar_one_or_none()
        if frozen is not None:
            return _reference_from_json(frozen)
        stored = self._registry.load_reference(manifest)
        if stored is not None:
            entropies, source = stored
        else:  # no held-out set: freeze the traffic seen so far (the "first deployment" window)
            counts = window_stats(connection, model=self._model, start=0.0, end=now)
            if counts.rows < self._settings.reference_min_samples:
                return None
            entropies, source = _entropies_from_fine(counts), "traffic"
        reference = EntropyReference.fit(np.asarray(entropies))
        connection.execute(
            insert(EntropyReferenceRow).values(
                model=self._model,
                version=manifest.version,
                source=source,
                n=reference.n,
                created_at=now,
                reference=_reference_to_json(reference),
            )
        )
        log.info("froze the entropy reference of %s/%s from %s (n=%d)",
                 self._model, manifest.version, source, reference.n)  # fmt: skip
        return reference


def _entropies_from_fine(stats: WindowStats) -> list[float]:
    centres = (np.arange(FINE_BINS) + 0.5) / FINE_BINS
    return np.repeat(centres, stats.entropy_fine_counts).tolist()


def _reference_to_json(reference: EntropyReference) -> dict[str, object]:
    return {
        "edges": reference.edges.tolist(),
        "shares": reference.shares.tolist(),
        "n": reference.n,
        "fine_counts": reference.fine_counts.tolist(),
    }


def _reference_from_json(data: dict[str, Any]) -> EntropyReference:
    return EntropyReference(
        edges=np.asarray(data["edges"], dtype=np.float64),
        shares=np.asarray(data["shares"], dtype=np.float64),
        n=int(data["n"]),
        fine_counts=np.asarray(data["fine_counts"], dtype=np.int64),
    )


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _json_details(value: MetricValue) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, item in value.details.items():
        if isinstance(item, list):
            out[key] = [v if math.isfinite(v) else None for v in item]
        else:
            out[key] = _finite(float(item))
    return out
