"""The re-distillation job on a real database (SQLite and PostgreSQL) and a real registry.

The registry holds the demo's digits teacher and student (built once per module, copied
per test). Logged traffic is written as the service writes it: a prediction row per
request (the teacher's probabilities on the fallback/shadow ones), the logged input, and
a feedback label for some, each table in its own shuffled order, so only the request id
can tie them together.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from sqlalchemy import Engine, insert

from service.backends.onnx import OnnxModel, load_onnx_model
from service.demo.digits import digits_splits, ensure_digits
from service.demo.traffic import add_noise
from service.jobs.context import JobContext
from service.jobs.redistill import NotEnoughDataError, run
from service.monitoring.metrics import (
    confidence_bin,
    confidence_fine_bin,
    fine_index,
    mcnemar_exact,
)
from service.monitoring.probabilities import normalized_entropy, softmax
from service.persistence.tables import Feedback, Prediction, PredictionInput
from service.persistence.transfer import read_transfer_rows
from service.registry import ModelRegistry
from service.registry.store import WEIGHTS_FILE, encode_weights
from service.settings import Settings
from tests.conftest import make_settings

pytestmark = pytest.mark.slow

MODEL = "digits"
NOW = 1_000_000.0
SHADOW_RATE = 0.1
THRESHOLD = 0.6


@pytest.fixture(scope="module")
def built_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits") / "registry"
    ensure_digits(ModelRegistry(root))
    return root


@pytest.fixture
def registry(built_registry: Path, tmp_path: Path) -> ModelRegistry:
    """A private copy of the built registry: a job adds versions to it."""
    root = tmp_path / "registry"
    shutil.copytree(built_registry, root)
    return ModelRegistry(root)


@dataclass(frozen=True)
class Traffic:
    """What was logged, by request id."""

    ids: list[str]
    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]
    labelled: npt.NDArray[np.bool_]
    observed: npt.NDArray[np.bool_]  # teacher output recorded
    teacher_probs: npt.NDArray[np.float32]
    created_at: npt.NDArray[np.float64]


def log_traffic(
    engine: Engine,
    registry: ModelRegistry,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    *,
    label_share: float = 0.1,
    seed: int = 0,
    start: float = NOW - 10_000.0,
    teacher_version: str | None = None,
) -> Traffic:
    """Serve `x` with the active student and teacher as the cascade would and write the
    rows: π = 1 below τ, else π₀; labels for a random `label_share`; one row a second."""
    rng = np.random.default_rng(seed)
    student = load_onnx_model(registry, registry.active_manifest(MODEL, "student"))
    teacher = load_onnx_model(registry, registry.active_manifest(f"{MODEL}-teacher", "teacher"))
    n = len(y)
    p = softmax(student.logits(x), student.manifest.temperature)
    q = softmax(teacher.logits(x), teacher.manifest.temperature)
    confidence = p.max(axis=1).astype(np.float64)
    low = confidence < THRESHOLD
    observed = low | (rng.random(n) < SHADOW_RATE)
    traffic = Traffic(
        ids=[f"req-{seed}-{i:05d}" for i in range(n)],
        x=x,
        y=y,
        labelled=rng.random(n) < label_share,
        observed=observed,
        teacher_probs=q,
        created_at=start + np.arange(n, dtype=np.float64),
    )
    entropy = normalized_entropy(softmax(student.logits(x), student.manifest.reference_temperature))
    predictions = [
        {
            "request_id": traffic.ids[i],
            "model": MODEL,
            "student_version": student.version,
            "teacher_version": (teacher_version or teacher.version) if observed[i] else None,
            "routing_key": None,
            "created_at": float(traffic.created_at[i]),
            "served_by_teacher": bool(low[i]),
            "degraded": False,
            "teacher_outcome": ("fallback" if low[i] else "shadow") if observed[i] else "not_asked",
            "teacher_error": None,
            "student_label": int(p[i].argmax()),
            "confidence": float(confidence[i]),
            "entropy": float(entropy[i]),
            "conf_bin": int(confidence_bin(confidence[i : i + 1])[0]),
            "conf_fine": int(confidence_fine_bin(confidence[i : i + 1])[0]),
            "entropy_fine": int(fine_index(entropy[i : i + 1].astype(np.float64))[0]),
            "teacher_label": int(q[i].argmax()) if observed[i] else None,
            "inclusion_probability": 1.0 if low[i] else SHADOW_RATE,
            "fallback_threshold": THRESHOLD,
            "student_probs": p[i].astype("<f2").tobytes(),
            "teacher_probs": q[i].astype("<f2").tobytes() if observed[i] else None,
            "student_seconds": 1e-4,
            "total_seconds": 2e-4,
        }
        for i in range(n)
    ]
    inputs = [
        {
            "request_id": traffic.ids[i],
            "model": MODEL,
            "created_at": float(traffic.created_at[i]),
            "features": x[i].astype("<f4").tobytes(),
        }
        for i in range(n)
    ]
    feedback = [
        {
            "request_id": traffic.ids[i],
            "model": MODEL,
            "label": int(y[i]),
            "received_at": float(traffic.created_at[i]) + 60.0,
            "client": "test",
            "student_correct": bool(p[i].argmax() == y[i]),
            "teacher_correct": bool(q[i].argmax() == y[i]) if observed[i] else None,
            "nll": float(-np.log(max(float(p[i, y[i]]), 1e-12))),
            "brier": float(((p[i] - np.eye(p.shape[1])[y[i]]) ** 2).sum()),
        }
        for i in np.flatnonzero(traffic.labelled)
    ]
    with engine.begin() as connection:
        for table, rows in (
            (Prediction, predictions),
            (PredictionInput, inputs),
            (Feedback, feedback),
        ):
            order = rng.permutation(len(rows))
            if len(rows):
                connection.execute(insert(table), [rows[j] for j in order])
    return traffic


def context(
    engine: Engine, registry: ModelRegistry, *, settings: Settings | None = None, **params: Any
) -> tuple[JobContext, list[tuple[float, str]]]:
    reports: list[tuple[float, str]] = []
    settings = settings or make_settings(registry.root, model={"name": MODEL})
    ctx = JobContext(
        job_id=7, kind="redistill", model=MODEL, settings=settings, database=engine,
        registry=registry, now=NOW, params=params,
        progress=lambda fraction, message: reports.append((fraction, message)),
    )  # fmt: skip
    return ctx, reports


def logged_digits() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The transfer and validation splits: traffic the teacher never trained on."""
    splits = digits_splits(seed=0)
    return (
        np.concatenate([splits.transfer.x, splits.validation.x]),
        np.concatenate([splits.transfer.y, splits.validation.y]),
    )


