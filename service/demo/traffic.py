"""A drifting traffic generator for the demo: digit images that change over time.

The numpy half is pure: four drift transforms (each a function of a batch, a strength
and an rng), a `DriftSchedule` of timed phases and a `TrafficGenerator` that draws
batches from the held-out digits. `drive` is the driver: it posts those batches to a
running service at a fixed, open-loop rate and keeps what it needs for delayed feedback.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import httpx
import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # only for types: importing digits at run time would pull in torch
    from service.demo.digits import DigitsSplits

Images = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]
DriftKind = Literal["clean", "noise", "shift", "occlude", "class_mix"]

SIDE = 8  # load_digits images are 8x8
CLASSES = 10
DEFAULT_FAVOURED = (3, 5, 8)  # digits the student confuses most: skew makes errors visible


# -- transforms (pure) -----------------------------------------------------------------


def add_noise(x: Images, strength: float, rng: np.random.Generator) -> Images:
    """Add Gaussian pixel noise with standard deviation `strength`, clipped to [0, 1]."""
    noisy = x + rng.normal(0.0, strength, size=x.shape) if strength > 0 else x
    return np.clip(noisy, 0.0, 1.0).astype(np.float32)


def shift(x: Images, strength: float, rng: np.random.Generator) -> Images:
    """Roll each image by round(strength) pixels up, down, left or right (chosen per row)."""
    pixels = round(strength)
    images = x.reshape(-1, SIDE, SIDE).copy()
    if pixels == 0:
        return images.reshape(x.shape)
    directions = rng.integers(0, 4, size=len(images))
    for direction, (amount, axis) in enumerate(
        ((pixels, 1), (-pixels, 1), (pixels, 2), (-pixels, 2))
    ):
        rows = directions == direction
        images[rows] = np.roll(images[rows], amount, axis=axis)
    return images.reshape(x.shape)


def occlude(x: Images, strength: float, rng: np.random.Generator) -> Images:
    """Zero one random 3x3 to 4x4 patch in each image with probability `strength`."""
    images = x.reshape(-1, SIDE, SIDE).copy()
    hit = np.flatnonzero(rng.random(len(images)) < strength)
    sizes = rng.integers(3, 5, size=(len(hit), 2))
    for row, (height, width) in zip(hit, sizes, strict=True):
        top = rng.integers(0, SIDE - height + 1)
        left = rng.integers(0, SIDE - width + 1)
        images[row, top : top + height, left : left + width] = 0.0
    return images.reshape(x.shape)


def skewed_shares(
    favoured: Sequence[int] = DEFAULT_FAVOURED, *, mass: float = 0.7, classes: int = CLASSES
) -> npt.NDArray[np.float64]:
    """Class shares with `mass` spread over `favoured` and the rest over the others."""
    shares = np.full(classes, (1.0 - mass) / (classes - len(favoured)))
    shares[list(favoured)] = mass / len(favoured)
    return shares


def class_mix(
    x: Images,
    y: Labels,
    strength: float,
    rng: np.random.Generator,
    *,
    size: int | None = None,
    target: npt.NDArray[np.float64] | None = None,
) -> tuple[Images, Labels]:
    """Resample `size` rows (with replacement) so class shares become
    (1 - strength) · uniform + strength · target (default `skewed_shares()`)."""
    classes = CLASSES if target is None else len(target)
    goal = skewed_shares(classes=classes) if target is None else np.asarray(target, float)
    shares = (1.0 - strength) * np.full(classes, 1.0 / classes) + strength * goal
    counts = np.bincount(y, minlength=classes).astype(np.float64)
    present = counts > 0
    # Each row's weight is its class's share split over that class's rows; classes the
    # pool lacks cannot be drawn, so their share goes to the others.
    weight = np.where(present, shares / np.where(present, counts, 1.0), 0.0)[y]
    index = rng.choice(len(y), size=len(y) if size is None else size, p=weight / weight.sum())
    return x[index].copy(), y[index].copy()


# -- schedule --------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """One stretch of traffic: a drift kind at a strength for `duration_s` seconds."""

    name: str
    duration_s: float
    kind: DriftKind = "clean"
    strength: float = 0.0


@dataclass(frozen=True)
class DriftSchedule:
    """Phases in order; past the end the last phase continues (or, with `cycle`, restarts)."""

    phases: tuple[Phase, ...]
    cycle: bool = False

    def __post_init__(self) -> None:
        if not self.phases or any(p.duration_s <= 0 for p in self.phases):
            raise ValueError("a schedule needs at least one phase, each with duration > 0")

    @classmethod
    def default(cls, phase_s: float = 60.0) -> DriftSchedule:
        """clean → noise → occlusion → class mix, `phase_s` seconds each."""
        return cls(
            (
                Phase("clean", phase_s),
                Phase("noise", phase_s, "noise", 0.25),
                Phase("occlusion", phase_s, "occlude", 0.7),
                Phase("class_mix", phase_s, "class_mix", 1.0),
            )
        )

    @property
    def total_s(self) -> float:
        return sum(p.duration_s for p in self.phases)

    def phase_at(self, elapsed_s: float) -> Phase:
        """The phase in force `elapsed_s` seconds after the start."""
        t = elapsed_s % self.total_s if self.cycle else elapsed_s
        for phase in self.phases:
            if t < phase.duration_s:
                return phase
            t -= phase.duration_s
        return self.phases[-1]


class TrafficGenerator:
    """Draws drifted batches from the validation and test digits (never training rows)."""

    def __init__(self, splits: DigitsSplits, schedule: DriftSchedule, seed: int = 0) -> None:
        self.schedule = schedule
        self._x = np.concatenate([splits.validation.x, splits.test.x]).astype(np.float32)
        self._y = np.concatenate([splits.validation.y, splits.test.y]).astype(np.int64)
        self._rng = np.random.default_rng(seed)

    def batch(self, n: int, elapsed_s: float) -> tuple[Images, Labels, str]:
        """n drifted inputs (float32 [n, 64]), their true labels and the phase's name."""
        phase = self.schedule.phase_at(elapsed_s)
        if phase.kind == "class_mix":
            x, y = class_mix(self._x, self._y, phase.strength, self._rng, size=n)
            return x, y, phase.name
        index = self._rng.integers(0, len(self._y), size=n)
        x, y = self._x[index], self._y[index].copy()
        if phase.kind == "noise":
            x = add_noise(x, phase.strength, self._rng)
        elif phase.kind == "shift":
            x = shift(x, phase.strength, self._rng)
        elif phase.kind == "occlude":
            x = occlude(x, phase.strength, self._rng)
        return x, y, phase.name


