"""Per-client token buckets for feedback, on a hand-driven clock: numbers by hand."""

from __future__ import annotations

import pytest

from service.errors import RateLimitedError
from service.routing.limits import ClientLimits
from service.settings import FeedbackSettings, Settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limits(clock: Clock, *, rate: float = 2.0, burst: int = 10, clients: int = 100) -> ClientLimits:
    return ClientLimits(rate_per_s=rate, burst=burst, max_clients=clients, clock=clock)


def test_a_new_client_has_a_full_burst_and_a_batch_costs_its_size() -> None:
    clock = Clock()
    buckets = limits(clock)
    assert buckets.take("a", 6) == 0.0  # 10 - 6 = 4 left
    assert buckets.take("a", 4) == 0.0  # 0 left
    assert buckets.take("a", 1) == pytest.approx(0.5)  # 1 token at 2/s


def test_a_refused_request_takes_nothing() -> None:
    clock = Clock()
    buckets = limits(clock)
    buckets.take("a", 8)  # 2 left
    assert buckets.take("a", 5) == pytest.approx(1.5)  # needs 3 more at 2/s
    assert buckets.take("a", 5) == pytest.approx(1.5)  # still 2 left: nothing was taken
    assert buckets.take("a", 2) == 0.0


def test_tokens_refill_at_the_rate_up_to_the_burst() -> None:
    clock = Clock()
    buckets = limits(clock)
    buckets.take("a", 10)
    clock.now += 1.5  # 3 tokens back
    assert buckets.take("a", 4) == pytest.approx(0.5)
    assert buckets.take("a", 3) == 0.0
    clock.now += 3600.0  # an hour idle refills to the burst, not beyond
    assert buckets.take("a", 10) == 0.0
    assert buckets.take("a", 1) == pytest.approx(0.5)


def test_waiting_the_answer_is_enough() -> None:
    clock = Clock()
    buckets = limits(clock, rate=3.0)
    buckets.take("a", 10)
    wait = buckets.take("a", 7)
    assert wait == pytest.approx(7 / 3)
    clock.now += wait
    assert buckets.take("a", 7) == 0.0


def test_clients_have_their_own_buckets() -> None:
    clock = Clock()
    buckets = limits(clock)
    buckets.take("a", 10)
    assert buckets.take("a", 1) > 0
    assert buckets.take("b", 10) == 0.0


def test_the_map_forgets_the_client_idle_longest() -> None:
    clock = Clock()
    buckets = limits(clock, clients=2)
    buckets.take("a", 10)
    clock.now += 0.5
    buckets.take("b", 10)
    clock.now += 0.5
    buckets.take("a", 1)  # `a` seen again: `b` is now the one idle longest
    buckets.take("c", 10)  # a third client pushes `b` out
    assert len(buckets) == 2
    # `a` is remembered: 2 tokens back after 1 s, 1 of them taken above → 1 left
    assert buckets.take("a", 2) == pytest.approx(0.5)
    # `b` was forgotten and comes back with a full bucket (it would have 2 tokens)
    assert buckets.take("b", 10) == 0.0
    assert len(buckets) == 2


def test_a_cost_past_the_burst_is_a_programming_error() -> None:
    buckets = limits(Clock())
    with pytest.raises(ValueError, match=r"outside 1\.\.10"):
        buckets.take("a", 11)
    with pytest.raises(ValueError, match=r"outside 1\.\.10"):
        buckets.take("a", 0)


def test_admit_raises_429_with_retry_after_rounded_up() -> None:
    clock = Clock()
    buckets = limits(clock, rate=0.4)
    buckets.admit("a", 10)
    with pytest.raises(RateLimitedError) as caught:
        buckets.admit("a", 1)  # 1 token at 0.4/s: 2.5 s
    assert caught.value.status_code == 429 and caught.value.code == "rate_limited"
    assert caught.value.headers == {"Retry-After": "3"}
    clock.now += 3.0
    buckets.admit("a", 1)
    with pytest.raises(RateLimitedError) as again:
        buckets.admit("a", 1)  # 0.2 left, 0.8 missing: 2 s
    assert again.value.headers == {"Retry-After": "2"}


def test_short_waits_still_say_one_second() -> None:
    clock = Clock()
    buckets = limits(clock, rate=100.0)
    buckets.admit("a", 10)
    with pytest.raises(RateLimitedError) as caught:
        buckets.admit("a", 1)  # 10 ms
    assert caught.value.headers == {"Retry-After": "1"}


def test_settings_build_limits_or_none() -> None:
    built = ClientLimits.from_settings(FeedbackSettings(rate_per_s=5.0, burst=300, max_clients=7))
    assert built is not None
    assert (built.rate_per_s, built.burst, built.max_clients) == (5.0, 300, 7)
    assert ClientLimits.from_settings(FeedbackSettings(rate_per_s=0)) is None


def test_settings_refuse_a_burst_smaller_than_a_batch() -> None:
    with pytest.raises(ValueError, match=r"feedback\.burst"):
        Settings(server={"max_batch": 256}, feedback={"burst": 100})
    Settings(server={"max_batch": 256}, feedback={"burst": 100, "rate_per_s": 0})  # no limit
