"""Recalibration and threshold retuning on real SQLite and PostgreSQL databases.

Traffic is simulated so the right answers are known: the teacher's logits u are drawn,
the label is drawn from softmax(u) (a calibrated teacher), and the student sees u plus
noise, z = u + N(0, 1): it is overconfident at T = 1 and calibrated at the T that fits
P(y | z), found once on a large sample. Rows go through the service's own cascade rule,
row builder (`prediction_rows`) and feedback path (`record_labels`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from sqlalchemy import Engine, func, insert, select
from sqlalchemy.orm import sessionmaker

from service.errors import UnprocessableError
from service.jobs import recalibrate, retune
from service.jobs.context import JobContext
from service.monitoring.probabilities import normalized_entropy, softmax
from service.monitoring.records import PredictionBatch, TeacherOutcome, inclusion_probability
from service.persistence.feedback import Label, record_labels
from service.persistence.rows import gather, prediction_rows
from service.persistence.samples import (
    Maturity,
    Scope,
    matured_labelled,
    shadow_pairs,
    traffic,
)
from service.persistence.tables import Prediction
from service.registry import InputSpec, ModelRegistry
from service.routing.threshold import Sample, budget_threshold
from service.training.temperature import fit_temperature
from tests.conftest import make_settings
from tests.support.models import diagonal_weights, linear_onnx

Array = npt.NDArray[np.float64]
MODEL, K = "digits", 10
HOUR = 3600.0
NOW = 1_700_000_000 // 3600 * 3600 + 1800.0  # half-way through an hour: one open window
TAU, SHADOW = 0.6, 0.3  # the cascade in force while the rows were served


@dataclass
class Simulated:
    u: Array  # teacher logits
    z: Array  # student logits
    y: npt.NDArray[np.int64]
    created: Array


def simulate(n: int, seed: int, *, hours: float = 4.0) -> Simulated:
    rng = np.random.default_rng(seed)
    u = rng.normal(0.0, 2.5, (n, K))
    q = np.exp(u - u.max(axis=1, keepdims=True))
    q /= q.sum(axis=1, keepdims=True)
    y = np.minimum((q.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1), K - 1)
    z = u + rng.normal(0.0, 1.0, (n, K))
    created = np.sort(NOW - hours * HOUR + rng.random(n) * (hours * HOUR - 1.0))
    return Simulated(u, z, y, created)


@functools.cache
def calibrated_temperature() -> float:
    """The T at which softmax(z / T) is calibrated, fitted on a large sample."""
    big = simulate(200_000, seed=99)
    return fit_temperature(big.z, big.y)


def teacher_probs(sim: Simulated) -> npt.NDArray[np.float32]:
    return softmax(sim.u.astype(np.float32))


def store(
    database: Engine,
    sim: Simulated,
    *,
    temperature: float | Array,
    seed: int,
    version: str = "1",
    model: str = MODEL,
    prefix: str = "r",
    null_temperature: npt.NDArray[np.bool_] | None = None,
) -> tuple[npt.NDArray[np.bool_], Array, Array]:
    """Serve `sim` through the cascade at (τ, π₀) and store one row per request.

    Returns which rows the teacher observed, their π and the served confidences.
    """
    rng = np.random.default_rng(seed)
    n = len(sim.y)
    t = np.broadcast_to(np.asarray(temperature, dtype=np.float64), (n,))
    p = np.stack([softmax(sim.z[i : i + 1].astype(np.float32), t[i])[0] for i in range(n)])
    q = teacher_probs(sim)
    c = p.max(axis=1)
    low = c < TAU
    shadow = ~low & (rng.random(n) < SHADOW)
    pi = inclusion_probability(low, SHADOW)
    batches = []
    for i in range(n):
        observed = bool(low[i] or shadow[i])
        outcome = TeacherOutcome.FALLBACK if low[i] else (
            TeacherOutcome.SHADOW if shadow[i] else TeacherOutcome.NOT_ASKED
        )  # fmt: skip
        batches.append(
            PredictionBatch(
                model=model, student_version=version, teacher_version="1", routing_key=None,
                created_at=float(sim.created[i]), request_ids=[f"{prefix}{i}"],
                student_probs=p[i : i + 1],
                teacher_probs=q[i : i + 1] if observed else np.full((1, K), np.nan, np.float32),
                teacher_outcome=[outcome], teacher_error=None, shadow_rate=SHADOW,
                entropy=normalized_entropy(p[i : i + 1]), fallback_threshold=TAU,
                student_temperature=float(t[i]), student_seconds=0.001, teacher_seconds=None,
                total_seconds=0.002,
            )
        )  # fmt: skip
    rows = prediction_rows(gather(batches)).dicts()
    if null_temperature is not None:
        for row, empty in zip(rows, null_temperature, strict=True):
            if empty:
                row["student_temperature"] = None  # a row written before T_s was recorded
    with database.begin() as connection:
        connection.execute(insert(Prediction), rows)
    return low | shadow, pi, c.astype(np.float64)


def label(
    database: Engine, sim: Simulated, rows: npt.NDArray[np.intp], *, at: float, prefix: str = "r"
) -> None:
    with sessionmaker(database).begin() as session:
        given = [Label(f"{prefix}{i}", int(sim.y[i])) for i in rows]
        record_labels(session, labels=given, num_classes=K, client="test", bucket_s=60, now=at)


def make_registry(root: Path, temperature: float) -> ModelRegistry:
    registry = ModelRegistry(root)
    manifest = registry.register(
        name=MODEL, role="student", version="1",
        model=linear_onnx(diagonal_weights(1.0, features=K, classes=K), np.zeros(K, np.float32)),
        input=InputSpec(name="input", features=K), output_name="logits",
        class_names=[str(k) for k in range(K)], temperature=temperature,
    )  # fmt: skip
    registry.set_active(MODEL, "student", manifest.version)
    return registry


def context(
    database: Engine, registry: ModelRegistry, kind: str, **params: Any
) -> tuple[JobContext, list[tuple[float, str]]]:
    reports: list[tuple[float, str]] = []
    ctx = JobContext(
        job_id=1, kind=kind, model=MODEL,
        settings=make_settings(registry.root, model={"name": MODEL}),
        database=database, registry=registry, now=NOW, params=params,
        progress=lambda fraction, message: reports.append((fraction, message)),
    )  # fmt: skip
    return ctx, reports


def softmax64(z: Array, t: float) -> Array:
    e = np.exp((z - z.max(axis=1, keepdims=True)) / t)
    out: Array = e / e.sum(axis=1, keepdims=True)
    return out


# -- the readers ------------------------------------------------------------------------------


def test_readers_select_exactly_the_rows_a_job_may_use(database: Engine, tmp_path: Path) -> None:
    sim = simulate(1500, seed=1)
    rng = np.random.default_rng(2)
    old_rows = rng.random(1500) < 0.5
    observed, pi, c = store(database, sim, temperature=1.0, seed=3, null_temperature=old_rows)
    # Noise the readers must skip: another version, another deployment.
    store(database, simulate(100, seed=4), temperature=1.0, seed=5, version="0", prefix="v")
    store(database, simulate(100, seed=6), temperature=1.0, seed=7, model="other", prefix="o")
    bucket = np.floor(sim.created / HOUR)
    first = bucket.min() + 1  # the first whole hour gets only half its labels: not matured
    share = np.where(bucket == first, 0.5, 0.9)
    on_time = np.flatnonzero(rng.random(1500) < share)
    late = np.setdiff1d(np.arange(1500), on_time)[:100]
    label(database, sim, on_time, at=NOW - 60.0)
    label(database, sim, late, at=NOW + 60.0)  # after the job's reference time

    scope = Scope(MODEL, "1", NOW - 4 * HOUR, NOW, default_temperature=1.0)
    with database.connect() as connection:
        labelled = matured_labelled(connection, scope, Maturity(HOUR, 0.8, 6 * HOUR), limit=10**6)
        pairs = shadow_pairs(connection, scope, temperature=2.0, with_probs=True)
        seen = traffic(connection, scope)

    labelled_mask = np.isin(np.arange(1500), on_time)
    windows = {
        b: labelled_mask[bucket == b].mean() >= 0.8 and (b + 1) * HOUR <= NOW
        for b in np.unique(bucket)
    }
    expected = np.flatnonzero(labelled_mask & np.array([windows[b] for b in bucket]))[::-1]
    assert labelled.matured_buckets == sum(windows.values()) < labelled.buckets == len(windows)
    assert len(labelled) == len(expected) > 0
    np.testing.assert_array_equal(labelled.labels, sim.y[expected])
    # Logits come back up to a per-row constant; float16 keeps ~3 decimal digits of each p.
    raw = sim.z[expected] - sim.z[expected].max(axis=1, keepdims=True)
    got = labelled.logits - labelled.logits.max(axis=1, keepdims=True)
    visible = raw > np.log(1e-4)
    np.testing.assert_allclose(got[visible], raw[visible], atol=2e-3)
    # Below 6.1e-5 float16 is subnormal (steps of 2^-24), and below 2^-24 p is floored.
    faint = (raw > np.log(1e-6)) & ~visible
    np.testing.assert_allclose(got[faint], raw[faint], atol=0.05)
    assert (got >= np.log(2.0**-24) - 1e-9).all()

    assert len(pairs) == int(observed.sum())
    np.testing.assert_allclose(pairs.inclusion_probability, pi[observed])
    np.testing.assert_allclose(pairs.confidence, softmax64(sim.z[observed], 2.0).max(1), atol=1e-3)
    np.testing.assert_array_equal(pairs.teacher_label, sim.u[observed].argmax(axis=1))
    assert pairs.teacher_probs is not None
    np.testing.assert_allclose(pairs.teacher_probs, teacher_probs(sim)[observed], atol=1e-3)
    expected_labels = np.where(labelled_mask, sim.y, -1)[observed]
    np.testing.assert_array_equal(pairs.label, expected_labels)  # late labels are not there

    assert len(seen) == 1500
    np.testing.assert_allclose(np.sort(seen.confidence), np.sort(c), rtol=1e-6)
    assert seen.realised_teacher_share == pytest.approx(float((c < TAU).mean()))


# -- recalibration ----------------------------------------------------------------------------


def test_an_overconfident_student_is_recalibrated_on_labels(
    database: Engine, tmp_path: Path
) -> None:
    t_cal = calibrated_temperature()
    assert t_cal > 1.2  # the simulated student is overconfident at T = 1
    sim = simulate(3000, seed=10)
    store(database, sim, temperature=1.0, seed=11)
    label(database, sim, np.arange(3000), at=NOW - 60.0)
    ctx, reports = context(database, make_registry(tmp_path / "registry", 1.0), "recalibrate")

    result = recalibrate.run(ctx)

    assert result["accepted"] is True and result["reason"] is None
    assert result["source"] == "labels" and result["version"] == "1"
    assert result["previous_temperature"] == 1.0
    assert result["temperature"] == pytest.approx(t_cal, rel=0.1)
    assert result["nll_after"] < result["nll_before"]
    assert result["ece_after"] < result["ece_before"] / 2
    assert result["n_holdout"] == round(0.2 * (result["n_fit"] + result["n_holdout"]))
    # The open hour (its labels could still come) is left out.
    assert result["n_fit"] + result["n_holdout"] == int((sim.created < NOW - 1800).sum())
    assert reports and reports[0][0] < reports[-1][0] <= 1.0


def test_a_calibrated_student_keeps_its_temperature(database: Engine, tmp_path: Path) -> None:
    t_cal = calibrated_temperature()
    sim = simulate(3000, seed=20)
    store(database, sim, temperature=t_cal, seed=21)
    label(database, sim, np.arange(3000), at=NOW - 60.0)
    ctx, _ = context(database, make_registry(tmp_path / "registry", t_cal), "recalibrate")

    result = recalibrate.run(ctx)

    assert result["previous_temperature"] == pytest.approx(t_cal)
    if result["accepted"]:
        assert result["temperature"] == pytest.approx(t_cal, rel=0.05)
        assert result["ece_after"] <= result["ece_before"]
    else:
        assert result["temperature"] == result["previous_temperature"]
        assert result["reason"]


def test_too_few_labels_fits_to_the_teacher_on_observed_traffic(
    database: Engine, tmp_path: Path
) -> None:
    t_cal = calibrated_temperature()
    sim = simulate(3000, seed=30)
    observed, _, _ = store(database, sim, temperature=1.0, seed=31)
    label(database, sim, np.arange(0, 3000, 50), at=NOW - 60.0)  # 60 labels
    ctx, _ = context(database, make_registry(tmp_path / "registry", 1.0), "recalibrate")

    result = recalibrate.run(ctx)

    assert result["source"] == "teacher" and result["accepted"] is True
    assert result["n_fit"] + result["n_holdout"] == int(observed.sum())
    # E[q | z] = P(y | z): the teacher's probabilities and the labels want the same T.
    assert result["temperature"] == pytest.approx(t_cal, rel=0.1)
    assert result["ece_after"] < result["ece_before"]


def test_labels_from_a_client_that_contradicts_the_teacher_are_left_out(
    database: Engine, tmp_path: Path
) -> None:
    t_cal = calibrated_temperature()
    sim = simulate(3000, seed=10)
    store(database, sim, temperature=1.0, seed=11)
    label(database, sim, np.arange(0, 3000, 2), at=NOW - 60.0)  # honest labels on half
    wrong = (sim.u.argmax(axis=1) + 1) % K  # never the teacher's answer
    with sessionmaker(database).begin() as session:
        given = [Label(f"r{i}", int(wrong[i])) for i in range(1, 3000, 2)]
        record_labels(
            session, labels=given, num_classes=K, client="mallory", bucket_s=60, now=NOW - 60.0
        )
    ctx, reports = context(database, make_registry(tmp_path / "registry", 1.0), "recalibrate")

    result = recalibrate.run(ctx)

    check = result["label_check"]
    assert check["clients"] == 2 and check["largest_client_share"] == pytest.approx(0.5, abs=0.02)
    assert check["left_out"]["teacher_disagreement"] == check["labels"] - check["used"] > 600
    assert "'mallory'" in check["notes"][0] and "100%" in check["notes"][0]
    assert any("mallory" in message for _, message in reports)
    # The honest half alone finds the same T as all labels would.
    assert result["source"] == "labels" and result["accepted"] is True
    assert result["n_fit"] + result["n_holdout"] == check["used"]
    assert result["temperature"] == pytest.approx(t_cal, rel=0.1)


def test_no_data_is_a_failure_that_says_why(database: Engine, tmp_path: Path) -> None:
    store(database, simulate(50, seed=40), temperature=1.0, seed=41)
    ctx, _ = context(database, make_registry(tmp_path / "registry", 1.0), "recalibrate")
    with pytest.raises(UnprocessableError, match=r"too few samples.*0 matured labels"):
        recalibrate.run(ctx)
    ctx, _ = context(database, make_registry(tmp_path / "registry2", 1.0), "retune_threshold")
    with pytest.raises(UnprocessableError, match="too few teacher-observed pairs"):
        retune.run(ctx)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"window": 60}, "unknown RecalibrateOptions parameter.*'window'"),
        ({"window_s": "1h"}, "'window_s' must be float"),
        ({"min_labels": True}, "'min_labels' must be int"),
        ({"holdout": 1.5}, r"out of range: \['holdout'\]"),
        ({"bounds": [3.0, 1.0]}, r"out of range: \['bounds'\]"),
    ],
)
def test_recalibration_options_are_checked(
    database: Engine, tmp_path: Path, params: dict[str, Any], message: str
) -> None:
    ctx, _ = context(database, make_registry(tmp_path / "registry", 1.0), "recalibrate", **params)
    with pytest.raises(ValueError, match=message):
        recalibrate.run(ctx)


# -- threshold retuning -----------------------------------------------------------------------


def test_budget_mode_sends_the_budget_to_the_teacher(database: Engine, tmp_path: Path) -> None:
    sim = simulate(3000, seed=50)
    _, _, c = store(database, sim, temperature=1.0, seed=51)
    label(database, sim, np.arange(0, 3000, 2), at=NOW - 60.0)
    ctx, _ = context(
        database, make_registry(tmp_path / "registry", 1.0), "retune_threshold",
        mode="budget", budget=0.25,
    )  # fmt: skip

    result = retune.run(ctx)

    tau = result["fallback_threshold"]
    with database.connect() as connection:
        below, at_or_below = (
            connection.execute(select(func.count()).where(condition)).scalar_one() / 3000
            for condition in (Prediction.confidence < tau, Prediction.confidence <= tau)
        )
    assert below <= 0.25 < at_or_below  # the largest τ within the budget
    assert result["expected_teacher_share"] == pytest.approx(below)
    assert result["mode"] == "budget" and result["budget"] == 0.25
    assert result["previous_fallback_threshold"] == TAU  # from the settings: no serving state
    assert result["realised_teacher_share"] == pytest.approx(float((c < TAU).mean()))
    assert 0.0 < result["bound"] < 1.0 and result["n_pairs"] > 0
    curve = result["curve"]
    assert [p["teacher_share"] for p in curve] == sorted(p["teacher_share"] for p in curve)
    assert {tau, TAU} <= {p["threshold"] for p in curve}
    assert curve[0]["teacher_share"] == 0.0 and curve[-1]["agreement"] == pytest.approx(1.0)
    assert curve[-1]["gap_recovered"] == pytest.approx(1.0)  # labels: the whole gap
    assert all(p["accuracy"] is not None for p in curve)


def test_guarantee_mode_bounds_the_served_flip_rate(database: Engine, tmp_path: Path) -> None:
    sim = simulate(5000, seed=60)
    observed, pi, c = store(database, sim, temperature=1.0, seed=61)
    ctx, _ = context(
        database, make_registry(tmp_path / "registry", 1.0), "retune_threshold",
        mode="guarantee", epsilon=0.05, delta=0.05,
    )  # fmt: skip

    result = retune.run(ctx)

    tau = result["fallback_threshold"]
    assert result["mode"] == "guarantee" and (result["epsilon"], result["delta"]) == (0.05, 0.05)
    assert result["bound"] <= 0.05
    assert result["expected_teacher_share"] == pytest.approx(float((c < tau).mean()))
    # On the stored pairs, the weighted flip rate of what the student would serve:
    flips = sim.z.argmax(1) != sim.u.argmax(1)
    served = observed & (c >= tau)
    w = 1.0 / pi
    assert (w * flips)[served].sum() / w[served].sum() == pytest.approx(result["served_flip_rate"])
    assert result["served_flip_rate"] <= result["bound"]
    # On fresh traffic from the same source (holds with probability ≥ 1 - δ; seeded):
    fresh = simulate(200_000, seed=62)
    fresh_c = softmax64(fresh.z, 1.0).max(axis=1)
    fresh_flips = fresh.z.argmax(1) != fresh.u.argmax(1)
    assert fresh_flips[fresh_c >= tau].mean() <= 0.05
    # ...and the guarantee costs teacher share: serving more would break it.
    assert fresh_flips.mean() > 0.05


def test_retune_scores_confidences_at_the_temperature_now_served(
    database: Engine, tmp_path: Path
) -> None:
    sim = simulate(3000, seed=70)
    # The first half was served at T = 1, the second at T = 2 (recalibrated in between).
    t = np.where(np.arange(3000) < 1500, 1.0, 2.0)
    store(database, sim, temperature=t, seed=71)
    ctx, _ = context(
        database, make_registry(tmp_path / "registry", 1.0), "retune_threshold",
        budget=0.3, temperature=2.0,
    )  # fmt: skip

    result = retune.run(ctx)

    at_two = softmax64(sim.z, 2.0).max(axis=1)
    assert result["temperature"] == 2.0
    assert result["fallback_threshold"] == pytest.approx(
        budget_threshold(at_two, None, 0.3), abs=2e-3
    )
    assert result["expected_teacher_share"] == pytest.approx(0.3, abs=2e-3)


def test_cost_quality_of_recent_traffic(database: Engine) -> None:
    sim = simulate(2000, seed=80)
    observed, pi, c = store(database, sim, temperature=1.0, seed=81)
    curve = retune.cost_quality(database, MODEL, NOW - 5 * HOUR, NOW, version="1")
    assert len(curve) >= 21
    flips = (sim.z.argmax(1) != sim.u.argmax(1))[observed]
    w = 1.0 / pi[observed]
    serve_all = curve[0]
    assert serve_all["teacher_share"] == 0.0
    assert serve_all["agreement"] == pytest.approx(1.0 - (w * flips).sum() / w.sum())
    assert all(p["accuracy"] is None for p in curve)  # no labels yet
    shares = Sample.of(c)
    for point in curve:
        assert point["teacher_share"] == pytest.approx(shares.teacher_share(point["threshold"]))
    assert retune.cost_quality(database, "nothing-here", 0.0, NOW) == []
