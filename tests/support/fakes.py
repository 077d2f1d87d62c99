"""A controllable in-process teacher backend for engine and API tests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from service.backends.onnx import Array
from service.backends.teacher import validate_probabilities
from service.errors import TeacherError
from service.monitoring.records import PredictionBatch, PredictionRecord


@dataclass
class FakeTeacher:
    """Answers with fixed logits per class pattern, or fails / hangs / lags on demand."""

    classes: int = 3
    mode: str = "ok"  # ok | fail | hang | slow | nan | wrong_classes
    delay_s: float = 0.0
    version: str = "fake-1"
    calls: list[int] = field(default_factory=list)  # rows per call
    concurrent: int = 0
    max_concurrent: int = 0
    closed: bool = False

    async def probabilities(self, x: Array, timeout_s: float) -> Array:
        self.calls.append(len(x))
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            if self.mode == "hang":
                await asyncio.Event().wait()
            if self.mode == "slow" or self.delay_s:
                await asyncio.sleep(self.delay_s)
            if self.mode == "fail":
                raise TeacherError("connect", "fake teacher is down")
            logits = np.zeros((len(x), self.classes), np.float32)
            # The teacher is sure of the class of the largest feature.
            logits[np.arange(len(x)), x[:, : self.classes].argmax(axis=1)] = 10.0
            if self.mode == "nan":
                logits[0, 0] = np.nan
            if self.mode == "wrong_classes":
                logits = np.zeros((len(x), self.classes + 1), np.float32)
            return validate_probabilities(
                logits, rows=len(x), num_classes=self.classes, are_logits=True
            )
        finally:
            self.concurrent -= 1

    async def warm_up(self, features: int) -> None:
        return None

    async def aclose(self) -> None:
        self.closed = True


@dataclass
class ListRecorder:
    records: list[PredictionRecord] = field(default_factory=list)

    batches: list[PredictionBatch] = field(default_factory=list)

    def record(self, batch: PredictionBatch) -> None:
        self.batches.append(batch)
        self.records.extend(batch.rows())