def agreement(model: OnnxModel, teacher: OnnxModel, x: npt.NDArray[np.float32]) -> float:
    return float(np.mean(model.logits(x).argmax(axis=1) == teacher.logits(x).argmax(axis=1)))


# -- the transfer set reader -----------------------------------------------------------


def test_the_transfer_set_is_joined_by_request_id(
    database: Engine, registry: ModelRegistry
) -> None:
    x, y = logged_digits()
    traffic = log_traffic(database, registry, x[:300], y[:300], label_share=0.3, seed=3)
    with database.connect() as connection:
        rows = read_transfer_rows(
            connection, model=MODEL, features=64, classes=10, before=NOW, limit=10_000
        )
    assert len(rows) == 300
    assert np.all(np.diff(rows.created_at) > 0)  # oldest first, whatever the insert order
    where = {rid: i for i, rid in enumerate(traffic.ids)}
    index = np.array([where[rid] for rid in rows.request_ids])
    assert np.array_equal(rows.x, traffic.x[index])
    expected_labels = np.where(traffic.labelled[index], traffic.y[index], -1)
    assert np.array_equal(rows.labels, expected_labels)
    assert np.array_equal(rows.recorded, traffic.observed[index])
    recorded = rows.teacher_probs[rows.recorded]
    assert np.allclose(recorded, traffic.teacher_probs[index][rows.recorded], atol=1e-3)
    assert rows.label_clients == ["test" if y >= 0 else None for y in expected_labels]
    assert rows.discarded == {}


def test_rows_and_labels_after_the_reference_time_are_left_out(
    database: Engine, registry: ModelRegistry
) -> None:
    x, y = logged_digits()
    traffic = log_traffic(database, registry, x[:100], y[:100], label_share=1.0, start=NOW - 80)
    with database.connect() as connection:
        rows = read_transfer_rows(
            connection, model=MODEL, features=64, classes=10, before=NOW, limit=10_000
        )
        newest = read_transfer_rows(
            connection, model=MODEL, features=64, classes=10, before=NOW, limit=10
        )
        other = read_transfer_rows(
            connection, model="other", features=64, classes=10, before=NOW, limit=10
        )
    assert rows.request_ids == traffic.ids[:80]
    # Labels arrive 60 s after the prediction: only those received before NOW count.
    assert np.array_equal(rows.labels >= 0, traffic.created_at[:80] + 60 < NOW)
    assert newest.request_ids == traffic.ids[70:80]
    assert len(other) == 0


