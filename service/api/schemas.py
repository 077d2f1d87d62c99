"""Pydantic schemas for the OpenAPI document and the admin API.

The inference routes parse their bodies by hand (see `inputs.py`) for speed; these
models describe exactly the same bodies so the spec, the docs and clients agree.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field

from service.api.inputs import REQUEST_ID

# A database row id in a path: a positive 64-bit integer (larger ones cannot name a row,
# and SQLite refuses to compare with them), so anything else is a 422, never a 500.
RowId = Annotated[int, Path(ge=1, le=2**63 - 1)]


NonEmpty = Field(min_length=1)
RequestId = Annotated[str, Field(pattern=REQUEST_ID.pattern)]


class PredictRequest(BaseModel):
    inputs: Annotated[list[list[float]], NonEmpty] | Annotated[list[float], NonEmpty] = Field(
        description="A list of instances (each a list of numbers), or one flat instance."
    )
    request_ids: list[RequestId] | None = Field(
        None, description="Optional ids, one per instance; generated when absent."
    )
    routing_key: str | None = Field(
        None, description="Optional sticky key (e.g. a user id) recorded with the request."
    )


class PredictionPublic(BaseModel):
    request_id: str
    label: int
    class_name: str
    confidence: float
    served_by: str = Field(description="'student' or 'teacher'.")
    model_version: str = Field(description="The student version that handled the request.")
    degraded: bool = Field(description="True when the teacher should have answered but could not.")


class PredictResponse(BaseModel):
    predictions: list[PredictionPublic]


class FeedbackItem(BaseModel):
    request_id: RequestId = Field(description="The request id a prediction returned.")
    label: int = Field(ge=0, description="The true class index.")


class FeedbackResponse(BaseModel):
    accepted: int = Field(description="Labels stored by this request.")
    unchanged: int = Field(description="Labels already stored with the same value.")


class MetricSummary(BaseModel):
    value: float | None = Field(description="The statistic (null when undefined).")
    ci_low: float | None
    ci_high: float | None
    n: int
    n_eff: float
    threshold: float | None
    state: str = Field(description="ok, alert or insufficient.")
    window_start: float
    window_end: float
    label_completeness: float | None
    matured: bool
    computed_at: float
    details: dict[str, Any]


class SummaryResponse(BaseModel):
    model: str
    window: str
    metrics: dict[str, MetricSummary]


class ErrorBody(BaseModel):
    error: str = Field(description="What is wrong, for a person.")
    code: str = Field(description="A stable machine-readable error code.")


class InferTensor(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferRequestBody(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferTensor] = Field(min_length=1, max_length=1, description="One tensor.")
    outputs: list[dict[str, Any]] | None = None


class InferResponseBody(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any]
    outputs: list[InferTensor]


class VersionPublic(BaseModel):
    name: str
    version: str
    role: str
    sha256: str
    temperature: float
    class_names: list[str]
    created_at: str
    active: bool
    metadata: dict[str, Any]


class ModelPublic(BaseModel):
    name: str
    active: dict[str, str]
    versions: list[VersionPublic]


class RoutingPublic(BaseModel):
    fallback_threshold: float = Field(ge=0.0, le=1.0)
    shadow_rate: float = Field(ge=0.0, le=1.0)


class RoutingUpdate(BaseModel):
    # strict: JSON true/false or "0.5" are not numbers (lax mode read false as 0.0)
    model_config = ConfigDict(extra="forbid", strict=True)

    fallback_threshold: float | None = Field(None, ge=0.0, le=1.0)
    shadow_rate: float | None = Field(None, ge=0.0, le=1.0)


_RETRY_AFTER = {
    "Retry-After": {
        "description": "Whole seconds until the request would be accepted.",
        "schema": {"type": "integer", "minimum": 1},
    }
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """Error responses of a route, all with the error body; a 429 also says when to retry."""
    return {
        code: {"model": ErrorBody, "headers": _RETRY_AFTER} if code == 429 else {"model": ErrorBody}
        for code in codes
    }


def request_body(model: type[BaseModel], *, many: bool = False) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its body by hand but documents `model`
    (`many`: one object or a list of them)."""
    schema = _inlined(model.model_json_schema())
    if many:
        schema = {"anyOf": [schema, {"type": "array", "items": schema, "minItems": 1}]}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with its `$defs` written in place: `#/$defs/...` cannot be resolved from
    inside the OpenAPI document, where `openapi_extra` puts it. (Our bodies are not
    recursive, so inlining ends.)"""
    defs: dict[str, Any] = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    inlined: dict[str, Any] = resolve(schema)
    return inlined


JobStatus = Literal["pending", "running", "succeeded", "failed", "cancelled"]


class JobPublic(BaseModel):
    id: int
    model: str
    kind: str
    status: str = Field(description="pending, running, succeeded, failed or cancelled.")
    rule: str | None = Field(
        description="The trigger rule that created it (manual:<kind> by hand)."
    )
    params: dict[str, Any]
    evidence: dict[str, Any] = Field(description="The metric windows that fired its rule.")
    progress: float = Field(description="Fraction done, 0 to 1.")
    progress_message: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    result: dict[str, Any] | None
    error: str | None
    runner: str | None
    cancel_requested: bool
    applied: bool = Field(description="Its effect (new T, new τ, a rollout) was carried out.")


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["recalibrate", "retune_threshold", "redistill"]
    params: dict[str, Any] = Field(default_factory=dict, description="The job body's options.")


class RolloutPublic(BaseModel):
    id: int
    model: str
    candidate_version: str
    incumbent_version: str
    stage: str = Field(description="shadow, ab, promoted or rolled_back.")
    traffic_share: float
    statistics: dict[str, Any] = Field(description="The promotion gate's latest statistics.")
    decision: str | None
    created_at: float
    updated_at: float = Field(description="When it entered its current stage.")
    job_id: int | None
    decided_at: float | None
    config: dict[str, Any]


class RolloutCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    candidate_version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ThresholdsPublic(BaseModel):
    fallback_threshold: float
    shadow_rate: float
    threshold_mode: dict[str, Any] | None = Field(description="How τ was last chosen, if retuned.")
    rules: list[dict[str, Any]] = Field(description="Trigger rules in force (with overrides).")
    rollout: dict[str, Any] = Field(description="Promotion gate settings.")


class RuleUpdate(BaseModel):
    """Fields of one trigger rule to override at run time (stored, all replicas follow)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    value: float | None = None
    statistic: Literal["value", "ci_low", "ci_high", "alert"] | None = None
    comparison: Literal[">", ">=", "<", "<="] | None = None
    min_samples: float | None = Field(None, ge=1)
    consecutive: int | None = Field(None, ge=1)
    cooldown_s: float | None = Field(None, ge=0)
    action: Literal["recalibrate", "retune_threshold", "redistill", "alert_only"] | None = None