# -- driver ----------------------------------------------------------------------------


class Answered(NamedTuple):
    """One answered request, kept so its true label can be sent later as feedback."""

    request_id: str
    true_label: int
    predicted_label: int
    answered_at: float  # event-loop clock, seconds


@dataclass
class TrafficStats:
    """Running counts of one `drive` call (mutated as responses arrive)."""

    sent: int = 0
    skipped: int = 0  # ticks not sent because `max_in_flight` requests were outstanding
    transport_errors: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    by_served_by: Counter[str] = field(default_factory=Counter)
    predictions: int = 0
    correct: int = 0
    degraded: int = 0
    phase: str = ""
    elapsed_s: float = 0.0
    answered: deque[Answered] = field(default_factory=lambda: deque(maxlen=10_000))
    labels_sent: int = 0  # acknowledged by /v1/feedback (see send_feedback)

    @property
    def accuracy(self) -> float:
        """Share of answered predictions that matched the true label (nan before any)."""
        return self.correct / self.predictions if self.predictions else float("nan")


async def drive(
    base_url: str,
    *,
    rate_per_s: float,
    duration_s: float,
    batch_size: int = 1,
    generator: TrafficGenerator,
    client: httpx.AsyncClient | None = None,
    on_tick: Callable[[TrafficStats], None] | None = None,
    max_in_flight: int = 32,
    report_every_s: float = 1.0,
    timeout_s: float = 10.0,
    stats: TrafficStats | None = None,
) -> TrafficStats:
    """POST batches to `{base_url}/v1/predict` at `rate_per_s` requests/s for `duration_s`.

    Open loop: request k is due at k / rate seconds whatever earlier requests are doing,
    so a slow service cannot slow the offered load; a tick that finds `max_in_flight`
    requests outstanding is counted as skipped instead of queued. `on_tick` gets the
    stats about every `report_every_s` seconds and once at the end; pass `stats` to share
    them (e.g. with `send_feedback`, which labels answered requests late).
    """
    if rate_per_s <= 0 or duration_s < 0 or batch_size < 1 or max_in_flight < 1:
        raise ValueError("need rate_per_s > 0, duration_s ≥ 0, batch_size ≥ 1, max_in_flight ≥ 1")
    own_client = client is None
    http = client or httpx.AsyncClient(timeout=timeout_s)
    try:
        return await _run(
            http,
            base_url.rstrip("/") + "/v1/predict",
            rate_per_s=rate_per_s,
            duration_s=duration_s,
            batch_size=batch_size,
            generator=generator,
            on_tick=on_tick,
            max_in_flight=max_in_flight,
            report_every_s=report_every_s,
            stats=stats or TrafficStats(),
        )
    finally:
        if own_client:
            await http.aclose()


