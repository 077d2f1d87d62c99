"""Model versions on disk: `<root>/<name>/<version>/{manifest.json, model.onnx}`.

Writes are atomic (a version is built in a temporary directory and renamed into place;
the active pointer is replaced with `os.replace`), names are checked against a strict
pattern, and every path is resolved and checked to stay under the root, so a client can
only ever name a version, never a path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.errors import ConflictError, ModelValidationError, NotFoundError
from service.registry.manifest import MANIFEST_FILE, MODEL_FILE, InputSpec, Manifest, Role
from service.settings import NAME_PATTERN

ACTIVE_FILE = "active.json"
REFERENCE_FILE = "reference.json"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ModelRegistry:
    """A directory of model versions with one active version per (name, role)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    # -- paths -------------------------------------------------------------------------

    def _dir(self, *parts: str) -> Path:
        for part in parts:
            if not NAME_PATTERN.match(part):
                raise NotFoundError(f"{part!r} is not a valid model name or version")
        path = self.root.joinpath(*parts).resolve()
        if not path.is_relative_to(self.root):
            raise NotFoundError("path escapes the registry")
        return path

    def model_path(self, manifest: Manifest) -> Path:
        return self._dir(manifest.name, manifest.version) / MODEL_FILE

    # -- reading -----------------------------------------------------------------------

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and NAME_PATTERN.match(p.name)
        )

    def manifest(self, name: str, version: str) -> Manifest:
        path = self._dir(name, version) / MANIFEST_FILE
        if not path.is_file():
            raise NotFoundError(f"model {name!r} has no version {version!r}")
        manifest = Manifest.from_json(path.read_text())
        if (manifest.name, manifest.version) != (name, version):
            raise ModelValidationError(f"manifest at {name}/{version} names another version")
        return manifest

    def versions(self, name: str, role: Role | None = None) -> list[Manifest]:
        """All versions of a model, oldest first (numeric versions in numeric order)."""
        base = self._dir(name)
        if not base.is_dir():
            raise NotFoundError(f"unknown model {name!r}")
        found = [
            self.manifest(name, entry.name)
            for entry in base.iterdir()
            if entry.is_dir()
            and NAME_PATTERN.match(entry.name)
            and (entry / MANIFEST_FILE).is_file()
        ]
        found = [m for m in found if role is None or m.role == role]
        return sorted(found, key=lambda m: _version_key(m.version))

    def read_verified(self, manifest: Manifest) -> bytes:
        """The model file's bytes, after its sha256 matched the manifest."""
        path = self.model_path(manifest)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelValidationError(
                f"cannot read {manifest.name}/{manifest.version}: {exc}"
            ) from exc
        if sha256_hex(data) != manifest.sha256:
            raise ModelValidationError(
                f"checksum mismatch for {manifest.name}/{manifest.version}: file changed on disk"
            )
        return data

    def active(self, name: str) -> dict[str, str]:
        path = self._dir(name) / ACTIVE_FILE
        if not path.is_file():
            return {}
        data: dict[str, str] = json.loads(path.read_text())
        return data

    def active_manifest(self, name: str, role: Role) -> Manifest:
        """The active version for a role, or else the newest registered one."""
        version = self.active(name).get(role)
        if version is not None:
            return self.manifest(name, version)
        candidates = self.versions(name, role)
        if not candidates:
            raise NotFoundError(f"model {name!r} has no {role} version")
        return candidates[-1]

    # -- writing -----------------------------------------------------------------------

    def register(
        self,
        *,
        name: str,
        role: Role,
        model: bytes,
        input: InputSpec,
        output_name: str,
        class_names: Iterable[str],
        temperature: float = 1.0,
        version: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Manifest:
        """Store a new version. The caller validates the model before activating it."""
        base = self._dir(name)
        base.mkdir(parents=True, exist_ok=True)
        version = version or self._next_version(name)
        manifest = Manifest(
            name=name,
            version=version,
            role=role,
            sha256=sha256_hex(model),
            input=input,
            output_name=output_name,
            class_names=tuple(class_names),
            temperature=temperature,
            reference_temperature=temperature,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            metadata=metadata or {},
        )
        manifest.check()
        target = self._dir(name, version)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=base))
        try:
            (staging / MODEL_FILE).write_bytes(model)
            (staging / MANIFEST_FILE).write_text(manifest.to_json())
            try:
                staging.rename(target)
            except OSError as exc:
                raise ConflictError(f"model {name!r} already has version {version!r}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return manifest

    def set_active(self, name: str, role: Role, version: str) -> None:
        manifest = self.manifest(name, version)
        if manifest.role != role:
            raise ModelValidationError(f"{name}/{version} is a {manifest.role}, not a {role}")
        pointer = {**self.active(name), role: version}
        _atomic_write(self._dir(name) / ACTIVE_FILE, json.dumps(pointer, sort_keys=True))

    def save_reference(self, manifest: Manifest, entropies: Sequence[float], source: str) -> None:
        """Store the held-out normalised entropies (at T_ref) that entropy drift is measured
        against; written once, when the version is built."""
        values = [float(h) for h in entropies]
        if not values or not all(0.0 <= h <= 1.0 for h in values):
            raise ModelValidationError("reference entropies must be a non-empty list in [0, 1]")
        payload = {"entropy": values, "source": source}
        _atomic_write(
            self._dir(manifest.name, manifest.version) / REFERENCE_FILE, json.dumps(payload)
        )

    def load_reference(self, manifest: Manifest) -> tuple[list[float], str] | None:
        path = self._dir(manifest.name, manifest.version) / REFERENCE_FILE
        if not path.is_file():
            return None
        payload = json.loads(path.read_text())
        return [float(h) for h in payload["entropy"]], str(payload["source"])

    def _next_version(self, name: str) -> str:
        base = self._dir(name)
        numbers = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()]
        return str(max(numbers, default=0) + 1)


def _version_key(version: str) -> tuple[int, int, str]:
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
