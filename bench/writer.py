"""Write-behind writer throughput into a real database.

Feeds PredictionBatches of one instance each (the common single-instance request) into
the writer as fast as the producer can, and reports records per second from the first
record to the last commit. Uses a scratch PostgreSQL database (dropped afterwards) or
a scratch SQLite file.

Usage: python bench/writer.py [--records 200000] [--database postgresql|sqlite]
                              [--writer process|thread]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from service.monitoring.instruments import build_instruments
from service.monitoring.records import PredictionBatch, TeacherOutcome
from service.persistence import migrate
from service.persistence.database import make_engine
from service.persistence.tables import Prediction
from service.persistence.writer import PredictionWriter
from service.settings import RecordingSettings

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def batches(count: int, classes: int = 10) -> list[PredictionBatch]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        p = rng.dirichlet(np.ones(classes)).astype(np.float32)[None, :]
        shadow = i % 10 == 0
        q = rng.dirichlet(np.ones(classes)).astype(np.float32)[None, :] if shadow else None
        outcome = TeacherOutcome.SHADOW if shadow else TeacherOutcome.NOT_ASKED
        out.append(
            PredictionBatch(
                model="digits",
                student_version="1",
                teacher_version="1",
                routing_key=None,
                created_at=time.time(),
                request_ids=[f"{i:012d}"],
                student_probs=p,
                teacher_probs=q,
                teacher_outcome=[outcome],
                teacher_error=None,
                entropy=np.full(1, 0.3, np.float32),
                shadow_rate=0.1,
                fallback_threshold=0.6,
                student_temperature=1.0,
                student_seconds=1e-5,
                teacher_seconds=None,
                total_seconds=1e-4,
            )
        )
    return out


def run(url: str, records: int, writer_process: bool) -> dict[str, float]:
    engine = make_engine(url)
    migrate.upgrade(engine)
    settings = RecordingSettings(
        queue_rows=records + 1,
        batch_rows=5000,
        flush_interval_s=0.05,
        writer_process=writer_process,
    )
    writer = PredictionWriter(
        engine,
        settings=settings,
        instruments=build_instruments(CollectorRegistry()),
        model="digits",
    )
    warmup, *work = batches(records + 1)
    writer.start(wait_s=120.0)  # the writer process is ready before the clock starts
    writer.record(warmup)
    assert writer.flush(120.0)
    started = time.perf_counter()
    for b in work:
        writer.record(b)
    offered = time.perf_counter() - started
    assert writer.flush(600.0)
    elapsed = time.perf_counter() - started
    writer.close(10.0)
    with engine.connect() as connection:
        stored = connection.execute(select(func.count()).select_from(Prediction)).scalar_one()
    engine.dispose()
    return {
        "records": records,
        "stored": stored - 1,
        "seconds": elapsed,
        "records_per_s": records / elapsed,
        "enqueue_us_per_record": offered / records * 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--database", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--writer", choices=["process", "thread"], default="process")
    args = parser.parse_args()
    writer_process = args.writer == "process"
    if args.database == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            result = run(f"sqlite:///{Path(tmp) / 'bench.db'}", args.records, writer_process)
    else:
        admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
        name = f"kdguard_bench_{uuid.uuid4().hex[:8]}"
        with admin.connect() as c:
            c.execute(text(f"CREATE DATABASE {name}"))
        try:
            result = run(
                make_url(POSTGRES).set(database=name).render_as_string(hide_password=False),
                args.records,
                writer_process,
            )
        finally:
            with admin.connect() as c:
                c.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    print(json.dumps({"database": args.database, "writer": args.writer, **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
