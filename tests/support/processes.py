"""Run real processes for end-to-end tests: the fake teacher and `kdguard serve`.

Each runs on a free loopback port, its stdout and stderr go to a log file, and the
context manager waits until it answers `/v2/health/ready`. If it dies first, the error
says so and shows its output. On exit it is terminated (then killed after a timeout), and
its output is printed to stderr, which pytest shows when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.models import CLASSES, FEATURES, make_tiny_registry

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
OUTPUT_TAIL_CHARS = 6000


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class ServerProcess:
    """A server started by this module: its process, port and output."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path) -> None:
        self.name = name
        self.port = port
        self.log_path = log_path
        self.killed = False  # by the test, on purpose
        env = {k: v for k, v in os.environ.items() if not k.startswith("KDGUARD_")}
        env["PYTHONUNBUFFERED"] = "1"
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-OUTPUT_TAIL_CHARS:]

    def describe(self) -> str:
        state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        return f"{self.name} (pid {self.pid}, port {self.port}, {state}); output:\n{self.output()}"

    def assert_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} died unexpectedly: {self.describe()}")

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.url, timeout=1.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited before it was ready: {self.describe()}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/v2/health/ready").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.name} was not ready within {timeout_s}s: {self.describe()}"
                    )
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, as a crash would; returns once the process is gone (port released)."""
        self.killed = True
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate, then kill if it does not exit within `timeout_s`."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@contextlib.contextmanager
def _running(server: ServerProcess, ready_timeout_s: float) -> Iterator[None]:
    died_on_its_own = False
    try:
        server.wait_ready(ready_timeout_s)
        yield
        died_on_its_own = server.proc.poll() is not None and not server.killed
    finally:
        server.stop()
        print(f"--- {server.describe()}", file=sys.stderr)
    if died_on_its_own:
        raise AssertionError(f"{server.name} died during the test: {server.describe()}")


class FakeTeacherProcess(ServerProcess):
    """tests/support/fake_teacher_server.py in its own process, with its control API."""

    def control(self, mode: str, delay_s: float = 0.0) -> dict[str, Any]:
        return self._call("POST", "/control", {"mode": mode, "delay_s": delay_s})

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/stats")

    def reset_stats(self) -> dict[str, Any]:
        return self._call("POST", "/stats/reset")

    async def acontrol(self, mode: str, delay_s: float = 0.0) -> dict[str, Any]:
        """`control` for async tests, so that traffic keeps flowing meanwhile."""
        return await self._acall("POST", "/control", {"mode": mode, "delay_s": delay_s})

    async def astats(self) -> dict[str, Any]:
        return await self._acall("GET", "/stats")

    async def areset_stats(self) -> dict[str, Any]:
        return await self._acall("POST", "/stats/reset")

    def _call(self, method: str, path: str, body: object = None) -> dict[str, Any]:
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            response = client.request(method, path, json=body)
        response.raise_for_status()
        payload: dict[str, Any] = response.json()
        return payload

    async def _acall(self, method: str, path: str, body: object = None) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=self.url, timeout=5.0) as client:
            response = await client.request(method, path, json=body)
        response.raise_for_status()
        payload: dict[str, Any] = response.json()
        return payload


@contextlib.contextmanager
def fake_teacher(
    log_dir: Path,
    *,
    port: int | None = None,
    classes: int = CLASSES,
    features: int = FEATURES,
    ready_timeout_s: float = 20.0,
) -> Iterator[FakeTeacherProcess]:
    """Start the fake teacher (on `port`, e.g. to restart it, else a free one)."""
    port = port or free_port()
    argv = [sys.executable, "-m", "tests.support.fake_teacher_server", "--port", str(port)]
    argv += ["--classes", str(classes), "--features", str(features)]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"fake-teacher-{port}-{time.monotonic_ns()}.log"
    server = FakeTeacherProcess("fake teacher", argv, port, log_path)
    with _running(server, ready_timeout_s):
        yield server


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def kdguard_config(
    registry_root: Path, *, port: int, teacher_url: str, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Settings for `kdguard serve`: the tiny models, a remote teacher, test-sized limits."""
    base: dict[str, Any] = {
        "log_level": "warning",
        "server": {"host": HOST, "port": port, "shutdown_grace_s": 1},
        "registry": {"root": str(registry_root)},
        "database": {"url": f"sqlite:///{registry_root.parent / 'kdguard.db'}"},
        "model": {"name": "tiny"},
        "routing": {"fallback_threshold": 0.6, "shadow_rate": 0.0, "seed": 7},
        "teacher": {
            "mode": "remote",
            "deadline_s": 0.2,
            "max_concurrency": 2,
            "circuit": {"failure_threshold": 3, "reset_after_s": 0.5},
            "remote": {
                "url": teacher_url,
                "model_name": "tiny-teacher",
                "input_name": "input",
                "output_name": "logits",
                "version_label": "fake-remote",
            },
        },
    }
    return deep_merge(base, overrides or {})


class KdguardProcess(ServerProcess):
    def __init__(self, argv: list[str], port: int, log_path: Path, config: dict[str, Any]) -> None:
        super().__init__("kdguard", argv, port, log_path)
        self.config = config


@contextlib.contextmanager
def kdguard_server(
    work_dir: Path,
    *,
    teacher_url: str,
    overrides: Mapping[str, Any] | None = None,
    ready_timeout_s: float = 30.0,
) -> Iterator[KdguardProcess]:
    """`python -m service.cli serve --config FILE` on a tiny registry made in `work_dir`."""
    work_dir.mkdir(parents=True, exist_ok=True)
    registry = make_tiny_registry(work_dir / "registry")
    port = free_port()
    config = kdguard_config(registry.root, port=port, teacher_url=teacher_url, overrides=overrides)
    config_path = work_dir / "kdguard.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [sys.executable, "-m", "service.cli", "serve", "--config", str(config_path)]
    server = KdguardProcess(argv, port, work_dir / "kdguard.log", config)
    with _running(server, ready_timeout_s):
        yield server
