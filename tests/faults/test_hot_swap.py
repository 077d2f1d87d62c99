"""Hot swap, broken candidates and racing promotions against `kdguard serve` (RELIABILITY.md).

kdguard runs as a real process tree with two workers beside the fake teacher, so a change
made through the worker that takes the admin call reaches the other one the way it reaches
any replica: through the stored serving state, within `jobs.apply_interval_s`. Several
clients keep calling `/v1/predict` and the OIP infer route (a new connection per request,
so both workers get traffic) while the test changes the serving student through the admin
API. Every answer is kept with its `model_version`, and each is checked against the
timeline of changes: zero non-2xx, no version outside what was serving around that time,
the new version seen everywhere within the apply interval plus slack, and never a version
that was not validated. New versions are written into the registry directory while the
server runs: versions are read from disk when named, so nothing needs a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest

from service.registry import InputSpec, ModelRegistry
from tests.conftest import ADMIN_KEY
from tests.support.models import (
    CLASSES,
    FEATURES,
    diagonal_weights,
    instance,
    linear_onnx,
    register_linear,
)
from tests.support.processes import KdguardProcess, fake_teacher, kdguard_server
from tests.support.traffic import CONFIDENT, LOW, scrape, wait_until

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
WORKERS = 2
APPLY_INTERVAL_S = 0.25
SLACK_S = 2.0  # a loaded 2-core machine can hold a worker's tick back this long
BOUND_S = APPLY_INTERVAL_S + SLACK_S
CLIENTS = 6  # half on /v1/predict, half on the OIP route
CYCLES = 3
A = "1"  # the version `kdguard_server` registers and activates
ACTIVATIONS = "kdguard_model_activations_total"
DECISIONS = "kdguard_rollout_decisions_total"


# -- the server ------------------------------------------------------------------------


@dataclass
class Served:
    server: KdguardProcess
    registry: ModelRegistry
    versions: dict[str, str] = field(default_factory=dict)  # role in the test → version


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One server for the module: each test starts and ends with A serving, nothing open."""
    tmp = tmp_path_factory.mktemp("hot-swap")
    overrides: dict[str, Any] = {
        "server": {"workers": WORKERS},
        "auth": {"api_keys": [{"name": "ops", "key": ADMIN_KEY, "scopes": ["admin", "predict"]}]},
        "monitoring": {"enabled": False},
        "triggers": {"enabled": False},
        "jobs": {"runner": "none", "apply_interval_s": APPLY_INTERVAL_S},
        # The test drives every stage itself; the gate only watches.
        "rollout": {"auto_advance": False, "auto_promote": False, "auto_rollback": False,
                    "ab_share": 0.5, "sample_rate": 0.5},
    }  # fmt: skip
    with (
        fake_teacher(tmp / "logs") as teacher,
        kdguard_server(tmp / "kdguard", teacher_url=teacher.url, overrides=overrides) as server,
    ):
        registry = ModelRegistry(tmp / "kdguard" / "registry")
        served = Served(server, registry)
        for role, scale in (("B", 5.0), ("C", 6.0)):  # registered while the server runs
            manifest = register_linear(
                registry, name="tiny", role="student", scale=scale, activate=False
            )
            served.versions[role] = manifest.version
        yield served


# -- traffic ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    route: str
    sent: float
    received: float
    status: int  # -1: no HTTP answer at all
    version: str | None = None
    error: str | None = None


async def _call(http: httpx.AsyncClient, route: str, n: int) -> Call:
    row = instance(LOW if n % 4 == 0 else CONFIDENT, n % CLASSES)  # a quarter to the teacher
    body: dict[str, object]
    if route == "v1":
        path, body = "/v1/predict", {"inputs": [row], "routing_key": f"user-{n % 97}"}
    else:
        tensor: dict[str, object] = {
            "name": "input", "shape": [1, FEATURES], "datatype": "FP32", "data": row
        }  # fmt: skip
        path, body = "/v2/models/tiny/infer", {"inputs": [tensor]}
    sent = time.monotonic()
    try:
        response = await http.post(path, json=body)
    except httpx.HTTPError as exc:
        return Call(route, sent, time.monotonic(), -1, error=repr(exc))
    received = time.monotonic()
    if response.status_code != 200:
        return Call(route, sent, received, response.status_code, error=response.text)
    payload = response.json()
    if route == "v1":
        versions = {p["model_version"] for p in payload["predictions"]}
    else:
        versions = {payload["model_version"], payload["parameters"]["model_version"]}
    if len(versions) != 1:
        return Call(route, sent, received, 200, error=f"mixed versions {versions}")
    return Call(route, sent, received, 200, versions.pop())


