"""Evaluate every metric over one window of N stored predictions (goal: 1M in under 2 s).

Loads a scratch PostgreSQL database through the real writer (COPY, and the per-bucket
sums), spread over one day, labels 10% of the rows through the feedback path (the
student calibrated by design: its answer is the label with probability its confidence),
then times the monitor's evaluation of the day-long window that covers them all: the
SQL over the sums plus every metric's result (intervals, bootstrap thresholds, null
quantiles).

Usage: python bench/window_eval.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid

import numpy as np
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

from service.monitoring.instruments import build_instruments
from service.monitoring.metrics import EntropyReference
from service.monitoring.records import PredictionBatch, TeacherOutcome
from service.persistence import migrate
from service.persistence.aggregates import window_stats
from service.persistence.database import make_engine
from service.persistence.feedback import Label, record_labels
from service.persistence.writer import PredictionWriter
from service.settings import MonitoringSettings, RecordingSettings

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DAY = 86_400.0


def load(engine_url: str, rows: int, created: float) -> None:
    engine = make_engine(engine_url)
    migrate.upgrade(engine)
    settings = RecordingSettings(queue_rows=rows + 1, batch_rows=20_000, flush_interval_s=0.05)
    labels: list[Label] = []
    writer = PredictionWriter(
        engine,
        settings=settings,
        instruments=build_instruments(CollectorRegistry()),
        model="digits",
    )
    writer.start()
    rng = np.random.default_rng(0)
    per_batch = 1000
    batches = rows // per_batch
    for b in range(batches):
        p = rng.dirichlet(np.full(10, 0.3), per_batch).astype(np.float32)
        q = rng.dirichlet(np.full(10, 0.3), per_batch).astype(np.float32)
        low = p.max(axis=1) < 0.6
        shadow = ~low & (rng.random(per_batch) < 0.1)
        q[~(low | shadow)] = np.nan
        outcome = [
            TeacherOutcome.FALLBACK
            if lo
            else TeacherOutcome.SHADOW
            if sh
            else TeacherOutcome.NOT_ASKED
            for lo, sh in zip(low, shadow, strict=True)
        ]
        writer.record(
            PredictionBatch(
                model="digits",
                student_version="1",
                teacher_version="1",
                routing_key=None,
                created_at=created + b * DAY / batches,
                request_ids=[f"{b}-{i}" for i in range(per_batch)],
                student_probs=p,
                teacher_probs=q,
                teacher_outcome=outcome,
                teacher_error=None,
                entropy=rng.beta(2, 5, per_batch).astype(np.float32),
                shadow_rate=0.1,
                fallback_threshold=0.6,
                student_temperature=1.0,
                student_seconds=1e-5,
                teacher_seconds=1e-3,
                total_seconds=1e-4,
            )
        )
        for i in np.flatnonzero(rng.random(per_batch) < 0.1):
            right = rng.random() < p[i].max()
            label = int(p[i].argmax()) if right else int(rng.integers(0, 10))
            labels.append(Label(f"{b}-{i}", label))
    assert writer.flush(900.0)
    writer.close(10.0)
    sessions = sessionmaker(engine)
    for first in range(0, len(labels), 1000):
        with sessions.begin() as session:
            chunk = labels[first : first + 1000]
            record_labels(session, labels=chunk, num_classes=10, client="bench", bucket_s=60)
    with engine.begin() as connection:
        connection.execute(text("ANALYZE"))
    engine.dispose()


def evaluate(engine_url: str, start: float, end: float) -> dict[str, float]:
    engine = make_engine(engine_url)
    s = MonitoringSettings()
    reference = EntropyReference.fit(np.random.default_rng(1).beta(2, 5, 5000))
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        with engine.connect() as connection:
            stats = window_stats(connection, model="digits", start=start, end=end)
        queried = time.perf_counter() - started
        values = {
            "flip_rate": stats.flip.result(s.flip_threshold, min_n=s.min_samples),
            "accuracy_gap": stats.gap.result(s.gap_threshold, min_n=s.min_samples),
            "teacher_gap": stats.teacher_gap.result(min_n=s.min_samples),
            "ece": stats.calibration.result(floor=s.ece_floor, min_n=s.min_samples),
            "entropy_drift_js": stats.drift(reference).result(reference, min_n=s.min_samples),
        }
        timings.append((time.perf_counter() - started, queried))
    engine.dispose()
    best = min(timings)
    return {
        "rows": stats.rows,
        "labelled": stats.labelled,
        "seconds": best[0],
        "sql_seconds": best[1],
        "first_run_seconds": timings[0][0],
        **{k: v.value for k, v in values.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    name = f"kdguard_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as c:
        c.execute(text(f"CREATE DATABASE {name}"))
    url = make_url(POSTGRES).set(database=name).render_as_string(hide_password=False)
    created = (time.time() // DAY - 1) * DAY  # yesterday, a whole day-long window
    try:
        started = time.perf_counter()
        load(url, args.rows, created)
        print(f"loaded {args.rows} rows in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        print(json.dumps(evaluate(url, created, created + DAY), indent=2))
    finally:
        with admin.connect() as c:
            c.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
