"""What the HTTP layer reaches through `request.app.state.services`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy.orm import Session, sessionmaker

from service.api.auth import KeyRing
from service.jobs.controller import Controller
from service.monitoring.instruments import Instruments
from service.monitoring.monitor import Monitor
from service.persistence.feedback import FeedbackStore
from service.routing.deployment import Deployment
from service.routing.limits import ClientLimits
from service.settings import Settings

INFERENCE_KINDS = ("rest", "oip")
OVERLOADED = "in_flight_limit"  # reason: `server.max_in_flight` requests already in flight
FEEDBACK_LIMITED = "client_rate_limit"  # reason: a client over its `feedback.rate_per_s`


@dataclass
class Services:
    settings: Settings
    deployment: Deployment
    instruments: Instruments
    metrics_registry: CollectorRegistry
    keys: KeyRing
    feedback: FeedbackStore
    sessions: sessionmaker[Session]
    monitor: Monitor | None = None
    controller: Controller | None = None
    ready: bool = False
    in_flight: int = 0  # inference requests being worked on (one event loop: no lock)
    feedback_limits: ClientLimits | None = field(init=False)
    _request_counters: dict[tuple[str, str], Counter] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Rejections start at zero, so their rate and alerts see the series from the start.
        for kind in INFERENCE_KINDS:
            self.instruments.requests_rejected.labels(self.deployment.name, kind, OVERLOADED)
        self.feedback_limits = ClientLimits.from_settings(self.settings.feedback)
        if self.feedback_limits is not None:
            self.instruments.requests_rejected.labels(
                self.deployment.name, "feedback", FEEDBACK_LIMITED
            )

    def count_request(self, kind: str, status: int) -> None:
        outcome = _outcome(status)
        child = self._request_counters.get((kind, outcome))
        if child is None:
            name = self.deployment.name
            child = self.instruments.requests.labels(name, kind, outcome)
            self._request_counters[(kind, outcome)] = child
        child.inc()

    def count_rejected(self, kind: str, reason: str, status: int = 503) -> None:
        self.instruments.requests_rejected.labels(self.deployment.name, kind, reason).inc()
        self.count_request(kind, status)


def _outcome(status: int) -> str:
    if status < 400:
        return "ok"
    if status in (429, 503):
        return "rejected"
    return "client_error" if status < 500 else "server_error"


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
