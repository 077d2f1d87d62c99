"""Drift transforms, the schedule, the generator, and the open-loop driver."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from service.demo.digits import DigitsSplits, digits_splits
from service.demo.traffic import (
    DriftSchedule,
    Phase,
    TrafficGenerator,
    TrafficStats,
    add_noise,
    class_mix,
    drive,
    occlude,
    shift,
    skewed_shares,
)

Images = npt.NDArray[np.float32]
PixelTransform = Callable[[Images, float, np.random.Generator], Images]
PIXEL_TRANSFORMS: list[tuple[PixelTransform, float]] = [
    (add_noise, 0.3),
    (shift, 2.0),
    (occlude, 1.0),
]


@pytest.fixture(scope="module")
def splits() -> DigitsSplits:
    return digits_splits(seed=0)


def test_digits_splits_are_sized_stratified_read_only_and_seeded(splits: DigitsSplits) -> None:
    assert splits.sizes() == {"teacher_train": 718, "transfer": 539, "validation": 270, "test": 270}
    overall = np.bincount(
        np.concatenate([s.y for s in (splits.teacher_train, splits.transfer, splits.test)]),
        minlength=10,
    )
    for part in (splits.teacher_train, splits.transfer, splits.validation, splits.test):
        assert part.x.dtype == np.float32
        assert 0.0 <= part.x.min() <= part.x.max() <= 1.0
        assert not part.x.flags.writeable
        shares = np.bincount(part.y, minlength=10) / len(part)
        assert shares == pytest.approx(overall / overall.sum(), abs=0.01)
    again, other = digits_splits(seed=0), digits_splits(seed=1)
    assert np.array_equal(again.test.x, splits.test.x)
    assert not np.array_equal(other.test.x, splits.test.x)


@pytest.fixture
def images() -> Images:
    """Digit-like rows strictly inside (0, 1], read-only so in-place edits would fail."""
    x = (0.5 + 0.5 * np.random.default_rng(0).random((300, 64))).astype(np.float32)
    x.setflags(write=False)
    return x


@pytest.mark.parametrize(("transform", "strength"), PIXEL_TRANSFORMS)
def test_pixel_transforms_keep_shape_dtype_and_range(
    transform: PixelTransform, strength: float, images: Images
) -> None:
    out = transform(images, strength, np.random.default_rng(1))
    assert out.shape == images.shape
    assert out.dtype == np.float32
    assert out.min() >= 0.0
    assert out.max() <= 1.0
    assert not np.array_equal(out, images)


@pytest.mark.parametrize(("transform", "_strength"), PIXEL_TRANSFORMS)
def test_strength_zero_is_the_identity(
    transform: PixelTransform, _strength: float, images: Images
) -> None:
    assert np.array_equal(transform(images, 0.0, np.random.default_rng(1)), images)


def test_shift_rolls_every_image_by_k_pixels_in_one_direction(images: Images) -> None:
    out = shift(images, 2.0, np.random.default_rng(2)).reshape(-1, 8, 8)
    grids = images.reshape(-1, 8, 8)
    for before, after in zip(grids, out, strict=True):
        rolls = [np.roll(before, k, axis=a) for k, a in ((2, 0), (-2, 0), (2, 1), (-2, 1))]
        assert any(np.array_equal(after, r) for r in rolls)


def test_occlude_zeroes_one_patch_of_3x3_to_4x4(images: Images) -> None:
    out = occlude(images, 1.0, np.random.default_rng(3))
    zeros = (out == 0).sum(axis=1)
    assert set(zeros.tolist()) <= {9, 12, 16}
    half = occlude(images, 0.5, np.random.default_rng(3))
    occluded_rows = int((half == 0).any(axis=1).sum())
    assert 100 <= occluded_rows <= 200  # Binomial(300, 0.5): mean 150, sd 8.7


def test_class_mix_skews_class_shares_as_asked(splits: DigitsSplits) -> None:
    x, y = splits.test.x, splits.test.y
    target = skewed_shares((3, 5), mass=0.8)
    for strength in (0.0, 0.5, 1.0):
        _, drawn = class_mix(x, y, strength, np.random.default_rng(4), size=40_000, target=target)
        shares = np.bincount(drawn, minlength=10) / len(drawn)
        expected = (1 - strength) * 0.1 + strength * target
        assert shares == pytest.approx(expected, abs=0.01)


def test_class_mix_returns_matching_rows_and_never_draws_absent_classes(
    splits: DigitsSplits,
) -> None:
    keep = splits.test.y != 3
    x, y = splits.test.x[keep], splits.test.y[keep]
    out_x, out_y = class_mix(x, y, 1.0, np.random.default_rng(5), size=2_000)
    assert out_x.shape == (2_000, 64)
    assert out_x.dtype == np.float32
    assert 3 not in out_y
    by_row = {row.tobytes(): label for row, label in zip(x, y, strict=True)}
    assert all(by_row[row.tobytes()] == label for row, label in zip(out_x, out_y, strict=True))


def test_default_schedule_runs_clean_noise_occlusion_class_mix() -> None:
    schedule = DriftSchedule.default(phase_s=60.0)
    names = [schedule.phase_at(t).name for t in (0.0, 59.9, 60.0, 130.0, 190.0, 10_000.0)]
    assert names == ["clean", "clean", "noise", "occlusion", "class_mix", "class_mix"]
    cycling = DriftSchedule(schedule.phases, cycle=True)
    assert cycling.phase_at(240.0 + 61.0).name == "noise"
    with pytest.raises(ValueError, match="duration"):
        DriftSchedule((Phase("broken", 0.0),))


def test_generator_draws_held_out_rows_under_the_phase_in_force(splits: DigitsSplits) -> None:
    schedule = DriftSchedule((Phase("clean", 10.0), Phase("noisy", 10.0, "noise", 0.3)))
    first, second = TrafficGenerator(splits, schedule, 7), TrafficGenerator(splits, schedule, 7)
    x, y, phase = first.batch(16, elapsed_s=1.0)
    assert x.shape == (16, 64)
    assert x.dtype == np.float32
    assert y.shape == (16,)
    assert y.dtype == np.int64
    assert phase == "clean"
    held_out = {r.tobytes() for r in np.concatenate([splits.validation.x, splits.test.x])}
    assert all(row.tobytes() in held_out for row in x)
    assert np.array_equal(second.batch(16, 1.0)[0], x)  # same seed, same traffic
    noisy, _, phase = first.batch(16, elapsed_s=15.0)
    assert phase == "noisy"
    assert not all(row.tobytes() in held_out for row in noisy)


def _predict_handler(served_by: str = "student") -> Callable[[httpx.Request], httpx.Response]:
    """A fake /v1/predict that answers class 0 for every row."""

    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/predict"
        body = json.loads(request.content)
        assert len(body["inputs"]) == len(body["request_ids"])
        assert all(len(row) == 64 for row in body["inputs"])
        predictions = [
            {
                "request_id": rid,
                "label": 0,
                "class_name": "0",
                "confidence": 0.9,
                "served_by": served_by,
                "model_version": "1",
                "degraded": False,
            }
            for rid in body["request_ids"]
        ]
        return httpx.Response(200, json={"predictions": predictions})

    return handle


@pytest.fixture
def generator(splits: DigitsSplits) -> TrafficGenerator:
    return TrafficGenerator(splits, DriftSchedule.default(), seed=0)


async def test_drive_posts_at_the_rate_and_records_answers(generator: TrafficGenerator) -> None:
    ticks: list[int] = []
    fake_client = httpx.AsyncClient(transport=httpx.MockTransport(_predict_handler()))
    async with fake_client:
        stats = await drive(
            "http://kdguard.test",
            rate_per_s=100.0,
            duration_s=0.3,
            batch_size=2,
            generator=generator,
            client=fake_client,
            on_tick=lambda s: ticks.append(s.sent),
        )
    assert stats.sent == 30  # ticks at 0, 10 ms, ..., 290 ms
    assert stats.by_status == {200: 30}
    assert stats.by_served_by == {"student": 60}
    assert stats.predictions == 60
    assert len(stats.answered) == 60
    assert all(a.predicted_label == 0 for a in stats.answered)
    assert stats.correct == sum(a.true_label == 0 for a in stats.answered)
    assert stats.phase == "clean"
    assert ticks[-1] == 30
    assert 0.29 <= stats.elapsed_s < 5.0


async def test_drive_is_open_loop_and_skips_when_saturated(generator: TrafficGenerator) -> None:
    answer = _predict_handler()

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.5)
        return answer(request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(slow)) as client:
        stats = await drive(
            "http://kdguard.test",
            rate_per_s=100.0,
            duration_s=0.2,
            generator=generator,
            client=client,
            max_in_flight=4,
        )
    # A closed-loop driver would have waited; this one kept to the clock and skipped.
    assert stats.sent == 4
    assert stats.skipped == 16
    assert stats.by_status == {200: 4}


async def test_drive_counts_errors_without_raising(generator: TrafficGenerator) -> None:
    calls = 0

    def flaky(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls % 2:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(503, json={"error": {"code": "unavailable"}})

    async with httpx.AsyncClient(transport=httpx.MockTransport(flaky)) as client:
        stats: TrafficStats = await drive(
            "http://kdguard.test",
            rate_per_s=200.0,
            duration_s=0.05,
            generator=generator,
            client=client,
        )
    assert stats.sent == 10
    assert stats.transport_errors == 5
    assert stats.by_status == {503: 5}
    assert stats.predictions == 0


async def test_cancelling_drive_cancels_requests_in_flight(generator: TrafficGenerator) -> None:
    started: list[asyncio.Task[object] | None] = []

    async def hang(request: httpx.Request) -> httpx.Response:
        started.append(asyncio.current_task())
        await asyncio.sleep(60)
        return httpx.Response(200)

    async with httpx.AsyncClient(transport=httpx.MockTransport(hang)) as client:
        run = asyncio.create_task(
            drive(
                "http://kdguard.test",
                rate_per_s=50.0,
                duration_s=60.0,
                generator=generator,
                client=client,
            )
        )
        await asyncio.sleep(0.1)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
    assert started
    assert all(task is not None and task.done() for task in started)
