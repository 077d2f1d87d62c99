"""Model versions on disk: manifests, checksums, validation and the active pointer."""

from service.registry.manifest import InputSpec, Manifest, Role
from service.registry.store import ModelRegistry

__all__ = ["InputSpec", "Manifest", "ModelRegistry", "Role"]