# -- the job ---------------------------------------------------------------------------


def test_redistillation_registers_a_working_candidate(
    database: Engine, registry: ModelRegistry
) -> None:
    x, y = logged_digits()
    log_traffic(database, registry, x, y)
    incumbent = registry.active_manifest(MODEL, "student")
    ctx, reports = context(database, registry)

    result = run(ctx)

    candidate = registry.manifest(MODEL, result["candidate_version"])
    assert result["incumbent_version"] == incumbent.version == "1"
    assert candidate.version == "2" and candidate.role == "student"
    assert registry.active(MODEL)["student"] == "1"  # never activated by the job
    assert result["teacher_version"] == "1"
    assert result["warm_start"] is True
    rows = result["rows"]
    assert rows["total"] == len(y)
    assert (rows["transfer"], rows["calibration"], rows["gate"]) == (566, 81, 162)
    assert sum(rows["labelled"].values()) > 40
    assert result["parity_max_abs_logit_diff"] < 1e-4
    assert candidate.temperature == candidate.reference_temperature == result["temperature"]
    # The candidate loads through the serving path and behaves on digits it never saw.
    test = digits_splits(seed=0).test
    model = load_onnx_model(registry, candidate)
    teacher = load_onnx_model(registry, registry.active_manifest(f"{MODEL}-teacher", "teacher"))
    assert np.mean(model.logits(test.x).argmax(axis=1) == test.y) >= 0.9
    assert agreement(model, teacher, test.x) >= 0.9
    # Its manifest says how it was made; its weights and entropy reference are stored.
    run_manifest = candidate.metadata["run"]
    assert run_manifest["config"]["kd_temperature"] == 2.0
    assert run_manifest["config"]["alpha"] == 0.5
    assert run_manifest["data_window"]["before"] == NOW
    assert run_manifest["teacher"]["sources"]["run"] > run_manifest["teacher"]["sources"]["logged"]
    assert run_manifest["metrics"] == result["metrics"]
    assert run_manifest["seeds"]["training"] == result["seed"] == 0
    assert candidate.metadata["architecture"] == incumbent.metadata["architecture"]
    assert registry.load_weights(candidate) is not None
    reference = registry.load_reference(candidate)
    assert reference is not None and reference[1] == "gate" and len(reference[0]) == 162
    for arm in ("candidate", "incumbent"):
        metrics = result["metrics"][arm]
        assert metrics["teacher_agreement"] >= 0.9
        assert metrics["labelled"] > 0 and 0.0 <= metrics["ece"] <= 1.0
    # Progress: increasing fractions, one report per epoch, ending at 1.
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert sum("epoch" in message for _, message in reports) == 40


def test_redistilling_on_noisy_traffic_follows_the_teacher_there(
    database: Engine, registry: ModelRegistry
) -> None:
    """Traffic drifts to noisy digits; the candidate distilled from it agrees with the
    teacher on noisy digits more often than the incumbent, on the gate slice and on fresh
    noisy digits (exact McNemar test on the discordant pairs, 5% level)."""
    splits = digits_splits(seed=0)
    x = np.concatenate([splits.teacher_train.x, splits.transfer.x, splits.validation.x])
    y = np.concatenate([splits.teacher_train.y, splits.transfer.y, splits.validation.y])
    log_traffic(database, registry, add_noise(x, 0.4, np.random.default_rng(1)), y)
    ctx, _ = context(database, registry)

    result = run(ctx)

    metrics = result["metrics"]
    assert metrics["candidate"]["teacher_agreement"] > metrics["incumbent"]["teacher_agreement"]
    fresh = add_noise(splits.test.x, 0.4, np.random.default_rng(2))
    teacher = load_onnx_model(registry, registry.active_manifest(f"{MODEL}-teacher", "teacher"))
    said = teacher.logits(fresh).argmax(axis=1)
    candidate, incumbent = (
        load_onnx_model(registry, registry.manifest(MODEL, version)).logits(fresh).argmax(axis=1)
        == said
        for version in (result["candidate_version"], result["incumbent_version"])
    )
    only_candidate, only_incumbent = (
        int((candidate & ~incumbent).sum()),
        int((~candidate & incumbent).sum()),
    )
    assert only_candidate > only_incumbent
    assert mcnemar_exact(only_candidate, only_incumbent) < 0.05


