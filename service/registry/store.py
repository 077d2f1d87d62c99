"""Model versions on disk: `<root>/<name>/<version>/{manifest.json, model.onnx, ...}`.

A version may carry extra files beside its model (e.g. `weights.npz`, the trained weights
a re-distillation warm-starts from); their sha256 sums live in the manifest's metadata
under `files`, and they are written in the same atomic step as the version itself.

Writes are atomic (a version is built in a temporary directory and renamed into place;
the active pointer is replaced with `os.replace`), names are checked against a strict
pattern, and every path is resolved and checked to stay under the root, so a client can
only ever name a version, never a path.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from service.errors import ConflictError, ModelValidationError, NotFoundError
from service.registry.manifest import MANIFEST_FILE, MODEL_FILE, InputSpec, Manifest, Role
from service.settings import NAME_PATTERN

ACTIVE_FILE = "active.json"
REFERENCE_FILE = "reference.json"
WEIGHTS_FILE = "weights.npz"
FILES_KEY = "files"
"""Metadata key of the extra files' sha256 sums: {file name: hex digest}."""

EXTRA_FILE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\.(npz|json)$")
_RESERVED_FILES = frozenset({MANIFEST_FILE, MODEL_FILE, ACTIVE_FILE, REFERENCE_FILE})


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
        extra_files: Mapping[str, bytes] | None = None,
    ) -> Manifest:
        """Store a new version. The caller validates the model before activating it.

        `extra_files` ({name: bytes}, names like `weights.npz`) are written beside the
        model in the same atomic step, with their sha256 sums in `metadata["files"]`.
        """
        extras = dict(extra_files or {})
        metadata = dict(metadata or {})
        if extras:
            _check_extra_names(extras, metadata)
            metadata[FILES_KEY] = {file: sha256_hex(data) for file, data in sorted(extras.items())}
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
            metadata=metadata,
        )
        manifest.check()
        target = self._dir(name, version)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=base))
        try:
            (staging / MODEL_FILE).write_bytes(model)
            for file, data in extras.items():
                (staging / file).write_bytes(data)
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

    def read_extra(self, manifest: Manifest, file: str) -> bytes | None:
        """An extra file's bytes after its sha256 matched the manifest; None if the version
        has no such file. Raises ModelValidationError when the file is missing or changed."""
        listed = manifest.metadata.get(FILES_KEY)
        expected = listed.get(file) if isinstance(listed, dict) else None
        if expected is None:
            return None
        if not EXTRA_FILE_PATTERN.match(file) or file in _RESERVED_FILES:
            raise ModelValidationError(f"{file!r} is not a valid extra file name")
        path = self._dir(manifest.name, manifest.version) / file
        label = f"{manifest.name}/{manifest.version}/{file}"
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelValidationError(f"cannot read {label}: {exc}") from exc
        if sha256_hex(data) != expected:
            raise ModelValidationError(f"checksum mismatch for {label}: file changed on disk")
        return data

    def load_weights(self, manifest: Manifest) -> dict[str, npt.NDArray[np.float32]] | None:
        """The version's trained weights (`weights.npz`), or None if it was stored without."""
        data = self.read_extra(manifest, WEIGHTS_FILE)
        if data is None:
            return None
        try:
            return decode_weights(data)
        except ValueError as exc:
            raise ModelValidationError(
                f"unreadable weights for {manifest.name}/{manifest.version}: {exc}"
            ) from exc

    def _next_version(self, name: str) -> str:
        base = self._dir(name)
        numbers = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()]
        return str(max(numbers, default=0) + 1)


def encode_weights(arrays: Mapping[str, npt.ArrayLike]) -> bytes:
    """Named float32 arrays as `.npz` bytes: plain arrays only, so no pickle is involved."""
    buffer = io.BytesIO()
    plain = {key: np.ascontiguousarray(value, dtype=np.float32) for key, value in arrays.items()}
    if not plain:
        raise ValueError("no weights to store")
    np.savez(buffer, allow_pickle=False, **plain)
    return buffer.getvalue()


def decode_weights(data: bytes) -> dict[str, npt.NDArray[np.float32]]:
    """The arrays of `encode_weights` bytes; refuses pickled objects and non-finite values."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {key: np.asarray(archive[key]) for key in archive.files}
    except (OSError, ValueError, EOFError) as exc:  # not an npz, or an object array
        raise ValueError(f"not a weights archive: {exc}") from exc
    for key, value in arrays.items():
        if value.dtype != np.float32 or not np.isfinite(value).all():
            raise ValueError(f"weights {key!r} must be finite float32, got {value.dtype}")
    if not arrays:
        raise ValueError("the weights archive is empty")
    return arrays


def _check_extra_names(extras: Mapping[str, bytes], metadata: Mapping[str, Any]) -> None:
    if FILES_KEY in metadata:
        raise ModelValidationError(f"metadata[{FILES_KEY!r}] is written by the registry")
    for file in extras:
        if not EXTRA_FILE_PATTERN.match(file) or file in _RESERVED_FILES:
            raise ModelValidationError(
                f"{file!r} is not a valid extra file name (lower-case, .npz or .json)"
            )


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
