"""The whole loop, end to end, in real processes: `kdguard demo --traffic` builds the digits
models, drives clean then drifted traffic with delayed labels, and on its own the server
fires rules, runs jobs in child processes, and puts a re-distilled candidate through
shadow and A/B to a gated promotion. Watched only through the public HTTP API."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.cli import DEMO_ADMIN_KEY
from tests.support.processes import ServerProcess, _running, free_port

pytestmark = pytest.mark.slow

LOOP_TIMEOUT_S = 600.0


def admin_get(client: httpx.Client, path: str) -> Any:
    response = client.get(path, headers={"X-API-Key": DEMO_ADMIN_KEY})
    response.raise_for_status()
    return response.json()


def test_drift_fires_jobs_and_a_candidate_is_promoted(tmp_path: Path) -> None:
    port = free_port()
    argv = [
        sys.executable, "-m", "service.cli", "demo", "--traffic", "--port", str(port),
        "--data-dir", str(tmp_path / "demo"), "--duration", str(LOOP_TIMEOUT_S),
    ]  # fmt: skip
    server = ServerProcess("demo", argv, port, tmp_path / "demo.log")
    with _running(server, ready_timeout_s=300.0), httpx.Client(base_url=server.url) as client:
        deadline = time.monotonic() + LOOP_TIMEOUT_S
        promoted: dict[str, Any] | None = None
        while promoted is None:
            server.assert_alive()
            assert time.monotonic() < deadline, "no promotion in time:\n" + server.output()
            time.sleep(5.0)
            rollouts = admin_get(client, "/v1/admin/rollouts")
            promoted = next((r for r in rollouts if r["stage"] == "promoted"), None)
        jobs = admin_get(client, "/v1/admin/jobs")
        firings = admin_get(client, "/v1/admin/firings")
        model = admin_get(client, "/v1/admin/models/digits")
        prediction = client.post("/v1/predict", json={"inputs": [[0.0] * 64]}).json()
        metrics = client.get("/metrics").text

    redistilled = [j for j in jobs if j["kind"] == "redistill" and j["status"] == "succeeded"]
    assert redistilled, jobs
    job = next(j for j in redistilled if j["id"] == promoted["job_id"])
    assert job["rule"] in {"accuracy-gap", "flips"} and job["evidence"]["windows"]
    assert any(f["job_id"] == job["id"] for f in firings)
    assert job["result"]["candidate_version"] == promoted["candidate_version"]
    stats = promoted["statistics"]
    assert stats["verdict"] == "pass" and stats["pairs"] >= 200 and stats["labelled_pairs"] >= 50
    assert model["active"]["student"] == promoted["candidate_version"]
    assert prediction["predictions"][0]["model_version"] == promoted["candidate_version"]
    assert 'kdguard_rollout_decisions_total{model="digits",outcome="promoted"} 1.0' in metrics
