"""Which student version serves: validated activation with an atomic swap under traffic."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from service.backends.onnx import OnnxModel, load_onnx_model
from service.errors import KdguardError, ModelValidationError
from service.monitoring.instruments import Instruments
from service.registry import Manifest, ModelRegistry
from service.routing.engine import InferenceEngine

log = logging.getLogger(__name__)


class Deployment:
    """The serving deployment of one model name: its registry entries and its engine."""

    def __init__(
        self, *, registry: ModelRegistry, engine: InferenceEngine, instruments: Instruments
    ) -> None:
        self.registry = registry
        self.engine = engine
        self.name = engine.model_name
        self._activations = instruments.activations
        self._lock = asyncio.Lock()

    async def activate_student(self, version: str) -> Manifest:
        """Load, validate and warm `version` off the event loop, then swap it in.

        Until the swap the current version keeps serving; a version that fails any check
        is refused and nothing changes. Activations are serialised.
        """
        async with self._lock:
            try:
                manifest = self.registry.manifest(self.name, version)
                model = await asyncio.to_thread(load_onnx_model, self.registry, manifest)
                self._check_compatible(model)
            except KdguardError:
                self._activations.labels(self.name, "student", "failed").inc()
                raise
            self.registry.set_active(self.name, "student", version)
            old = self.engine.swap_student(model)
            self._activations.labels(self.name, "student", "succeeded").inc()
            log.info("student %s/%s active (was %s)", self.name, version, old.version)
            return manifest

    async def load_candidate(self, version: str) -> OnnxModel:
        """Load and validate a version to run beside the active one (a rollout)."""
        manifest = self.registry.manifest(self.name, version)
        model = await asyncio.to_thread(load_onnx_model, self.registry, manifest)
        self._check_compatible(model)
        return model

    def set_temperature(self, temperature: float) -> None:
        """Serve the active student at a new temperature T_s (a recalibration), no reload.

        T_ref stays as registered, so entropy drift is unaffected.
        """
        current = self.engine.student
        if current.manifest.temperature == temperature:
            return
        manifest = dataclasses.replace(current.manifest, temperature=temperature)
        self.engine.swap_student(dataclasses.replace(current, manifest=manifest))
        log.info("student %s/%s now at T=%.4f", self.name, current.version, temperature)

    def _check_compatible(self, model: OnnxModel) -> None:
        current = self.engine.student.manifest
        new = model.manifest
        if new.role != "student":
            raise ModelValidationError(f"{new.name}/{new.version} is a {new.role}, not a student")
        if new.input.features != current.input.features:
            raise ModelValidationError(
                f"version {new.version} takes {new.input.features} features; clients send "
                f"{current.input.features}"
            )
        if new.class_names != current.class_names:
            raise ModelValidationError(
                f"version {new.version} has different classes from the serving version"
            )
