"""What the schemathesis run (tests/faults/test_schemathesis.py) found, pinned down.

Each test is one finding: the request that broke the service or its OpenAPI contract,
and the answer it must get now.
"""

from __future__ import annotations

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
