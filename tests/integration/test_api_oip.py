"""Open Inference Protocol v2 through the real app: JSON, binary extension, errors."""

from __future__ import annotations

import httpx
import numpy as np
import orjson
import pytest

from service.settings import Settings
from tests.conftest import running_app
from tests.support.models import instance

X = np.array([instance(1.0, 0), instance(0.05, 1)], np.float32)


def infer_body(x: np.ndarray, **extra: object) -> dict[str, object]:
    tensor = {
        "name": "input",
        "shape": list(x.shape),
        "datatype": "FP32",
        "data": x.ravel().tolist(),
    }
    return {"inputs": [tensor], **extra}


async def test_health_and_metadata(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v2/health/live")).json() == {"live": True}
    assert (await client.get("/v2/health/ready")).status_code == 200
    server = (await client.get("/v2")).json()
    assert server["name"] == "kdguard" and "binary_tensor_data" in server["extensions"]
    meta = (await client.get("/v2/models/tiny")).json()
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert {o["name"] for o in meta["outputs"]} >= {"label", "confidence", "probabilities"}
    assert (await client.get("/v2/models/tiny/versions/1")).status_code == 200
    assert (await client.get("/v2/models/tiny/ready")).json()["ready"] is True
    assert (await client.get("/v2/models/tiny/versions/1/ready")).status_code == 200


async def test_json_infer_returns_outputs_and_provenance(client: httpx.AsyncClient) -> None:
    response = await client.post("/v2/models/tiny/infer", json=infer_body(X, id="req-7"))
    assert response.status_code == 200
    body = response.json()
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["label"] == {"name": "label", "datatype": "INT64", "shape": [2], "data": [0, 1]}
    assert outputs["probabilities"]["shape"] == [2, 3]
    assert body["id"] == "req-7" and body["model_version"] == "1"
    assert body["parameters"]["served_by"] == "student,teacher"
    assert body["parameters"]["degraded"] == "false,false"
    assert len(body["parameters"]["request_id"].split(",")) == 2


async def test_binary_tensor_extension_in_and_out(client: httpx.AsyncClient) -> None:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [2, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": X.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    response = await client.post(
        "/v2/models/tiny/versions/1/infer",
        content=header + X.tobytes(),
        headers={
            "Inference-Header-Content-Length": str(len(header)),
            "content-type": "application/octet-stream",
        },
    )
    assert response.status_code == 200
    length = int(response.headers["inference-header-content-length"])
    meta = orjson.loads(response.content[:length])
    blob = response.content[length:]
    offset, values = 0, {}
    for tensor in meta["outputs"]:
        size = tensor["parameters"]["binary_data_size"]
        dtype = {"INT64": "<i8", "FP32": "<f4"}[tensor["datatype"]]
        values[tensor["name"]] = np.frombuffer(blob[offset : offset + size], dtype=dtype).reshape(
            tensor["shape"]
        )
        offset += size
    assert offset == len(blob)
    assert values["label"].tolist() == [0, 1]
    np.testing.assert_allclose(values["probabilities"].sum(axis=1), 1.0, rtol=1e-6)


async def test_requested_outputs_include_bytes_and_bool(client: httpx.AsyncClient) -> None:
    body = infer_body(X, outputs=[{"name": "served_by"}, {"name": "degraded"}])
    response = await client.post("/v2/models/tiny/infer", json=body)
    outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
    assert outputs == {"served_by": ["student", "teacher"], "degraded": [False, False]}


BAD_INFER: list[tuple[dict[str, object], str]] = [
    ({"inputs": []}, "exactly one tensor"),
    (
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 0, 0, 0]}]},
        "unknown input",
    ),
    (
        {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "BYTES", "data": ["a"]}]},
        "datatype",
    ),
    (
        {
            "inputs": [
                {"name": "input", "shape": [1, 5], "datatype": "FP32", "data": [1, 0, 0, 0, 0]}
            ]
        },
        "shape",
    ),
    (
        {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": [1, 0, 0, 0]}]},
        "values",
    ),
    (
        {
            "inputs": [
                {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 0, 0, "a"]}
            ]
        },
        "numbers",
    ),
    (
        {
            "inputs": [
                {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 0, 0, 1e39]}
            ]
        },
        "NaN",
    ),
    ({"inputs": [{"name": "input", "shape": [0, 4], "datatype": "FP32", "data": []}]}, "shape"),
    ({**infer_body(X), "outputs": [{"name": "logits"}]}, "unknown output"),
]


@pytest.mark.parametrize(("body", "message"), BAD_INFER)
async def test_bad_infer_requests_are_400(
    client: httpx.AsyncClient, body: dict[str, object], message: str
) -> None:
    response = await client.post("/v2/models/tiny/infer", json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


async def test_binary_size_mismatch_and_bad_header_are_400(client: httpx.AsyncClient) -> None:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [2, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 28},
                }
            ]
        }
    )
    for length, extra in ((str(len(header)), X.tobytes()), ("abc", b""), ("99999", b"")):
        response = await client.post(
            "/v2/models/tiny/infer",
            content=header + extra,
            headers={"Inference-Header-Content-Length": length},
        )
        assert response.status_code == 400, response.text


async def test_unknown_model_and_version_are_404(client: httpx.AsyncClient) -> None:
    for path in (
        "/v2/models/nope",
        "/v2/models/nope/ready",
        "/v2/models/tiny/versions/7",
        "/v2/models/tiny/versions/..%2F..%2Fetc/ready",
    ):
        response = await client.get(path)
        assert response.status_code == 404, path
        assert isinstance(response.json()["error"], str)
    response = await client.post("/v2/models/nope/infer", json=infer_body(X))
    assert response.status_code == 404


async def test_registered_but_not_loaded_version_is_503(settings: Settings) -> None:
    from service.registry import ModelRegistry
    from tests.support.models import register_linear

    register_linear(
        ModelRegistry(settings.registry.root), name="tiny", role="student", activate=False
    )
    async with running_app(
        settings.model_copy(
            update={"model": settings.model.model_copy(update={"student_version": "1"})}
        )
    ) as (_, client):
        metadata = await client.get("/v2/models/tiny/versions/2")
        ready = await client.get("/v2/models/tiny/versions/2/ready")
        infer = await client.post("/v2/models/tiny/versions/2/infer", json=infer_body(X))
    assert metadata.status_code == 200
    assert ready.status_code == 503 and infer.status_code == 503
    assert "not loaded" in infer.json()["error"]


async def test_wrong_content_type_is_415(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v2/models/tiny/infer", content=b"x", headers={"content-type": "text/csv"}
    )
    assert response.status_code == 415