def test_labels_from_a_client_that_contradicts_the_teacher_are_left_out(
    database: Engine, registry: ModelRegistry
) -> None:
    x, y = logged_digits()
    traffic = log_traffic(database, registry, x, y, label_share=0.3)
    poisoned = np.flatnonzero(~traffic.labelled)[::2]  # half the unlabelled rows
    wrong = (traffic.teacher_probs.argmax(axis=1) + 1) % 10  # never the teacher's answer
    with database.begin() as connection:
        connection.execute(
            insert(Feedback),
            [
                {
                    "request_id": traffic.ids[i], "model": MODEL, "label": int(wrong[i]),
                    "received_at": float(traffic.created_at[i]) + 60.0, "client": "mallory",
                    "student_correct": False, "teacher_correct": False, "nll": 5.0, "brier": 1.0,
                }
                for i in poisoned
            ],
        )  # fmt: skip
    ctx, reports = context(database, registry, epochs=2)

    result = run(ctx)

    check = result["label_check"]
    honest = int(traffic.labelled.sum())
    assert (check["labels"], check["used"], check["clients"]) == (honest + len(poisoned), honest, 2)
    assert check["left_out"] == {"teacher_disagreement": len(poisoned), "client_share": 0}
    assert check["notes"] and "'mallory'" in check["notes"][0]
    assert check["teacher_disagreement"] > 0.5  # mostly mallory; honest labels rarely disagree
    assert any("mallory" in message for _, message in reports)
    # Mallory's rows still train, as unlabelled rows: every logged input is used.
    assert sum(result["rows"]["labelled"].values()) == honest
    assert result["rows"]["total"] == len(y)
    candidate = registry.manifest(MODEL, result["candidate_version"])
    assert candidate.metadata["run"]["label_check"] == check


def test_too_few_logged_inputs_fail_with_a_clear_message(
    database: Engine, registry: ModelRegistry
) -> None:
    x, y = logged_digits()
    log_traffic(database, registry, x[:150], y[:150])
    ctx, _ = context(database, registry)
    with pytest.raises(NotEnoughDataError, match=r"at least 200 logged inputs; found 150"):
        run(ctx)
    assert [m.version for m in registry.versions(MODEL, "student")] == ["1"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"epochs": 3, "colour": "blue"}, "unknown re-distillation options: colour"),
        ({"alpha": "0.5"}, "'alpha'"),
        ({"class_balancing": 1}, "'class_balancing'"),
        ({"epochs": 2.5}, "'epochs'"),
        ({"teacher_targets": "guess"}, "'teacher_targets'"),
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
    ],
)
def test_bad_params_are_refused_before_any_work(
    database: Engine, registry: ModelRegistry, params: dict[str, Any], message: str
) -> None:
    ctx, reports = context(database, registry, **params)
    with pytest.raises(ValueError, match=message):
        run(ctx)
    assert reports == []


def test_without_a_local_teacher_only_teacher_observed_rows_count_weighted_by_1_over_pi(
    database: Engine, registry: ModelRegistry
) -> None:
    splits = digits_splits(seed=0)
    x = np.concatenate([splits.teacher_train.x, splits.transfer.x, splits.validation.x])
    y = np.concatenate([splits.teacher_train.y, splits.transfer.y, splits.validation.y])
    noisy = add_noise(x, 0.3, np.random.default_rng(3))
    traffic = log_traffic(database, registry, noisy, y, teacher_version="remote")
    settings = make_settings(registry.root, model={"name": MODEL}, teacher={"mode": "remote"})
    ctx, _ = context(database, registry, settings=settings, min_rows=50, epochs=10)

    result = run(ctx)

    observed = int(traffic.observed.sum())
    assert result["rows"]["total"] == observed < len(y)
    assert result["rows"]["discarded"] == {"no_teacher_output": len(y) - observed}
    assert result["teacher_version"] == "remote"
    candidate = registry.manifest(MODEL, result["candidate_version"])
    assert candidate.metadata["run"]["teacher"]["sources"] == {"logged": observed}
    # The gate is the newest 20% of the observed rows; agreement there is the Hájek mean
    # with w = 1/π, recomputed here from what was logged.
    kept = np.flatnonzero(traffic.observed)
    gate = kept[len(kept) - result["rows"]["gate"] :]
    student = load_onnx_model(registry, registry.manifest(MODEL, "1"))
    served = softmax(student.logits(noisy[gate]), student.manifest.temperature)
    w = np.where(served.max(axis=1) < THRESHOLD, 1.0, 1.0 / SHADOW_RATE)
    agree = served.argmax(axis=1) == traffic.teacher_probs[gate].argmax(axis=1)
    expected = float((w * agree).sum() / w.sum())
    assert result["metrics"]["incumbent"]["teacher_agreement"] == pytest.approx(expected, abs=1e-9)
    assert w.min() < w.max()  # both kinds of rows are there, so the weighting matters