class Load:
    """`CLIENTS` concurrent clients in a bounded loop; every answer is kept as a `Call`."""

    def __init__(self, url: str, *, max_seconds: float, pause_s: float = 0.005) -> None:
        self.calls: list[Call] = []
        self._url = url
        self._max_seconds = max_seconds
        self._pause_s = pause_s
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _client(self, index: int) -> None:
        route = "v1" if index % 2 == 0 else "oip"
        # No keep-alive: every request is a new connection, which either worker may accept.
        limits = httpx.Limits(max_keepalive_connections=0)
        end = time.monotonic() + self._max_seconds
        async with httpx.AsyncClient(base_url=self._url, timeout=10.0, limits=limits) as http:
            for n in range(index, index + 100_000):
                if self._stop.is_set() or time.monotonic() > end:
                    return
                self.calls.append(await _call(http, route, n))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self._pause_s)

    async def answering(self, version: str, *, since: float, what: str) -> None:
        """Wait until a call sent at or after `since` was answered by `version`."""

        def seen() -> bool:
            return any(c.version == version and c.sent >= since for c in self.calls)

        await wait_until(seen, timeout_s=BOUND_S, what=f"{what}: version {version} answering")

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(CLIENTS)]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


def failures(calls: list[Call]) -> list[Call]:
    return [c for c in calls if c.status != 200 or c.error is not None]


# -- the timeline of changes -----------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One admin change: when it was asked for, when it answered, what serves after it."""

    what: str
    started: float
    returned: float
    serving: frozenset[str]


def allowed_versions(call: Call, changes: list[Change]) -> set[str]:
    """Versions that may answer `call`: those of every change live while it was in flight.

    A change is live from the moment it is asked for until the next change has answered
    and had `BOUND_S` to reach every worker.
    """
    allowed: set[str] = set()
    for k, change in enumerate(changes):
        until = changes[k + 1].returned + BOUND_S if k + 1 < len(changes) else math.inf
        if change.started <= call.received and call.sent <= until:
            allowed |= change.serving
    return allowed


def check_timeline(calls: list[Call], changes: list[Change]) -> None:
    wrong = [(c, allowed_versions(c, changes)) for c in calls]
    wrong = [(c, allowed) for c, allowed in wrong if c.version not in allowed]
    assert not wrong, f"{len(wrong)} answers from versions not serving then, e.g. {wrong[:3]}"


def first_answer_seconds(calls: list[Call], changes: list[Change], k: int) -> float | None:
    """From asking for change `k` to the first answer by a version it brought in."""
    new = changes[k].serving - changes[k - 1].serving
    times = [c.received for c in calls if c.version in new and c.sent >= changes[k].started]
    return min(times) - changes[k].started if new and times else None


def settle_seconds(calls: list[Call], changes: list[Change], k: int) -> float:
    """How long after change `k` answered some worker still served what it replaced.

    Only calls sent after it answered and answered before the next change was asked for
    count: a call's send time is taken in this busy client, so one that looks sent just
    before the next change may reach the server after it.
    """
    change = changes[k]
    until = changes[k + 1].started if k + 1 < len(changes) else math.inf
    stale = [
        c.sent
        for c in calls
        if change.returned <= c.sent and c.received <= until and c.version not in change.serving
    ]
    return max(stale) - change.returned if stale else 0.0


# -- admin calls -----------------------------------------------------------------------


async def admin(
    http: httpx.AsyncClient, method: str, path: str, body: object = None
) -> httpx.Response:
    return await http.request(method, f"/v1/admin{path}", json=body, headers=ADMIN)


def counter(metrics: dict[Any, float], name: str, **labels: str) -> float:
    key = (name, tuple(sorted({"model": "tiny", **labels}.items())))
    return metrics.get(key, 0.0)


async def activations(http: httpx.AsyncClient, status: str) -> float:
    return counter(await scrape(http), ACTIVATIONS, kind="student", status=status)


