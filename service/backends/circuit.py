"""A consecutive-failure circuit breaker for the teacher.

Closed: calls go through. After `failure_threshold` consecutive failures it opens: calls
are refused at once (the student answers, flagged degraded) for `reset_after_s`. Then it is
half-open: one trial call goes through; success closes it, failure opens it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "half_open", "open"]


class CircuitBreaker:
    def __init__(
        self,
        *,
        failure_threshold: int,
        reset_after_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[State], None] | None = None,
    ) -> None:
        self._threshold = failure_threshold
        self._reset_after = reset_after_s
        self._clock = clock
        self._on_change = on_change
        self._state: State = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False

    @property
    def state(self) -> State:
        if self._state == "open" and self._clock() - self._opened_at >= self._reset_after:
            return "half_open"
        return self._state

    def rejects(self) -> bool:
        """True while open and not yet due a trial, or while the one trial is in flight:
        enqueueing would be pointless (the call would be refused when a worker took it).

        Asked for every low-confidence row, so it reads the fields rather than `state`.
        """
        return self._trial_in_flight or (
            self._state == "open" and self._clock() - self._opened_at < self._reset_after
        )

    def allow(self) -> bool:
        """Ask to make a call now. In half-open state only one trial is allowed."""
        state = self.state
        if state == "closed":
            return True
        if state == "open" or self._trial_in_flight:
            return False
        self._set("half_open")
        self._trial_in_flight = True
        return True

    def success(self) -> None:
        self._failures = 0
        self._trial_in_flight = False
        self._set("closed")

    def failure(self) -> None:
        self._failures += 1
        trial_failed = self._trial_in_flight
        self._trial_in_flight = False
        if trial_failed or self._failures >= self._threshold:
            self._opened_at = self._clock()
            self._set("open")

    def _set(self, state: State) -> None:
        if state != self._state:
            self._state = state
            if self._on_change is not None:
                self._on_change(state)
