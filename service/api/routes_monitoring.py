"""`GET /v1/monitoring/summary`: every quality metric with its interval, n and state."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query

from service.api.schemas import SummaryResponse, error_responses
from service.api.state import ServicesDep
from service.errors import BadInputError
from service.monitoring.monitor import LABELLED
from service.persistence.windows import latest_windows

router = APIRouter(tags=["monitoring"])


@router.get(
    "/v1/monitoring/summary",
    summary="The latest window of every quality metric (labelled ones: the latest matured)",
    response_model=SummaryResponse,
    responses=error_responses(400),
)
async def summary(
    services: ServicesDep,
    window: str = Query("5m", description="One of the configured monitoring windows."),
) -> dict[str, Any]:
    windows = services.settings.monitoring.windows
    if window not in windows:
        raise BadInputError(f"unknown window {window!r}; configured: {windows}")
    name = services.deployment.name

    def read() -> list[Any]:
        with services.sessions() as session:
            return latest_windows(session, model=name, window=window, labelled=LABELLED)

    rows = await asyncio.to_thread(read)
    return {
        "model": name,
        "window": window,
        "metrics": {
            r.metric: {
                "value": r.value,
                "ci_low": r.ci_low,
                "ci_high": r.ci_high,
                "n": r.n,
                "n_eff": r.n_eff,
                "threshold": r.threshold,
                "state": r.state,
                "window_start": r.window_start,
                "window_end": r.window_end,
                "label_completeness": r.label_completeness,
                "matured": r.matured,
                "computed_at": r.computed_at,
                "details": r.details,
            }
            for r in rows
        },
    }