async def eventually(check: Callable[[], Awaitable[bool]], *, what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while not await check():
        assert time.monotonic() < deadline, f"not within {BOUND_S}s: {what}"
        await asyncio.sleep(0.05)


class Driver:
    """Makes changes through the admin API and waits until every worker follows them."""

    def __init__(self, http: httpx.AsyncClient, load: Load, serving: str) -> None:
        self.http = http
        self.load = load
        self.changes = [Change("start", -math.inf, -math.inf, frozenset({serving}))]
        self.activated = 0.0  # successful activations, summed over the workers

    async def start(self) -> None:
        self.activated = await activations(self.http, "succeeded")

    async def change(
        self, what: str, path: str, serving: set[str], *, swaps: bool, body: object = None
    ) -> dict[str, Any]:
        started = time.monotonic()
        response = await admin(self.http, "POST", path, body)
        returned = time.monotonic()
        assert response.status_code in (200, 201), f"{what}: {response.text}"
        change = Change(what, started, returned, frozenset(serving))
        previous = self.changes[-1]
        self.changes.append(change)
        if swaps:  # every worker loads, validates and swaps in the new student
            self.activated += WORKERS

            async def all_swapped() -> bool:
                return await activations(self.http, "succeeded") >= self.activated

            await eventually(all_swapped, what=f"{what}: every worker swapped")
        for version in change.serving - previous.serving:
            await self.load.answering(version, since=returned, what=what)
        await asyncio.sleep(2 * APPLY_INTERVAL_S)  # let traffic see the settled state
        payload: dict[str, Any] = response.json()
        return payload

    async def activate(self, version: str) -> None:
        path = f"/models/tiny/versions/{version}/activate"
        await self.change(f"activate {version}", path, {version}, swaps=True)

    async def rollout(self, candidate: str, serving: str) -> int:
        """Put `candidate` in shadow: `serving` keeps answering everything."""
        body = {"candidate_version": candidate}
        created = await self.change("shadow", "/rollouts", {serving}, swaps=False, body=body)
        assert created["stage"] == "shadow" and created["candidate_version"] == candidate
        rollout_id: int = created["id"]
        return rollout_id


async def assert_resting(http: httpx.AsyncClient) -> None:
    """A serves (stored and on disk) and no rollout is open."""
    model = (await admin(http, "GET", "/models/tiny")).json()
    assert model["active"]["student"] == A
    rollouts = (await admin(http, "GET", "/rollouts")).json()
    assert all(r["stage"] in ("promoted", "rolled_back") for r in rollouts), rollouts


def report(title: str, calls: list[Call], **figures: object) -> None:
    shown = " ".join(f"{key}={value}" for key, value in figures.items())
    routes = {route: sum(c.route == route for c in calls) for route in ("v1", "oip")}
    print(f"\n{title}: requests={len(calls)} {routes} non_2xx={len(failures(calls))} {shown}")


# -- the tests -------------------------------------------------------------------------


async def test_hot_swap_under_load_has_zero_non_2xx(served: Served) -> None:
    b, c = served.versions["B"], served.versions["C"]
    async with (
        httpx.AsyncClient(base_url=served.server.url, timeout=10.0) as http,
        Load(served.server.url, max_seconds=75.0) as load,
    ):
        await assert_resting(http)
        driver = Driver(http, load, A)
        await driver.start()
        await asyncio.sleep(0.3)  # a baseline on A first
        for cycle in range(CYCLES):
            await driver.activate(b)
            await driver.activate(A)  # rollback by hand
            rollout_id = await driver.rollout(c, A)
            await driver.change("advance", f"/rollouts/{rollout_id}/advance", {A, c}, swaps=False)
            if cycle % 2 == 0:
                await driver.change("promote", f"/rollouts/{rollout_id}/promote", {c}, swaps=True)
                await driver.activate(A)  # roll back the promotion
            else:
                await driver.change(
                    "rollback", f"/rollouts/{rollout_id}/rollback", {A}, swaps=False
                )
        await assert_resting(http)
    calls, changes = load.calls, driver.changes
    settles = [settle_seconds(calls, changes, k) for k in range(1, len(changes))]
    firsts = [first_answer_seconds(calls, changes, k) for k in range(1, len(changes))]
    report(
        "hot swap", calls, changes=len(changes) - 1,
        swaps=sum(ch.what.startswith(("activate", "promote")) for ch in changes),
        first_answer_max_s=f"{max(f for f in firsts if f is not None):.3f}",
        settle_max_s=f"{max(settles):.3f}", bound_s=BOUND_S,
    )  # fmt: skip
    for ch, first, settle in zip(changes[1:], firsts, settles, strict=True):
        shown = "-" if first is None else f"{first:.3f}s"
        print(f"  {ch.what}: call {ch.returned - ch.started:.3f}s, first new answer {shown}, "
              f"last old answer sent {settle:.3f}s after it answered")  # fmt: skip
    assert len(calls) > 300
    assert not failures(calls), failures(calls)[:5]
    check_timeline(calls, changes)
    assert {call.version for call in calls} == {A, b, c}
    late = [(ch.what, s) for ch, s in zip(changes[1:], settles, strict=True) if s > BOUND_S]
    assert not late, f"changes that took longer than {BOUND_S}s to reach every worker: {late}"


# -- broken candidates -----------------------------------------------------------------

BROKEN = {  # kind → what the refusal says
    "truncated": "not a valid ONNX model",
    "input_name": "input is named",
    "features": "takes 5 features",
    "checksum": "checksum mismatch",
}


def good_onnx(scale: float, features: int = FEATURES) -> bytes:
    weight = diagonal_weights(scale, features=features)
    return linear_onnx(weight, np.zeros(CLASSES, np.float32))


def register_broken(registry: ModelRegistry, kind: str) -> str:
    """A version with one defect, written into the registry while the server runs."""
    data, spec = good_onnx(2.0), InputSpec("input", FEATURES)
    if kind == "truncated":
        data = data[: len(data) // 2]
    elif kind == "input_name":
        spec = InputSpec("pixels", FEATURES)  # the model's input is called "input"
    elif kind == "features":
        data, spec = good_onnx(2.0, features=5), InputSpec("input", 5)
    manifest = registry.register(
        name="tiny", role="student", model=data, input=spec, output_name="logits",
        class_names=[f"class-{i}" for i in range(CLASSES)],
    )  # fmt: skip
    if kind == "checksum":  # a valid model, but not the bytes the manifest vouches for
        registry.model_path(manifest).write_bytes(good_onnx(9.0))
    return manifest.version


def refused(response: httpx.Response, says: str) -> bool:
    body = response.json()
    return (
        response.status_code == 422
        and response.headers["content-type"].startswith("application/json")
        and body["code"] == "model_invalid"
        and says in body["error"]
    )


async def test_broken_candidates_are_refused_under_load(served: Served) -> None:
    async with (
        httpx.AsyncClient(base_url=served.server.url, timeout=10.0) as http,
        Load(served.server.url, max_seconds=30.0) as load,
    ):
        await assert_resting(http)
        before = await scrape(http)
        rollouts_before = len((await admin(http, "GET", "/rollouts")).json())
        await asyncio.sleep(0.3)
        broken: dict[str, str] = {}
        for kind, says in BROKEN.items():
            version = broken[kind] = register_broken(served.registry, kind)
            activation = await admin(http, "POST", f"/models/tiny/versions/{version}/activate")
            assert refused(activation, says), (kind, activation.text)
            rollout = await admin(http, "POST", "/rollouts", {"candidate_version": version})
            assert refused(rollout, says), (kind, rollout.text)
            await load.answering(A, since=time.monotonic(), what=f"after {kind} was refused")
        await asyncio.sleep(4 * APPLY_INTERVAL_S)  # every worker had rounds to go wrong in
        after = await scrape(http)
        await assert_resting(http)
        assert len((await admin(http, "GET", "/rollouts")).json()) == rollouts_before
    calls = load.calls
    report("broken candidates", calls, refused=2 * len(BROKEN), versions=sorted(broken.values()))
    assert len(calls) > 50
    assert not failures(calls), failures(calls)[:5]
    assert {call.version for call in calls} == {A}

    def grew(status: str) -> float:
        labels = {"kind": "student", "status": status}
        return counter(after, ACTIVATIONS, **labels) - counter(before, ACTIVATIONS, **labels)

    assert grew("failed") == len(BROKEN)  # one refused load per activation asked for
    assert grew("succeeded") == 0


async def test_a_candidate_changed_on_disk_is_refused_at_promotion(served: Served) -> None:
    """Its rollout validated it; the bytes changed since: the promotion must not stand."""
    candidate = register_linear(
        served.registry, name="tiny", role="student", scale=7.0, activate=False
    )
    async with (
        httpx.AsyncClient(base_url=served.server.url, timeout=10.0) as http,
        Load(served.server.url, max_seconds=30.0) as load,
    ):
        await assert_resting(http)
        driver = Driver(http, load, A)
        await driver.start()
        failed_before = await activations(http, "failed")
        rollout_id = await driver.rollout(candidate.version, A)
        await driver.change(
            "advance", f"/rollouts/{rollout_id}/advance", {A, candidate.version}, swaps=False
        )
        served.registry.model_path(candidate).write_bytes(good_onnx(9.0))
        promotion = await admin(http, "POST", f"/rollouts/{rollout_id}/promote")
        assert refused(promotion, "checksum mismatch"), promotion.text
        assert (await admin(http, "GET", f"/rollouts/{rollout_id}")).json()["stage"] == "ab"
        await driver.change("rollback", f"/rollouts/{rollout_id}/rollback", {A}, swaps=False)
        await assert_resting(http)
        promoted = (await admin(http, "GET", "/audit?action=rollout.promoted")).json()
        after = await scrape(http)
    calls = load.calls
    report("changed on disk", calls, changes=len(driver.changes) - 1)
    assert not failures(calls), failures(calls)[:5]
    check_timeline(calls, driver.changes)
    assert f"rollout {rollout_id}" not in {row["subject"] for row in promoted}
    assert counter(after, ACTIVATIONS, kind="student", status="failed") == failed_before
    assert counter(after, ACTIVATIONS, kind="student", status="succeeded") == driver.activated


# -- two promotions at once ------------------------------------------------------------

RACES = 3


async def test_two_promotions_at_once_one_wins_the_other_gets_409(served: Served) -> None:
    c = served.versions["C"]
    outcomes: list[tuple[int, int]] = []
    async with (
        httpx.AsyncClient(base_url=served.server.url, timeout=10.0) as http,
        Load(served.server.url, max_seconds=40.0) as load,
    ):
        await assert_resting(http)
        driver = Driver(http, load, A)
        await driver.start()
        decisions = counter(await scrape(http), DECISIONS, outcome="promoted")
        for race in range(RACES):
            rollout_id = await driver.rollout(c, A)
            if race % 2:  # from A/B, and (even races) straight from shadow
                await driver.change(
                    "advance", f"/rollouts/{rollout_id}/advance", {A, c}, swaps=False
                )
            path = f"/v1/admin/rollouts/{rollout_id}/promote"
            started = time.monotonic()
            # Two clients, two connections: each may land on either worker.
            async with (
                httpx.AsyncClient(base_url=served.server.url, timeout=10.0) as one,
                httpx.AsyncClient(base_url=served.server.url, timeout=10.0) as two,
            ):
                first, second = await asyncio.gather(
                    one.post(path, headers=ADMIN), two.post(path, headers=ADMIN)
                )
            returned = time.monotonic()
            outcomes.append((first.status_code, second.status_code))
            assert sorted(outcomes[-1]) == [200, 409], (first.text, second.text)
            winner, loser = (first, second) if first.status_code == 200 else (second, first)
            assert winner.json()["stage"] == "promoted"
            assert loser.json()["code"] == "conflict" and "promoted" in loser.json()["error"]
            driver.changes.append(Change("promote race", started, returned, frozenset({c})))
            driver.activated += WORKERS  # each worker swaps once: the loser adds nothing

            async def all_swapped() -> bool:
                return await activations(http, "succeeded") >= driver.activated

            await eventually(all_swapped, what="every worker serving the winner's candidate")
            await asyncio.sleep(2 * APPLY_INTERVAL_S)
            assert await activations(http, "succeeded") == driver.activated
            await driver.activate(A)
        metrics = await scrape(http)
        promoted = await admin(http, "GET", "/audit?action=rollout.promoted")
        await assert_resting(http)
    calls = load.calls
    report("two promotions", calls, races=RACES, outcomes=outcomes)
    assert counter(metrics, DECISIONS, outcome="promoted") - decisions == RACES
    subjects = [row["subject"] for row in promoted.json()]
    assert len(subjects) == len(set(subjects))  # one promotion stored per rollout
    assert not failures(calls), failures(calls)[:5]
    check_timeline(calls, driver.changes)
