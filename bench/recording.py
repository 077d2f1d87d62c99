"""Does recording cost the request path? The same build, recording on vs off, side by side.

Two kdguard processes on the same demo student and database (a scratch PostgreSQL
database by default), one with `recording.enabled=false`; `wrk -t1 -c16` alternates
between them; the report is the ratio of median throughputs (goal: >= 0.95).

Usage: python bench/recording.py [--pairs 3] [--seconds 10] [--database postgresql|sqlite]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import build_models, free_port, kdguard_config, process, wrk

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--database", choices=["postgresql", "sqlite"], default="postgresql")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kdguard-bench-"))
    _, digit = build_models(work)
    admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    name = f"kdguard_bench_{uuid.uuid4().hex[:8]}"
    if args.database == "postgresql":
        with admin.connect() as c:
            c.execute(text(f"CREATE DATABASE {name}"))
        url = make_url(POSTGRES).set(database=name).render_as_string(hide_password=False)
    else:
        url = f"sqlite:///{work / 'kdguard.db'}"
    runs: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    try:
        ports = {"on": free_port(), "off": free_port()}
        commands, envs = {}, {}
        for mode, port in ports.items():
            config = work / f"{mode}.json"
            kdguard_config(config, work, port, recording=mode == "on")
            envs[mode] = {
                **os.environ,
                "KDGUARD_CONFIG": str(config),
                "KDGUARD_DATABASE__URL": url,
                "KDGUARD_RECORDING__ENABLED": "true" if mode == "on" else "false",
            }
            commands[mode] = [sys.executable, "-m", "service.cli", "serve"]
        ready = {m: f"http://127.0.0.1:{p}/v2/health/ready" for m, p in ports.items()}
        with (
            process(commands["on"], env=envs["on"], ready_url=ready["on"]),
            process(commands["off"], env=envs["off"], ready_url=ready["off"]),
        ):
            body = {"inputs": digit}
            for mode in ("on", "off"):
                wrk(f"http://127.0.0.1:{ports[mode]}/v1/predict", body, 2, work)
            for i in range(args.pairs):
                for mode in ("off", "on"):
                    runs[mode].append(
                        wrk(f"http://127.0.0.1:{ports[mode]}/v1/predict", body, args.seconds, work)
                    )
                off, on = runs["off"][-1]["rps"], runs["on"][-1]["rps"]
                print(f"pair {i + 1}: off {off:.0f} req/s, on {on:.0f} req/s")
    finally:
        if args.database == "postgresql":
            with admin.connect() as c:
                c.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    med = {m: statistics.median(r["rps"] for r in v) for m, v in runs.items()}
    p99 = {m: statistics.median(r["p99_ms"] for r in v) for m, v in runs.items()}
    print(
        json.dumps(
            {
                "database": args.database,
                "median_rps": med,
                "median_p99_ms": p99,
                "throughput_on_vs_off": med["on"] / med["off"],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