async def _run(
    http: httpx.AsyncClient,
    url: str,
    *,
    rate_per_s: float,
    duration_s: float,
    batch_size: int,
    generator: TrafficGenerator,
    on_tick: Callable[[TrafficStats], None] | None,
    max_in_flight: int,
    report_every_s: float,
    stats: TrafficStats,
) -> TrafficStats:
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(max_in_flight)
    pending: set[asyncio.Task[None]] = set()
    prefix, start, tick, next_report = secrets.token_hex(4), loop.time(), 0, report_every_s
    try:
        while (due := tick / rate_per_s) < duration_s:
            await asyncio.sleep(max(0.0, start + due - loop.time()))
            stats.elapsed_s = loop.time() - start
            if slots.locked():
                stats.skipped += 1
            else:
                await slots.acquire()  # never waits: the slot is known to be free
                x, y, stats.phase = generator.batch(batch_size, stats.elapsed_s)
                ids = [f"traffic-{prefix}-{tick}-{row}" for row in range(batch_size)]
                stats.sent += 1
                task = asyncio.create_task(_post(http, url, x, y, ids, stats))
                pending.add(task)
                task.add_done_callback(functools.partial(_finished, pending, slots))
            tick += 1
            if on_tick is not None and stats.elapsed_s >= next_report:
                on_tick(stats)
                next_report += report_every_s
        await asyncio.gather(*pending)
    finally:
        # On cancellation (or an error) stop what is in flight: the client may close next.
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    stats.elapsed_s = loop.time() - start
    if on_tick is not None:
        on_tick(stats)
    return stats


def _finished(
    pending: set[asyncio.Task[None]], slots: asyncio.Semaphore, task: asyncio.Task[None]
) -> None:
    pending.discard(task)
    slots.release()


async def _post(
    http: httpx.AsyncClient, url: str, x: Images, y: Labels, ids: list[str], stats: TrafficStats
) -> None:
    """Send one batch and fold its response into `stats`; never raises for HTTP trouble."""
    try:
        response = await http.post(url, json={"inputs": x.tolist(), "request_ids": ids})
    except httpx.HTTPError:
        stats.transport_errors += 1
        return
    stats.by_status[response.status_code] += 1
    if response.status_code != httpx.codes.OK:
        return
    truth = dict(zip(ids, y.tolist(), strict=True))
    try:
        predictions: Any = response.json()["predictions"]
    except (ValueError, KeyError, TypeError):
        return  # counted under its status; a malformed body has nothing more to count
    if not isinstance(predictions, list):
        return
    now = asyncio.get_running_loop().time()
    for prediction in predictions:
        if isinstance(prediction, dict):
            _record(stats, prediction, truth, now)


def _record(
    stats: TrafficStats, prediction: dict[str, Any], truth: dict[str, int], now: float
) -> None:
    stats.predictions += 1
    stats.by_served_by[str(prediction.get("served_by", "unknown"))] += 1
    stats.degraded += bool(prediction.get("degraded", False))
    request_id, label = str(prediction.get("request_id", "")), prediction.get("label")
    if request_id in truth and isinstance(label, int):
        stats.correct += label == truth[request_id]
        stats.answered.append(Answered(request_id, truth[request_id], label, now))


async def send_feedback(
    base_url: str,
    stats: TrafficStats,
    *,
    delay_s: float,
    share: float,
    seed: int = 0,
    client: httpx.AsyncClient | None = None,
    poll_s: float = 1.0,
    max_batch: int = 256,
) -> int:
    """Send the true labels of answered requests back as delayed feedback, until cancelled.

    Each answered request is labelled with probability `share`, `delay_s` seconds after
    it was answered (labels in production arrive late and incompletely). Returns the
    number of labels acknowledged.
    """
    rng = np.random.default_rng(seed)
    loop = asyncio.get_running_loop()
    own_client = client is None
    http = client or httpx.AsyncClient(timeout=10.0)
    url = base_url.rstrip("/") + "/v1/feedback"
    acknowledged = 0
    try:
        while True:
            due: list[Answered] = []
            while stats.answered and stats.answered[0].answered_at + delay_s <= loop.time():
                item = stats.answered.popleft()
                if rng.random() < share:
                    due.append(item)
            for start in range(0, len(due), max_batch):
                chunk = due[start : start + max_batch]
                body = [{"request_id": a.request_id, "label": a.true_label} for a in chunk]
                try:
                    response = await http.post(url, json=body)
                except httpx.HTTPError:
                    continue  # labels are best effort in the demo; the next ones will come
                if response.status_code == httpx.codes.OK:
                    acknowledged += len(chunk)
            stats.labels_sent = acknowledged
            await asyncio.sleep(poll_s)
    finally:
        if own_client:
            await http.aclose()
