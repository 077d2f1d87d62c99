"""The teacher queue: priorities, micro-batching, bounds, deadlines, circuit, shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.backends.dispatcher import TeacherDispatcher
from service.backends.onnx import Array
from service.errors import TeacherError
from service.monitoring.instruments import build_instruments
from service.settings import TeacherSettings
from tests.support.fakes import FakeTeacher


def rows(n: int) -> Array:
    x = np.zeros((n, 4), np.float32)
    x[:, 1] = 1.0
    return x


class Harness:
    def __init__(self, teacher: FakeTeacher, **settings: object) -> None:
        self.metrics = CollectorRegistry()
        self.teacher = teacher
        self.dispatcher = TeacherDispatcher(
            teacher,
            model="m",
            settings=TeacherSettings.model_validate(settings),
            instruments=build_instruments(self.metrics),
        )
        self.shadow_results: list[tuple[Array | None, str | None]] = []

    def on_shadow(self, probs: Array | None, reason: str | None, seconds: float) -> None:
        self.shadow_results.append((probs, reason))

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.get_sample_value(name, {"model": "m", **labels})
        return 0.0 if value is None else value


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness(FakeTeacher(), max_concurrency=1, deadline_s=0.5, queue_capacity=8, max_batch=4)
    yield h
    await h.dispatcher.close()


async def test_fallback_returns_teacher_probabilities(harness: Harness) -> None:
    harness.dispatcher.start()
    probs, seconds = await harness.dispatcher.fallback(rows(2))
    assert probs.shape == (2, 3) and probs.argmax(axis=1).tolist() == [1, 1]
    assert seconds >= 0


async def test_fallbacks_go_before_shadow_and_are_micro_batched(harness: Harness) -> None:
    # Queue work before the worker starts, so the order it drains is the queue's order.
    for _ in range(3):
        assert harness.dispatcher.shadow(rows(1), harness.on_shadow)
    fallbacks = [asyncio.create_task(harness.dispatcher.fallback(rows(2))) for _ in range(2)]
    await asyncio.sleep(0)  # let the fallbacks enqueue
    harness.dispatcher.start()
    await asyncio.gather(*fallbacks)
    for _ in range(100):
        if len(harness.shadow_results) == 3:
            break
        await asyncio.sleep(0.01)
    # max_batch 4: both fallbacks (2+2 rows) in the first call, then the 3 shadows.
    assert harness.teacher.calls == [4, 3]
    assert all(p is not None for p, _ in harness.shadow_results)


async def test_shadow_is_dropped_and_counted_when_full(harness: Harness) -> None:
    accepted = [harness.dispatcher.shadow(rows(3), harness.on_shadow) for _ in range(3)]
    assert accepted == [True, True, False]  # capacity 8 rows: 3 + 3 fit, the third does not
    assert harness.sample("kdguard_shadow_dropped_total", reason="queue_full") == 1


async def test_fallback_evicts_queued_shadow_work(harness: Harness) -> None:
    harness.dispatcher.shadow(rows(4), harness.on_shadow)
    harness.dispatcher.shadow(rows(4), harness.on_shadow)
    task = asyncio.create_task(harness.dispatcher.fallback(rows(3)))
    await asyncio.sleep(0)
    assert harness.shadow_results == [(None, "preempted")]
    assert harness.sample("kdguard_shadow_dropped_total", reason="preempted") == 1
    harness.dispatcher.start()
    probs, _ = await task
    assert probs.shape == (3, 3)


async def test_fallback_fails_fast_when_queue_is_full_of_fallbacks() -> None:
    h = Harness(FakeTeacher(mode="hang"), max_concurrency=1, deadline_s=0.3, queue_capacity=4)
    waiting = [asyncio.create_task(h.dispatcher.fallback(rows(2))) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(TeacherError) as err:
        await h.dispatcher.fallback(rows(1))
    assert err.value.reason == "queue_full"
    for task in waiting:
        task.cancel()
    await h.dispatcher.close()


async def test_hung_teacher_costs_no_more_than_the_deadline() -> None:
    h = Harness(FakeTeacher(mode="hang"), max_concurrency=2, deadline_s=0.1)
    h.dispatcher.start()
    started = time.perf_counter()
    with pytest.raises(TeacherError) as err:
        await h.dispatcher.fallback(rows(1))
    elapsed = time.perf_counter() - started
    assert err.value.reason == "timeout"
    assert 0.1 <= elapsed < 0.15
    await h.dispatcher.close()


async def test_concurrent_calls_never_exceed_the_cap() -> None:
    h = Harness(FakeTeacher(delay_s=0.02), max_concurrency=2, max_batch=1, queue_capacity=100)
    h.dispatcher.start()
    await asyncio.gather(*(h.dispatcher.fallback(rows(1)) for _ in range(10)))
    assert h.teacher.max_concurrent == 2
    await h.dispatcher.close()


async def test_circuit_opens_after_failures_and_then_refuses_at_once() -> None:
    h = Harness(FakeTeacher(mode="fail"), max_concurrency=1, circuit={"failure_threshold": 2})
    h.dispatcher.start()
    for _ in range(2):
        with pytest.raises(TeacherError, match="connect"):
            await h.dispatcher.fallback(rows(1))
    assert h.sample("kdguard_teacher_circuit_state") == 2
    calls = len(h.teacher.calls)
    with pytest.raises(TeacherError) as err:
        await h.dispatcher.fallback(rows(1))
    assert err.value.reason == "circuit_open" and len(h.teacher.calls) == calls
    assert not h.dispatcher.shadow(rows(1), h.on_shadow)
    assert h.sample("kdguard_shadow_dropped_total", reason="circuit_open") == 1
    assert h.sample("kdguard_teacher_errors_total", reason="connect") == 2
    await h.dispatcher.close()


async def test_a_half_open_trial_in_flight_refuses_other_fallbacks_at_once() -> None:
    h = Harness(
        FakeTeacher(mode="fail"),
        max_concurrency=2,
        circuit={"failure_threshold": 1, "reset_after_s": 0.05},
    )
    h.dispatcher.start()
    with pytest.raises(TeacherError, match="connect"):
        await h.dispatcher.fallback(rows(1))
    await asyncio.sleep(0.06)  # half-open: the next call is the trial
    h.teacher.mode, h.teacher.delay_s = "ok", 0.05
    trial = asyncio.create_task(h.dispatcher.fallback(rows(1)))
    await asyncio.sleep(0.01)
    assert h.dispatcher.refusal() == "circuit_open"
    refused = h.dispatcher.fallback(rows(1))
    with pytest.raises(TeacherError, match="circuit_open"):
        refused.send(None)  # raised before the coroutine first waits: never queued
    probs, _ = await trial
    assert probs.shape == (1, 3) and h.teacher.calls == [1, 1]
    assert h.dispatcher.refusal() is None  # the trial succeeded: closed again
    assert h.sample("kdguard_teacher_errors_total", reason="circuit_open") == 2
    await h.dispatcher.close()


async def test_garbage_from_the_teacher_is_a_counted_failure() -> None:
    h = Harness(FakeTeacher(mode="nan"), max_concurrency=1)
    h.dispatcher.start()
    with pytest.raises(TeacherError) as err:
        await h.dispatcher.fallback(rows(2))
    assert err.value.reason == "non_finite"
    assert h.sample("kdguard_teacher_errors_total", reason="non_finite") == 1
    await h.dispatcher.close()


async def test_close_fails_queued_work_and_closes_the_backend(harness: Harness) -> None:
    harness.dispatcher.shadow(rows(1), harness.on_shadow)
    await harness.dispatcher.close()
    assert harness.shadow_results == [(None, "shutdown")]
    assert harness.teacher.closed
    with pytest.raises(TeacherError, match="shutdown"):
        await harness.dispatcher.fallback(rows(1))


async def test_shadow_only_batches_wait_to_fill_but_fallbacks_never_wait() -> None:
    h = Harness(FakeTeacher(), max_concurrency=1, max_batch=8, shadow_batch_wait_s=0.05)
    h.dispatcher.start()
    h.dispatcher.shadow(rows(1), h.on_shadow)
    await asyncio.sleep(0.01)  # the worker has taken the first row and is waiting for more
    h.dispatcher.shadow(rows(2), h.on_shadow)
    for _ in range(100):
        if len(h.shadow_results) == 2:
            break
        await asyncio.sleep(0.01)
    assert h.teacher.calls == [3]
    started = time.perf_counter()
    await h.dispatcher.fallback(rows(1))
    assert time.perf_counter() - started < 0.04
    await h.dispatcher.close()
