"""Does recording cost the request path? The same build, recording on vs off, side by side.

Two kdguard processes on the same demo student, each with a scratch database of its own
(PostgreSQL by default), one with `recording.enabled=false`; `wrk -t1 -c16` alternates
between them, in an order shuffled per round; the report is the ratio of median
throughputs (goal: >= 0.95), and the median of the per-round ratios with a bootstrap 95%
interval. Separate databases: on a shared one, the idle server's monitor would evaluate
the other's predictions. `--monitoring off` turns the monitor off in both, leaving the
writer's cost alone.

Many short rounds rather than a few long ones: on a shared host the speed of the same
server drifts by 10% or more over tens of seconds, so the two sides of a round must run
close together, and enough rounds must be paired to average the drift out.

Throughput on a shared 2-core host moves with whatever else runs, so each run also reads
the CPU time it cost, per request, in each process that does work for it: the serving
process (all its threads, and its event loop's thread alone), its children (the writer
process) and, on PostgreSQL, the database backends connected to the scratch database.
CPU time per request is far steadier than requests per second, and it says where
recording's cost goes.

Usage: python bench/recording.py [--pairs 20] [--seconds 4] [--database postgresql|sqlite]
                                 [--monitoring on|off]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import build_models, free_port, kdguard_config, process, wrk

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU time of a process (every thread), or of one of its threads; 0 if
    it is gone."""
    stat = Path(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat")
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


class CpuMeter:
    """CPU seconds spent by a server, its children and its database backends (those whose
    connections carry the server's `application_name`)."""

    def __init__(self, server: subprocess.Popen[bytes], admin: Engine, application: str | None):
        self._pid = server.pid
        self._admin = admin
        self._application = application

    def backends(self) -> list[int]:
        if self._application is None:
            return []
        with self._admin.connect() as c:
            rows = c.execute(
                text("SELECT pid FROM pg_stat_activity WHERE application_name = :name"),
                {"name": self._application},
            )
            return [int(r[0]) for r in rows]

    def read(self) -> dict[str, dict[int, float]]:
        return {
            "server": {self._pid: cpu_seconds(self._pid)},
            # the event loop's thread: what bounds a single-process server's throughput
            "event_loop": {self._pid: cpu_seconds(self._pid, self._pid)},
            "children": {c: cpu_seconds(c) for c in children(self._pid)},
            "database": {b: cpu_seconds(b) for b in self.backends()},
        }


def cpu_per_request_us(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]], requests: float
) -> dict[str, float]:
    """Per group: CPU µs per request between two readings (processes seen in `after`)."""
    return {
        group: sum(t - before[group].get(pid, 0.0) for pid, t in pids.items()) / requests * 1e6
        for group, pids in after.items()
    }