@pytest.mark.parametrize("weights", ["none", "not_its_own"])
def test_without_usable_weights_the_candidate_starts_fresh_and_says_why(
    database: Engine, registry: ModelRegistry, weights: str
) -> None:
    incumbent = registry.manifest(MODEL, "1")
    stored = registry.load_weights(incumbent)
    assert stored is not None
    # The same serving model, stored without weights or with weights that are not its own.
    extra = (
        {}
        if weights == "none"
        else {WEIGHTS_FILE: encode_weights({k: np.zeros_like(v) for k, v in stored.items()})}
    )
    bare = registry.register(
        name=MODEL, role="student", model=registry.read_verified(incumbent),
        input=incumbent.input, output_name=incumbent.output_name,
        class_names=incumbent.class_names, temperature=incumbent.temperature,
        metadata={"architecture": incumbent.metadata["architecture"]}, extra_files=extra,
    )  # fmt: skip
    registry.set_active(MODEL, "student", bare.version)
    x, y = logged_digits()
    log_traffic(database, registry, x, y)
    ctx, _ = context(database, registry, epochs=5)

    result = run(ctx)

    assert result["incumbent_version"] == bare.version
    assert result["warm_start"] is False
    warm = registry.manifest(MODEL, result["candidate_version"]).metadata["run"]["warm_start"]
    assert warm["weights"] is False
    assert ("without weights.npz" if weights == "none" else "differ from its ONNX") in warm["note"]
    assert warm["architecture"] == incumbent.metadata["architecture"]


def test_every_knob_on_with_two_teacher_versions(database: Engine, registry: ModelRegistry) -> None:
    x, y = logged_digits()
    log_traffic(database, registry, x, y)
    # A second teacher version (the student's network, so it answers differently) goes
    # live after the traffic was logged: the versions present are 1 (logged) and 2.
    student = registry.manifest(MODEL, "1")
    second = registry.register(
        name=f"{MODEL}-teacher", role="teacher", model=registry.read_verified(student),
        input=student.input, output_name=student.output_name, class_names=student.class_names,
    )  # fmt: skip
    registry.set_active(second.name, "teacher", second.version)
    params: dict[str, Any] = {
        "average_teacher_versions": True,
        "confidence_weighting": True,
        "class_balancing": True,
        "kd_temperature": 4.0,
        "kd_temperature_final": 1.0,
        "alpha": 0.3,
        "epochs": 12,
        "temperature": 2.5,
        "seed": 3,
    }
    ctx, _ = context(database, registry, **params)

    result = run(ctx)

    assert result["teacher_version"] == "1+2"
    assert result["seed"] == 3
    run_manifest = registry.manifest(MODEL, result["candidate_version"]).metadata["run"]
    assert run_manifest["teacher"]["averaged_versions"] == ["1", "2"]
    assert run_manifest["teacher"]["sources"] == {"run": len(y)}
    assert run_manifest["recipe"] == {
        "temperature": 4.0, "final_temperature": 1.0, "alpha": 0.3,
        "confidence_weighting": True, "class_balancing": True, "epochs": 12,
        "lr": 3e-3, "batch_size": 64, "weight_decay": 0.0, "seed": 3,
    }  # fmt: skip
    assert run_manifest["incumbent"] == {"version": "1", "temperature": 2.5}
    assert run_manifest["config"]["serving_temperature"] == 2.5
    assert len(run_manifest["loss"]) == 12


def test_the_same_job_on_the_same_data_trains_the_same_candidate(
    database: Engine, registry: ModelRegistry
) -> None:
    x, y = logged_digits()
    log_traffic(database, registry, x, y)
    first = run(context(database, registry, epochs=5, teacher_targets="run")[0])
    second = run(context(database, registry, epochs=5, teacher_targets="run")[0])
    a, b = (registry.manifest(MODEL, r["candidate_version"]) for r in (first, second))
    assert a.version != b.version
    assert a.sha256 == b.sha256
    assert first["metrics"] == second["metrics"]
    assert a.metadata["run"]["teacher"]["sources"] == {"run": len(y)}
