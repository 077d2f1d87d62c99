"""The teacher circuit breaker's state machine, on a fake clock."""

from __future__ import annotations

from service.backends.circuit import CircuitBreaker, State


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def state(breaker: CircuitBreaker) -> str:
    """Read the state through a function so the checker does not narrow it between calls."""
    return breaker.state


def make() -> tuple[CircuitBreaker, Clock, list[State]]:
    clock = Clock()
    changes: list[State] = []
    breaker = CircuitBreaker(
        failure_threshold=3, reset_after_s=2.0, clock=clock, on_change=changes.append
    )
    return breaker, clock, changes


def test_opens_after_consecutive_failures_only() -> None:
    breaker, _, changes = make()
    breaker.failure()
    breaker.failure()
    breaker.success()
    breaker.failure()
    breaker.failure()
    assert state(breaker) == "closed"
    breaker.failure()
    assert state(breaker) == "open"
    assert breaker.rejects() and not breaker.allow()
    assert changes == ["open"]


def test_half_open_allows_one_trial_then_closes_on_success() -> None:
    breaker, clock, changes = make()
    for _ in range(3):
        breaker.failure()
    clock.now = 2.0
    assert state(breaker) == "half_open" and not breaker.rejects()
    assert breaker.allow()
    assert not breaker.allow()  # only one trial at a time
    assert breaker.rejects()  # and while it is in flight, other calls are refused at once
    breaker.success()
    assert state(breaker) == "closed" and breaker.allow()
    assert changes == ["open", "half_open", "closed"]


def test_failed_trial_reopens_for_a_full_period() -> None:
    breaker, clock, _ = make()
    for _ in range(3):
        breaker.failure()
    clock.now = 2.5
    assert breaker.allow()
    breaker.failure()
    assert state(breaker) == "open"
    clock.now = 4.0
    assert state(breaker) == "open"
    clock.now = 4.5
    assert state(breaker) == "half_open"
