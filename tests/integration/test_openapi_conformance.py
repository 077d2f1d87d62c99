"""What the schemathesis run (tests/faults/test_schemathesis.py) found, pinned down.

Each test is one finding: the request that broke the service or its OpenAPI contract,
and the answer it must get now.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_KEY

ADMIN = {"X-API-Key": ADMIN_KEY}
TOO_BIG = "467859658946458847019008"  # over 2**63: SQLite cannot even compare with it


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", f"/v1/admin/rollouts/{TOO_BIG}"),
        ("POST", f"/v1/admin/rollouts/{TOO_BIG}/advance"),
        ("POST", f"/v1/admin/rollouts/{TOO_BIG}/gate"),
        ("GET", f"/v1/admin/jobs/{TOO_BIG}"),
        ("POST", f"/v1/admin/jobs/{TOO_BIG}/cancel"),
        ("GET", "/v1/admin/jobs/0"),
    ],
)
async def test_row_ids_out_of_range_are_refused_not_a_server_error(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await client.request(method, path, headers=ADMIN)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "unprocessable"


@pytest.mark.parametrize(
    "authorization", ["Df!", "", "Basic YWRtaW46YWRtaW4=", "Bearer ", "Bearer nope"]
)
async def test_a_malformed_authorization_header_is_refused_beside_a_valid_api_key(
    client: httpx.AsyncClient, authorization: str
) -> None:
    headers = {**ADMIN, "Authorization": authorization}
    response = await client.get("/v1/admin/routing", headers=headers)
    assert response.status_code == 401, response.text
    assert (await client.get("/v1/admin/routing", headers=ADMIN)).status_code == 200
    bearer = {"Authorization": f"bearer {ADMIN_KEY}"}
    assert (await client.get("/v1/admin/routing", headers=bearer)).status_code == 200


async def test_openapi_declares_how_admin_routes_authenticate(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearer"] == {"type": "http", "scheme": "bearer", "description": "`Bearer KEY`"}
    assert schemes["apiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            secured = {name for option in operation.get("security", []) for name in option}
            expected = {"bearer", "apiKey"} if path.startswith("/v1/admin/") else set()
            assert secured == expected, (method, path)


@pytest.mark.parametrize(
    ("method", "path"),
    [("PUT", "/v1/admin/routing"), ("POST", "/v1/admin/jobs"), ("POST", "/v1/admin/rollouts")],
)
async def test_an_unparsable_admin_body_gets_a_documented_400(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    headers = {**ADMIN, "Content-Type": "application/json"}
    response = await client.request(method, path, headers=headers, content=b"\x11K\xff\xfeQ")
    assert response.status_code == 400
    assert response.json()["code"] == "bad_request"
    document = (await client.get("/openapi.json")).json()
    assert "400" in document["paths"][path][method.lower()]["responses"]


async def test_metrics_document_the_content_type_they_answer_with(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain;")
    document = (await client.get("/openapi.json")).json()
    assert list(document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == [
        "text/plain"
    ]


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/v1/admin/routing", "GET, PUT"),
        ("/v1/admin/jobs", "GET, POST"),
        ("/v1/admin/rollouts", "GET, POST"),
        ("/v1/predict", "POST"),
    ],
)
async def test_a_405_lists_every_method_the_path_allows(
    client: httpx.AsyncClient, path: str, allowed: str
) -> None:
    response = await client.request("OPTIONS", path, headers=ADMIN)
    assert response.status_code == 405
    assert response.headers["allow"] == allowed
    assert response.json()["code"] == "method_not_allowed"


async def test_request_bodies_have_no_dangling_references(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    text = str(document)
    assert "#/$defs/" not in text
    infer = document["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]
    tensor = infer["content"]["application/json"]["schema"]["properties"]["inputs"]["items"]
    assert {"name", "shape", "datatype", "data"} <= set(tensor["properties"])


async def test_an_unknown_job_status_filter_is_refused(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/admin/jobs?status=-6.2e16", headers=ADMIN)
    assert response.status_code == 422
    response = await client.get("/v1/admin/jobs?status=failed&status=pending", headers=ADMIN)
    assert response.status_code == 200


async def test_body_schemas_say_what_the_handlers_accept(client: httpx.AsyncClient) -> None:
    """Requests valid by the schema but refused by the handler (empty batches, several OIP
    tensors, malformed request ids) now violate the schema too."""
    document = (await client.get("/openapi.json")).json()

    def body(path: str) -> dict[str, Any]:
        operation = document["paths"][path]["post"]["requestBody"]
        schema: dict[str, Any] = operation["content"]["application/json"]["schema"]
        return schema

    predict = body("/v1/predict")["properties"]
    assert all(option["minItems"] == 1 for option in predict["inputs"]["anyOf"])
    ids = predict["request_ids"]["anyOf"][0]["items"]
    assert ids["pattern"] == r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
    tensors = body("/v2/models/{name}/infer")["properties"]["inputs"]
    assert (tensors["minItems"], tensors["maxItems"]) == (1, 1)
    feedback = body("/v1/feedback")["anyOf"]
    assert feedback[0]["properties"]["request_id"]["pattern"] == ids["pattern"]
    assert feedback[1]["minItems"] == 1

    # And the handlers refuse what the schema refuses.
    bad = [
        ("/v1/predict", {"inputs": []}),
        ("/v2/models/tiny/infer", {"inputs": []}),
        ("/v1/feedback", [{"request_id": "", "label": 1}]),
        ("/v1/feedback", []),
    ]
    for path, payload in bad:
        assert (await client.post(path, json=payload, headers=ADMIN)).status_code == 400, path


@pytest.mark.parametrize(
    "update",
    [{"shadow_rate": False}, {"fallback_threshold": True}, {"shadow_rate": "0.1"}, {"tau": 0.5}],
)
async def test_routing_updates_take_numbers_only(
    client: httpx.AsyncClient, update: dict[str, object]
) -> None:
    before = (await client.get("/v1/admin/routing", headers=ADMIN)).json()
    response = await client.put("/v1/admin/routing", json=update, headers=ADMIN)
    assert response.status_code == 422, response.text
    assert (await client.get("/v1/admin/routing", headers=ADMIN)).json() == before
    response = await client.put("/v1/admin/routing", json={"shadow_rate": 0}, headers=ADMIN)
    assert response.status_code == 200
    assert response.json()["shadow_rate"] == 0.0
