"""Side-by-side serving benchmark: kdguard against the plain peer, in one run.

Serves the demo student with `../shared/bench/naive_peer.py` and with kdguard (shadow at
10%, fallback on, local ONNX teacher) on the same ONNX file, drives each with `wrk`
(1 thread, 16 connections), alternating peer and kdguard runs, and reports ratios of
medians. Also: the OIP infer route against the peer, and kdguard with shadow at 10%
against shadow off (through the admin API, same process) for the p99 of student-served
requests.

Usage:  python bench/serving.py [--pairs 3] [--seconds 10] [--out bench/results/serving.json]
Needs:  wrk (Debian package `wrk`) and the project installed (`make bench` does both but wrk).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PEER_DIR = ROOT.parent / "shared" / "bench"
ADMIN_KEY = "bench-admin-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def process(
    cmd: list[str], *, env: dict[str, str], ready_url: str, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{cmd[0]} exited: {proc.stderr.read().decode() if proc.stderr else ''}"
                )
            try:
                if httpx.get(ready_url, timeout=1).status_code < 500:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"{cmd} did not become ready")
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wrk(url: str, body: Mapping[str, object], seconds: int, workdir: Path) -> dict[str, float]:
    script = workdir / f"post-{abs(hash(json.dumps(body))) % 10_000}.lua"
    payload = json.dumps(body)
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = [[{payload}]]\n"
    )
    out = subprocess.run(
        ["wrk", "-t1", "-c16", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = _latency(re.search(r"99%\s+([\d.]+\w+)", out).group(1))  # type: ignore[union-attr]
    p50 = _latency(re.search(r"50%\s+([\d.]+\w+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    requests = re.search(r"(\d+) requests in", out)
    return {
        "requests": float(requests.group(1)) if requests else rps * seconds,
        "rps": rps,
        "p50_ms": p50,
        "p99_ms": p99,
        "non_2xx": float(non2xx.group(1)) if non2xx else 0.0,
    }


def _latency(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def build_models(data_dir: Path) -> tuple[Path, list[float]]:
    """The demo models, and one test digit the student is confident about."""
    from service.demo.digits import digits_splits, ensure_digits
    from service.registry import ModelRegistry

    registry = ModelRegistry(data_dir / "registry")
    ensure_digits(registry, name="digits")
    student = registry.active_manifest("digits", "student")
    splits = digits_splits()
    return registry.model_path(student), [float(v) for v in np.asarray(splits.test.x[0])]


def kdguard_config(path: Path, data_dir: Path, port: int, *, recording: bool = True) -> None:
    path.write_text(
        json.dumps(
            {
                "registry": {"root": str(data_dir / "registry")},
                "database": {"url": f"sqlite:///{data_dir / 'kdguard.db'}"},
                "recording": {"enabled": recording},
                "server": {"port": port},
                "model": {"name": "digits"},
                "routing": {"fallback_threshold": 0.6, "shadow_rate": 0.1},
                "teacher": {"mode": "local"},
                "log_level": "warning",
                "auth": {"api_keys": [{"name": "bench", "key": ADMIN_KEY, "scopes": ["admin"]}]},
            }
        )
    )


def set_shadow(base: str, rate: float) -> None:
    response = httpx.put(
        f"{base}/v1/admin/routing", json={"shadow_rate": rate}, headers={"X-API-Key": ADMIN_KEY}
    )
    response.raise_for_status()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving.json")
    parser.add_argument(
        "--recording", choices=["on", "off"], default="off",
        help="record predictions to SQLite (bench/recording.py measures its cost alone)",
    )  # fmt: skip
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="kdguard-bench-"))
    model_path, digit = build_models(work)
    peer_port, kd_port = free_port(), free_port()
    config = work / "kdguard.json"
    kdguard_config(config, work, kd_port, recording=args.recording == "on")
    env = {**os.environ, "PEER_MODEL": str(model_path), "KDGUARD_CONFIG": str(config)}
    uvicorn = [sys.executable, "-m", "uvicorn", "--loop", "uvloop", "--http", "httptools",
               "--no-access-log", "--log-level", "warning"]  # fmt: skip
    peer_cmd = [*uvicorn, "--app-dir", str(PEER_DIR), "naive_peer:app", "--port", str(peer_port)]
    kd_cmd = [sys.executable, "-m", "service.cli", "serve"]
    peer_url, kd_url = f"http://127.0.0.1:{peer_port}", f"http://127.0.0.1:{kd_port}"
    oip_body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": digit}]}
    runs: dict[str, list[dict[str, float]]] = {
        "peer": [],
        "kdguard": [],
        "oip": [],
        "shadow_off": [],
    }
    with (
        process(peer_cmd, env=env, ready_url=f"{peer_url}/docs"),
        process(kd_cmd, env=env, ready_url=f"{kd_url}/v2/health/ready"),
    ):
        probe = httpx.post(f"{kd_url}/v1/predict", json={"inputs": [digit]}).json()
        first = probe["predictions"][0]
        print(
            f"benchmark digit: served_by={first['served_by']} confidence={first['confidence']:.3f}"
        )
        for warm in (f"{peer_url}/predict", f"{kd_url}/v1/predict"):
            wrk(warm, {"inputs": digit}, 2, work)
        for i in range(args.pairs):
            runs["peer"].append(wrk(f"{peer_url}/predict", {"inputs": digit}, args.seconds, work))
            runs["kdguard"].append(
                wrk(f"{kd_url}/v1/predict", {"inputs": digit}, args.seconds, work)
            )
            runs["oip"].append(
                wrk(f"{kd_url}/v2/models/digits/infer", oip_body, args.seconds, work)
            )
            set_shadow(kd_url, 0.0)
            runs["shadow_off"].append(
                wrk(f"{kd_url}/v1/predict", {"inputs": digit}, args.seconds, work)
            )
            set_shadow(kd_url, 0.1)
            print(
                f"pair {i + 1}: "
                + ", ".join(
                    f"{k} {v[-1]['rps']:.0f} req/s p99 {v[-1]['p99_ms']:.2f} ms"
                    for k, v in runs.items()
                )
            )
        metrics = httpx.get(f"{kd_url}/metrics").text
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    shadowed = re.search(r'kdguard_shadow_sampled_total\{model="digits"\} ([\d.e+]+)', metrics)
    report = {
        "medians": med,
        "ratios": {
            "predict_throughput_vs_peer": med["kdguard"]["rps"] / med["peer"]["rps"],
            "predict_p99_vs_peer": med["kdguard"]["p99_ms"] / med["peer"]["p99_ms"],
            "oip_throughput_vs_peer": med["oip"]["rps"] / med["peer"]["rps"],
            "shadow_p99_vs_shadow_off": med["kdguard"]["p99_ms"] / med["shadow_off"]["p99_ms"],
        },
        "shadow_sampled_total": float(shadowed.group(1)) if shadowed else 0.0,
        "runs": runs,
        "settings": {
            "pairs": args.pairs,
            "seconds": args.seconds,
            "wrk": "-t1 -c16",
            "recording": args.recording,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["ratios"], indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
