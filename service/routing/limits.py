"""Per-client token buckets: how many feedback labels each client may send.

Every client has a bucket of `burst` tokens that refills at `rate_per_s` tokens a second.
A request costs one token per label and is admitted only when its whole cost is there
(all or nothing, like the batch itself); a refused request takes nothing and learns how
long until it would fit.

The map of buckets holds at most `max_clients`. A client past that pushes out the one
idle longest, which comes back with a full bucket: a client idle for `burst / rate_per_s`
seconds has a full bucket anyway, so only a flood of more identities than the map holds
can make it forget a partly empty one. Buckets live in one server process; with N
processes behind one address a client may send up to N times the rate.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from service.errors import RateLimitedError
from service.settings import FeedbackSettings

Clock = Callable[[], float]
_SLACK = 1e-9  # tokens: float error in a refill must not turn away a client that waited


@dataclass
class _Bucket:
    tokens: float
    updated: float  # clock reading when `tokens` was last brought up to date


class ClientLimits:
    """Token buckets keyed by client identity, with an injectable clock (seconds)."""

    def __init__(
        self,
        *,
        rate_per_s: float,
        burst: int,
        max_clients: int,
        clock: Clock = time.monotonic,
    ) -> None:
        if not (rate_per_s > 0 and burst >= 1 and max_clients >= 1):
            raise ValueError("rate_per_s must be > 0, burst and max_clients ≥ 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()  # least recently seen first
        self._lock = threading.Lock()  # cheap, and the map stays right if threads share it

    @classmethod
    def from_settings(
        cls, settings: FeedbackSettings, *, clock: Clock = time.monotonic
    ) -> ClientLimits | None:
        """The limits `settings` ask for, or None when `rate_per_s` is 0 (no limit)."""
        if settings.rate_per_s == 0:
            return None
        return cls(
            rate_per_s=settings.rate_per_s,
            burst=settings.burst,
            max_clients=settings.max_clients,
            clock=clock,
        )

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str, cost: int) -> float:
        """Take `cost` tokens from `client`'s bucket and return 0.0; or, when fewer are
        there, take nothing and return the seconds until `cost` tokens will be."""
        if not 1 <= cost <= self.burst:
            raise ValueError(f"cost {cost} is outside 1..{self.burst} (the bucket's size)")
        with self._lock:
            now = self._clock()
            bucket = self._buckets.pop(client, None)
            if bucket is None:
                bucket = _Bucket(float(self.burst), now)
            else:
                refill = max(0.0, now - bucket.updated) * self.rate_per_s
                bucket.tokens = min(float(self.burst), bucket.tokens + refill)
                bucket.updated = now
            self._buckets[client] = bucket  # now the most recently seen
            if len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            if bucket.tokens + _SLACK >= cost:
                bucket.tokens -= cost
                return 0.0
            return (cost - bucket.tokens) / self.rate_per_s

    def admit(self, client: str, cost: int) -> None:
        """Take `cost` tokens, or raise RateLimitedError with `Retry-After` in whole
        seconds (rounded up: a client that waits that long gets through)."""
        wait = self.take(client, cost)
        if wait > 0:
            retry = max(1, math.ceil(wait))
            raise RateLimitedError(
                f"over the feedback limit of {self.rate_per_s:g} labels/s "
                f"(burst {self.burst}); retry in {retry} s",
                headers={"Retry-After": str(retry)},
            )