def median_interval(values: list[float], resamples: int = 10_000) -> list[float]:
    """A percentile-bootstrap 95% interval for the median of `values`."""
    draws = np.random.default_rng(0).choice(values, size=(resamples, len(values)))
    low, high = np.quantile(np.median(draws, axis=1), [0.025, 0.975])
    return [float(low), float(high)]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--database", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--monitoring", choices=["on", "off"], default="on")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kdguard-bench-"))
    _, digit = build_models(work)
    admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    name: str | None = None
    urls = {mode: f"sqlite:///{work / f'kdguard-{mode}.db'}" for mode in ("on", "off")}
    if args.database == "postgresql":
        name = f"kdguard_bench_{uuid.uuid4().hex[:8]}"
        with admin.connect() as c:
            for mode in urls:
                c.execute(text(f"CREATE DATABASE {name}{mode}"))
        for mode in urls:
            scratch = make_url(POSTGRES).set(
                database=name + mode, query={"application_name": name + mode}
            )
            urls[mode] = scratch.render_as_string(hide_password=False)
    runs: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    ratios: list[float] = []  # throughput on / off, per round
    order = random.Random(7)
    try:
        ports = {"on": free_port(), "off": free_port()}
        commands, envs = {}, {}
        for mode, port in ports.items():
            config = work / f"{mode}.json"
            kdguard_config(config, work, port, recording=mode == "on")
            envs[mode] = {
                **os.environ,
                "KDGUARD_CONFIG": str(config),
                "KDGUARD_DATABASE__URL": urls[mode],
                "KDGUARD_RECORDING__ENABLED": "true" if mode == "on" else "false",
                "KDGUARD_MONITORING__ENABLED": "true" if args.monitoring == "on" else "false",
            }
            commands[mode] = [sys.executable, "-m", "service.cli", "serve"]
        ready = {m: f"http://127.0.0.1:{p}/v2/health/ready" for m, p in ports.items()}
        with (
            process(commands["on"], env=envs["on"], ready_url=ready["on"]) as on,
            process(commands["off"], env=envs["off"], ready_url=ready["off"]) as off,
        ):
            meters = {
                m: CpuMeter(p, admin, None if name is None else name + m)
                for m, p in (("on", on), ("off", off))
            }
            body = {"inputs": digit}
            for mode in ("on", "off"):
                wrk(f"http://127.0.0.1:{ports[mode]}/v1/predict", body, 2, work)
            for i in range(args.pairs):
                modes = ["off", "on"]
                order.shuffle(modes)
                for mode in modes:
                    before = meters[mode].read()
                    url = f"http://127.0.0.1:{ports[mode]}/v1/predict"
                    run = wrk(url, body, args.seconds, work)
                    cpu = cpu_per_request_us(before, meters[mode].read(), run["requests"])
                    runs[mode].append(run | {f"cpu_us_{k}": v for k, v in cpu.items()})
                off_rps, on_rps = runs["off"][-1]["rps"], runs["on"][-1]["rps"]
                ratios.append(on_rps / off_rps)
                print(
                    f"round {i + 1}: off {off_rps:.0f} req/s, on {on_rps:.0f} req/s "
                    f"({ratios[-1]:.3f}); CPU µs/request on: "
                    + ", ".join(f"{k[7:]} {v:.1f}" for k, v in runs["on"][-1].items()
                                if k.startswith("cpu_us_"))
                    + "; off: "
                    + ", ".join(f"{k[7:]} {v:.1f}" for k, v in runs["off"][-1].items()
                                if k.startswith("cpu_us_"))
                )  # fmt: skip
    finally:
        if name is not None:
            with admin.connect() as c:
                for mode in urls:
                    c.execute(text(f"DROP DATABASE IF EXISTS {name}{mode} WITH (FORCE)"))

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    cpu_keys = [k for k in runs["on"][0] if k.startswith("cpu_us_")]
    cpu_median = {m: {k[7:]: round(median(m, k), 1) for k in cpu_keys} for m in runs}
    total = {m: sum(v for k, v in cpu_median[m].items() if k != "event_loop") for m in runs}
    loop_ratios = [  # the event loop's CPU per request, off / on, per round
        off["cpu_us_event_loop"] / on["cpu_us_event_loop"]
        for off, on in zip(runs["off"], runs["on"], strict=True)
    ]
    print(
        json.dumps(
            {
                "database": args.database,
                "monitoring": args.monitoring,
                "median_rps": {m: median(m, "rps") for m in runs},
                "median_p99_ms": {m: median(m, "p99_ms") for m in runs},
                "throughput_on_vs_off": median("on", "rps") / median("off", "rps"),
                "median_round_ratio": statistics.median(ratios),
                "median_round_ratio_ci95": median_interval(ratios),
                "cpu_us_per_request": cpu_median,
                "cpu_off_vs_on": total["off"] / total["on"],
                "event_loop_cpu_off_vs_on": (
                    cpu_median["off"]["event_loop"] / cpu_median["on"]["event_loop"]
                ),
                "event_loop_cpu_round_ratio": statistics.median(loop_ratios),
                "event_loop_cpu_round_ratio_ci95": median_interval(loop_ratios),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
