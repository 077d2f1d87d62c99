"""One error hierarchy for the whole service.

Each error carries the HTTP status it maps to and a short machine-readable code; the API
layer turns any `KdguardError` into `{"error": message, "code": code}` in one place
(`service/api/errors.py`).
Lower layers raise these and never import HTTP machinery.
"""

from __future__ import annotations


class KdguardError(Exception):
    """Base class: a failure with a status code and a stable error code."""

    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadInputError(KdguardError):
    """The request is well-formed HTTP but its content is wrong (shape, dtype, values)."""

    status_code = 400
    code = "bad_input"


class UnauthorizedError(KdguardError):
    status_code = 401
    code = "unauthorized"


class ForbiddenError(KdguardError):
    status_code = 403
    code = "forbidden"


class NotFoundError(KdguardError):
    status_code = 404
    code = "not_found"


class ConflictError(KdguardError):
    status_code = 409
    code = "conflict"


class PayloadTooLargeError(KdguardError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaTypeError(KdguardError):
    status_code = 415
    code = "unsupported_media_type"


class UnprocessableError(KdguardError):
    """Semantically invalid: e.g. a model file that fails validation."""

    status_code = 422
    code = "unprocessable"


class RateLimitedError(KdguardError):
    """A client sent more than its limit allows; `Retry-After` says when it may again."""

    status_code = 429
    code = "rate_limited"


class UnavailableError(KdguardError):
    """The service cannot answer right now (not ready, overloaded); the client may retry."""

    status_code = 503
    code = "unavailable"


class ModelValidationError(UnprocessableError):
    """A model version failed a check (checksum, ONNX check, input spec, warm-up)."""

    code = "model_invalid"


class TeacherError(KdguardError):
    """The teacher failed to produce a usable answer. Never reaches a client as a 5xx:
    the engine catches it and serves the student, flagged `degraded`.

    `reason` is one of a small fixed set so it can be a Prometheus label.
    """

    status_code = 502
    code = "teacher_error"

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message or reason)
        self.reason = reason


class ConfigError(KdguardError):
    """Settings that are invalid or unsafe; raised at start, never at request time."""

    code = "config_error"
