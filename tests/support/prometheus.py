"""A real Prometheus for tests: its binaries, and a server on a free port with its own data.

Prometheus is a Debian package (`apt-get install prometheus`), which `.ci/run` installs.
On a machine without it the tests that need it are skipped with the command to run; in
CI (`CI` set) they fail instead, so a missing install can never pass for green.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.processes import HOST, free_port

INSTALL_HINT = "apt-get install -y prometheus (Debian package; .ci/run installs it)"


def require_binary(name: str) -> str:
    """The path of `name` (promtool, prometheus); skip here, fail in CI, if it is missing."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed: {INSTALL_HINT}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


class PrometheusServer:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.url = url
        self.proc = proc
        self.log_path = log_path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>; the `data` of a successful answer (else AssertionError)."""
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10.0)
        body = response.json()
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query at now: the result vector (scalars come back as one sample)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result


@contextlib.contextmanager
def prometheus_server(
    work_dir: Path, *, targets: list[str], rule_files: list[Path], interval_ms: int = 1000
) -> Iterator[PrometheusServer]:
    """Prometheus scraping `targets` (job "kdguard") and evaluating `rule_files`.

    Its configuration and data live in `work_dir`; it listens on a free loopback port
    (never the packaged service's 9090) and is stopped on exit.
    """
    binary = require_binary("prometheus")
    work_dir.mkdir(parents=True, exist_ok=True)
    interval = f"{interval_ms}ms"
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [{"job_name": "kdguard", "static_configs": [{"targets": targets}]}],
    }
    config_path = work_dir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = work_dir / "prometheus.log"
    argv = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={work_dir / 'data'}",
        f"--web.listen-address={HOST}:{port}",
        "--log.level=warn",
    ]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    server = PrometheusServer(f"http://{HOST}:{port}", proc, log_path)
    try:
        _wait_ready(server, timeout_s=30.0)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        print(f"--- prometheus (pid {proc.pid}); output:\n{server.output()}", file=sys.stderr)


def _wait_ready(server: PrometheusServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {server.output()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{server.url}/-/ready", timeout=1.0).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"prometheus not ready in {timeout_s}s: {server.output()}")
        time.sleep(0.1)
