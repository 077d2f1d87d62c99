"""Admin API: deny by default, scopes, validated activation and hot swap under traffic."""

from __future__ import annotations

import asyncio
import urllib.parse

import httpx
import numpy as np
import pytest

from service.registry import InputSpec, ModelRegistry
from service.settings import Settings
from tests.conftest import ADMIN_KEY, PREDICT_KEY, make_settings, running_app
from tests.support.fakes import FakeTeacher
from tests.support.models import diagonal_weights, instance, linear_onnx, register_linear
from tests.unit.test_registry import TRAVERSAL_NAMES

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/admin/models"),
        ("GET", "/v1/admin/models/tiny"),
        ("POST", "/v1/admin/models/tiny/versions/1/activate"),
        ("GET", "/v1/admin/routing"),
        ("PUT", "/v1/admin/routing"),
    ],
)
async def test_admin_routes_need_an_admin_key(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    anonymous = await client.request(method, path, json={})
    wrong = await client.request(
        method, path, json={}, headers={"X-API-Key": "not-a-key-at-all-really"}
    )
    predict_only = await client.request(method, path, json={}, headers={"X-API-Key": PREDICT_KEY})
    assert anonymous.status_code == 401 and wrong.status_code == 401
    assert predict_only.status_code == 403


async def test_no_admin_key_configured_means_nobody_gets_in(registry: ModelRegistry) -> None:
    settings = make_settings(registry.root, auth={"api_keys": []})
    async with running_app(settings, teacher=FakeTeacher()) as (_, client):
        response = await client.get("/v1/admin/models", headers=ADMIN)
    assert response.status_code == 401


async def test_list_models_and_versions(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/admin/models", headers=ADMIN)).json()
    assert {m["name"] for m in models} == {"tiny", "tiny-teacher"}
    tiny = (await client.get("/v1/admin/models/tiny", headers=ADMIN)).json()
    assert tiny["active"] == {"student": "1"} and tiny["versions"][0]["active"] is True
    assert (await client.get("/v1/admin/models/nope", headers=ADMIN)).status_code == 404


async def test_routing_can_be_read_and_changed(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/admin/routing", headers=ADMIN)).json() == {
        "fallback_threshold": 0.6,
        "shadow_rate": 0.0,
    }
    changed = await client.put(
        "/v1/admin/routing", json={"fallback_threshold": 0.99}, headers=ADMIN
    )
    assert changed.json() == {"fallback_threshold": 0.99, "shadow_rate": 0.0}
    served = (await client.post("/v1/predict", json={"inputs": [instance(1.0)]})).json()[
        "predictions"
    ][0]
    assert served["served_by"] == "teacher"  # 0.96 < 0.99 now
    bad = await client.put("/v1/admin/routing", json={"shadow_rate": 2}, headers=ADMIN)
    assert bad.status_code == 422 and "error" in bad.json()


async def test_activation_swaps_the_serving_version(
    client: httpx.AsyncClient, registry: ModelRegistry
) -> None:
    register_linear(registry, name="tiny", role="student", scale=6.0, activate=False)
    response = await client.post("/v1/admin/models/tiny/versions/2/activate", headers=ADMIN)
    assert response.status_code == 200 and response.json()["version"] == "2"
    p = (await client.post("/v1/predict", json={"inputs": [instance(1.0)]})).json()["predictions"][
        0
    ]
    assert p["model_version"] == "2" and p["confidence"] > 0.99
    assert registry.active("tiny")["student"] == "2"


def register_broken(registry: ModelRegistry, kind: str) -> str:
    good = linear_onnx(diagonal_weights(1.0), np.zeros(3, np.float32))
    spec, data, classes = InputSpec("input", 4), good, ["class-0", "class-1", "class-2"]
    if kind == "truncated":
        data = good[: len(good) // 2]
    elif kind == "input_spec":
        spec = InputSpec("pixels", 4)
    elif kind == "classes":
        classes = ["a", "b", "c"]
    manifest = registry.register(
        name="tiny",
        role="student",
        model=data,
        input=spec,
        output_name="logits",
        class_names=classes,
    )
    if kind == "checksum":
        registry.model_path(manifest).write_bytes(
            linear_onnx(diagonal_weights(9.0), np.zeros(3, np.float32))
        )
    return manifest.version


@pytest.mark.parametrize("kind", ["truncated", "input_spec", "checksum", "classes"])
async def test_broken_candidates_are_refused_and_the_active_version_keeps_serving(
    client: httpx.AsyncClient, registry: ModelRegistry, kind: str
) -> None:
    version = register_broken(registry, kind)
    response = await client.post(
        f"/v1/admin/models/tiny/versions/{version}/activate", headers=ADMIN
    )
    assert response.status_code == 422 and response.json()["code"] == "model_invalid"
    p = (await client.post("/v1/predict", json={"inputs": [instance(1.0)]})).json()["predictions"][
        0
    ]
    assert p["model_version"] == "1"
    assert registry.active("tiny")["student"] == "1"
    metrics = (await client.get("/metrics")).text
    assert (
        'kdguard_model_activations_total{kind="student",model="tiny",status="failed"} 1.0'
        in metrics
    )


async def test_unknown_version_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/admin/models/tiny/versions/42/activate", headers=ADMIN)
    assert response.status_code == 404


async def test_hot_swap_under_concurrent_traffic_has_zero_non_2xx(
    settings: Settings, registry: ModelRegistry
) -> None:
    for scale in (5.0, 6.0, 7.0):
        register_linear(registry, name="tiny", role="student", scale=scale, activate=False)
    statuses: list[int] = []
    versions: set[str] = set()
    stop = asyncio.Event()

    async def traffic(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            r = await client.post(
                "/v1/predict", json={"inputs": [instance(1.0), instance(0.05, 1)]}
            )
            statuses.append(r.status_code)
            if r.status_code == 200:
                versions.update(p["model_version"] for p in r.json()["predictions"])

    async with running_app(settings, teacher=FakeTeacher()) as (_, client):
        workers = [asyncio.create_task(traffic(client)) for _ in range(8)]
        for version in ("2", "3", "4", "1", "3"):
            await asyncio.sleep(0.05)
            response = await client.post(
                f"/v1/admin/models/tiny/versions/{version}/activate", headers=ADMIN
            )
            assert response.status_code == 200
        await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*workers)
    assert len(statuses) > 50
    assert set(statuses) == {200}
    assert versions == {"1", "2", "3", "4"}


# An empty segment is another route ("/v1/admin/models/" redirects to the list).
@pytest.mark.parametrize("name", [n for n in TRAVERSAL_NAMES if n])
async def test_path_like_names_in_urls_are_refused_and_nothing_changes(
    client: httpx.AsyncClient, name: str
) -> None:
    """Every route that names a model or version, with each traversal name, encoded so
    that it reaches the server as one segment (dots too: a client would resolve "..")."""
    quoted = urllib.parse.quote(name, safe="").replace(".", "%2E")
    before = (await client.get("/v1/admin/models/tiny", headers=ADMIN)).json()
    calls = [
        ("GET", f"/v1/admin/models/{quoted}"),
        ("POST", f"/v1/admin/models/tiny/versions/{quoted}/activate"),
        ("POST", f"/v1/admin/models/{quoted}/versions/1/activate"),
        ("GET", f"/v2/models/{quoted}"),
        ("GET", f"/v2/models/tiny/versions/{quoted}"),
        ("GET", f"/v2/models/tiny/versions/{quoted}/ready"),
        ("POST", f"/v2/models/{quoted}/infer"),
    ]
    for method, path in calls:
        response = await client.request(method, path, json={}, headers=ADMIN)
        assert 400 <= response.status_code < 500, (method, path, response.status_code)
        if response.status_code != 404 or response.headers.get("content-type", "").startswith(
            "application/json"
        ):
            assert "error" in response.json(), (method, path, response.text)
    assert (await client.get("/v1/admin/models/tiny", headers=ADMIN)).json() == before
