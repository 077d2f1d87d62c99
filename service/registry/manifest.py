"""The manifest that describes one model version on disk."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from service.errors import ModelValidationError
from service.settings import NAME_PATTERN

Role = Literal["student", "teacher"]
ROLES: tuple[Role, ...] = ("student", "teacher")
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class InputSpec:
    """The one input tensor a model takes: batch dimension first, then features."""

    name: str
    features: int
    dtype: str = "float32"

    @property
    def shape(self) -> tuple[int, int]:
        """OIP-style shape: -1 for the variable batch dimension."""
        return (-1, self.features)


@dataclass(frozen=True)
class Manifest:
    """Everything needed to load, check and describe one model version.

    `temperature` is the serving temperature T_s (changed by recalibration);
    `reference_temperature` is frozen at registration so entropy drift is measured at a
    fixed T_ref and recalibration does not look like drift.
    """

    name: str
    version: str
    role: Role
    sha256: str
    input: InputSpec
    output_name: str
    class_names: tuple[str, ...]
    temperature: float = 1.0
    reference_temperature: float = 1.0
    format: Literal["onnx"] = "onnx"
    file: str = MODEL_FILE
    created_at: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            raw = json.loads(text)
            spec = raw.pop("input")
            manifest = cls(
                input=InputSpec(**spec),
                class_names=tuple(raw.pop("class_names")),
                **raw,
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise ModelValidationError(f"unreadable manifest: {exc}") from exc
        manifest.check()
        return manifest

    def check(self) -> None:
        """Static checks that need no model file."""
        for label, value in (("name", self.name), ("version", self.version)):
            if not NAME_PATTERN.match(value):
                raise ModelValidationError(f"manifest {label} {value!r} is not a safe name")
        if self.role not in ROLES:
            raise ModelValidationError(f"manifest role {self.role!r} is not one of {ROLES}")
        if self.file != MODEL_FILE or self.format != "onnx":
            raise ModelValidationError("only ONNX files named model.onnx are accepted")
        if len(self.sha256) != 64:
            raise ModelValidationError("manifest sha256 must be 64 hex digits")
        if self.num_classes < 2:
            raise ModelValidationError("a classifier needs at least two class names")
        if self.input.features < 1 or self.input.dtype != "float32":
            raise ModelValidationError("input must be float32 with at least one feature")
        for label, t in (
            ("temperature", self.temperature),
            ("reference", self.reference_temperature),
        ):
            if not 0.05 <= t <= 20.0:
                raise ModelValidationError(f"{label} temperature {t} outside [0.05, 20]")
