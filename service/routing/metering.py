"""The engine's view of its Prometheus instruments, with label children bound once.

`.labels()` costs a lock and a dict lookup; on the request path we reuse bound children.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter

from service.backends.onnx import Array, OnnxModel
from service.monitoring.instruments import Instruments

if TYPE_CHECKING:
    from service.routing.engine import Answer


class Meter:
    def __init__(self, instruments: Instruments, model: str) -> None:
        self._m = instruments
        self._model = model
        latency = instruments.latency
        self._student_s = latency.labels(model, "student")
        self._teacher_s = latency.labels(model, "teacher")
        self._shadow_s = latency.labels(model, "shadow")
        self._total_s = latency.labels(model, "total")
        self._confidence = instruments.confidence.labels(model)
        self._entropy = instruments.entropy.labels(model)
        self._fallback_served = instruments.fallbacks.labels(model, "teacher")
        self._fallback_degraded = instruments.fallbacks.labels(model, "degraded")
        self._shadow_sampled = instruments.shadow_sampled.labels(model)
        self._predictions: dict[tuple[str, str, bool], Counter] = {}

    def request(
        self,
        answer: Answer,
        student_seconds: float,
        total_seconds: float,
        teacher_seconds: float | None,
    ) -> None:
        self._student_s.observe(student_seconds)
        self._total_s.observe(total_seconds)
        if teacher_seconds is not None:
            self._teacher_s.observe(teacher_seconds)
        n = len(answer)
        by_teacher = int(answer.by_teacher.sum())
        degraded = int(answer.degraded.sum())
        version = answer.model_version
        for served_by, is_degraded, count in (
            ("student", False, n - by_teacher - degraded),
            ("teacher", False, by_teacher),
            ("student", True, degraded),
        ):
            if count:
                self._prediction_counter(version, served_by, is_degraded).inc(count)

    def _prediction_counter(self, version: str, served_by: str, degraded: bool) -> Counter:
        key = (version, served_by, degraded)
        child = self._predictions.get(key)
        if child is None:
            outcome = "degraded" if degraded else "ok"
            child = self._m.predictions.labels(self._model, version, served_by, outcome)
            self._predictions[key] = child
        return child

    def student_outputs(self, confidence: Array, entropy: Array) -> None:
        for c in confidence.tolist():
            self._confidence.observe(c)
        for h in entropy.tolist():
            self._entropy.observe(h)

    def fallback(self, rows: int, *, served: bool) -> None:
        (self._fallback_served if served else self._fallback_degraded).inc(rows)

    def shadow_sampled(self, rows: int) -> None:
        self._shadow_sampled.inc(rows)

    def shadow_seconds(self, seconds: float) -> None:
        self._shadow_s.observe(seconds)

    def routing(self, fallback_threshold: float, shadow_rate: float) -> None:
        self._m.fallback_threshold.labels(self._model).set(fallback_threshold)
        self._m.shadow_rate.labels(self._model).set(shadow_rate)

    def loaded(self, model: OnnxModel, *, kind: str) -> None:
        self._m.model_info.labels(self._model, model.version, kind).set(1)
        if kind == "student":
            self._m.temperature.labels(self._model, model.version).set(model.manifest.temperature)

    def unloaded(self, model: OnnxModel, *, kind: str) -> None:
        self._m.model_info.labels(self._model, model.version, kind).set(0)

    def loaded_teacher(self, version: str) -> None:
        self._m.model_info.labels(self._model, version, "teacher").set(1)
