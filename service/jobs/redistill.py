"""Re-distillation: a new student from logged traffic, registered as a candidate version.

1. Transfer set: the logged inputs before `ctx.now`, joined by request id to the teacher
   output recorded with them and to their feedback label (`persistence.transfer`).
2. Teacher targets (`teacher_targets`): the recorded output where there is one, else
   the local teacher run on the input; or the teacher run on every row. The labels then
   pass the label check (`jobs.label_check`, judged against the targets' answers); the
   labels it leaves out are dropped and their rows learn from the teacher alone.
3. Split by time: the newest `gate_fraction` is the gate set, the `calibration_fraction`
   before it fits the temperature, the rest trains.
4. Train with the default recipe (KL at T scaled by T², soft targets alone on
   unlabelled rows, alpha-mix with cross-entropy on labelled rows), warm-started from
   the serving student's stored weights.
5. Export to ONNX, check parity with torch, fit the calibration temperature, measure
   candidate and incumbent on the gate set, register the candidate with its weights and
   run manifest, and save its entropy reference. It is never activated here: the runner
   starts its rollout from this job's result.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from service.backends.onnx import load_onnx_model
from service.errors import ModelValidationError
from service.jobs.context import JobContext
from service.jobs.label_check import LabelPolicy, check_labels
from service.jobs.redistill_options import RedistillOptions
from service.jobs.redistill_start import Logits, starting_point
from service.jobs.redistill_targets import Targets, teacher_targets
from service.monitoring.metrics import CalibrationStats
from service.monitoring.probabilities import normalized_entropy, softmax
from service.persistence.transfer import TransferRows, read_transfer_rows
from service.registry import Manifest, ModelRegistry
from service.registry.store import WEIGHTS_FILE, encode_weights
from service.training.candidate import Recipe, export_student, train_student
from service.training.distill import torch_threads
from service.training.export import onnx_logits
from service.training.models import MLP, architecture, weight_arrays
from service.training.recipe import TimeSplit, time_split
from service.training.temperature import fit_temperature, log_softmax

__all__ = ["NotEnoughDataError", "RedistillOptions", "run"]


class NotEnoughDataError(RuntimeError):
    """Too few logged inputs (or too few with a teacher output) to re-distil."""


@dataclass(frozen=True)
class Trained:
    """A trained candidate before registration."""

    student: MLP
    onnx: bytes
    weights: bytes  # weights.npz
    parity: float
    loss: list[float]
    warm_start: dict[str, Any]


def run(ctx: JobContext) -> dict[str, Any]:
    """The job body: see the module docstring. Returns the job's result."""
    options = RedistillOptions.from_params(ctx.params)
    started = time.perf_counter()
    incumbent = ctx.registry.active_manifest(ctx.model, "student")
    serving_t = options.temperature if options.temperature is not None else incumbent.temperature
    rows = _read(ctx, incumbent, options)
    ctx.report(0.05, f"teacher targets for {len(rows)} logged inputs")
    targets = teacher_targets(ctx, rows, options)
    targets, label_check = _check_labels(ctx, targets, incumbent.num_classes)
    _require_rows(len(targets.rows), options, ctx.model, "logged inputs with a teacher output")
    split = time_split(
        len(targets.rows),
        gate_fraction=options.gate_fraction,
        calibration_fraction=options.calibration_fraction,
    )
    serving = load_onnx_model(ctx.registry, incumbent, threads=options.threads)
    trained = _train(ctx, incumbent, serving.logits, targets, split, options)
    ctx.report(0.9, "fitting the candidate's temperature")
    temperature, fitted_on = _fit_temperature(trained.onnx, targets, split.calibration, options)
    ctx.report(0.93, "measuring candidate and incumbent on the gate set")
    gate_x = targets.rows.x[split.gate]
    metrics = {
        "candidate": _gate_metrics(onnx_logits(trained.onnx, gate_x), temperature, targets, split),
        "incumbent": _gate_metrics(serving.logits(gate_x), serving_t, targets, split),
    }
    run_manifest = {
        "kind": ctx.kind,
        "job_id": ctx.job_id,
        "model": ctx.model,
        "evidence": dict(ctx.evidence),
        "config": options.as_dict() | {"serving_temperature": serving_t},
        "recipe": asdict(_recipe(options)),
        "data_window": _data_window(ctx, options, targets, split),
        "rows": _rows_summary(targets, split),
        "label_check": label_check,
        "teacher": targets.describe(),
        "incumbent": {"version": incumbent.version, "temperature": serving_t},
        "warm_start": trained.warm_start,
        "seeds": {"training": options.seed, "initialisation": options.seed, "split": "by time"},
        "loss": [round(loss, 6) for loss in trained.loss],
        "temperature": {"value": temperature, "fitted_on": fitted_on},
        "parity_max_abs_logit_diff": trained.parity,
        "metrics": metrics,
    }
    ctx.report(0.96, "registering the candidate")
    candidate = _register(ctx, incumbent, trained, temperature, run_manifest, targets)
    _save_reference(ctx.registry, candidate, gate_x, options.threads)
    seconds = round(time.perf_counter() - started, 3)
    ctx.report(1.0, f"registered candidate {ctx.model}/{candidate.version} in {seconds:.1f}s")
    return {
        "candidate_version": candidate.version,
        "incumbent_version": incumbent.version,
        "teacher_version": targets.version,
        "rows": run_manifest["rows"],
        "label_check": label_check,
        "metrics": metrics,
        "parity_max_abs_logit_diff": trained.parity,
        "temperature": temperature,
        "temperature_fitted_on": fitted_on,
        "seed": options.seed,
        "warm_start": trained.warm_start["weights"],
        "seconds": seconds,
    }


def _read(ctx: JobContext, incumbent: Manifest, options: RedistillOptions) -> TransferRows:
    ctx.report(0.01, f"reading logged inputs of {ctx.model!r}")
    with ctx.database.connect() as connection:
        rows = read_transfer_rows(
            connection,
            model=ctx.model,
            features=incumbent.input.features,
            classes=incumbent.num_classes,
            before=ctx.now,
            since=_since(ctx, options),
            limit=options.max_rows,
        )
    _require_rows(len(rows), options, ctx.model, "logged inputs")
    return rows


def _check_labels(
    ctx: JobContext, targets: Targets, num_classes: int
) -> tuple[Targets, dict[str, Any]]:
    """The targets with the labels the label check leaves out taken away (their rows
    stay, learning the teacher alone), and its report; the teacher's answer is the
    argmax of its targets."""
    rows = targets.rows
    check = check_labels(
        rows.labels,
        rows.label_clients,
        targets.logits.argmax(axis=1),
        num_classes=num_classes,
        policy=LabelPolicy.from_settings(ctx.settings.feedback),
    )
    if check.report["used"] == check.report["labels"]:
        return targets, check.report
    ctx.report(0.1, "; ".join(check.report["notes"]))
    return replace(targets, rows=rows.without_labels(~check.keep)), check.report


def _since(ctx: JobContext, options: RedistillOptions) -> float | None:
    return None if options.window_s is None else ctx.now - options.window_s


def _train(
    ctx: JobContext,
    incumbent: Manifest,
    serving_logits: Logits,
    targets: Targets,
    split: TimeSplit,
    options: RedistillOptions,
) -> Trained:
    """Warm start, distil on the training slice, export and check parity."""
    rows, train = targets.rows, split.train

    def progress(epoch: int, total: int, loss: float) -> None:
        message = f"distilling (epoch {epoch}/{total}, loss {loss:.4f})"
        ctx.report(0.15 + 0.7 * epoch / total, message)

    with torch_threads(options.threads):
        student, warm = starting_point(
            ctx.registry, incumbent, serving_logits, rows.x[:256], options
        )
        loss = train_student(
            student, rows.x[train], targets.logits[train], rows.labels[train], _recipe(options),
            progress=progress,
        )  # fmt: skip
        ctx.report(0.86, "exporting ONNX and checking parity")
        onnx, parity = export_student(
            student,
            input_name=incumbent.input.name,
            output_name=incumbent.output_name,
            probe=rows.x[train.stop :],
        )
        weights = encode_weights(weight_arrays(student))
    if not parity < options.max_parity:
        raise ModelValidationError(
            f"the candidate's ONNX export differs from torch by {parity:.2e} "
            f"(limit {options.max_parity:.0e})"
        )
    return Trained(student, onnx, weights, parity, loss, warm)


def _require_rows(n: int, options: RedistillOptions, model: str, what: str) -> None:
    if n < options.min_rows:
        raise NotEnoughDataError(
            f"re-distillation of {model!r} needs at least {options.min_rows} {what}; "
            f"found {n} (log more traffic: recording.input_sample_rate, or lower min_rows)"
        )


def _recipe(options: RedistillOptions) -> Recipe:
    return Recipe(
        temperature=options.kd_temperature,
        final_temperature=options.kd_temperature_final,
        alpha=options.alpha,
        confidence_weighting=options.confidence_weighting,
        class_balancing=options.class_balancing,
        epochs=options.epochs,
        lr=options.lr,
        batch_size=options.batch_size,
        weight_decay=options.weight_decay,
        seed=options.seed,
    )


def _fit_temperature(
    onnx_bytes: bytes, targets: Targets, part: slice, options: RedistillOptions
) -> tuple[float, str]:
    """T on the calibration slice: NLL of its labels when it has enough, else the
    cross-entropy to the teacher's probabilities (METRICS.md allows both)."""
    logits = onnx_logits(onnx_bytes, targets.rows.x[part])
    labels = targets.rows.labels[part]
    labelled = labels >= 0
    if int(labelled.sum()) >= options.min_calibration_labels:
        return fit_temperature(logits[labelled], labels[labelled]), "labels"
    teacher = np.exp(log_softmax(targets.logits[part]))
    return fit_temperature(logits, target_probs=teacher), "teacher"


def _gate_metrics(
    logits: npt.NDArray[np.float32], temperature: float, targets: Targets, split: TimeSplit
) -> dict[str, Any]:
    """Agreement with the teacher on every gate row; accuracy, ECE and NLL on the labelled
    ones (None without labels). When only teacher-observed rows could be kept, agreement
    and accuracy weigh rows by 1/π (`Targets.weights`) so they describe all traffic; ECE
    and NLL stay unweighted."""
    gate = split.gate
    p = softmax(logits, temperature).astype(np.float64)
    predicted = p.argmax(axis=1)
    w = targets.weights[gate]
    agree = predicted == targets.logits[gate].argmax(axis=1)
    y = targets.rows.labels[gate]
    labelled = y >= 0
    out: dict[str, Any] = {
        "rows": len(y),
        "labelled": int(labelled.sum()),
        "teacher_agreement": float((w * agree).sum() / w.sum()),
        "accuracy": None,
        "ece": None,
        "nll": None,
    }
    if labelled.any():
        wl, pl, yl = w[labelled], p[labelled], y[labelled]
        out["accuracy"] = float((wl * (predicted[labelled] == yl)).sum() / wl.sum())
        out["ece"] = CalibrationStats.from_arrays(pl, yl).ece()
        p_y = np.maximum(pl[np.arange(len(yl)), yl], 1e-12)
        out["nll"] = float(-np.log(p_y).mean())
    return out


def _rows_summary(targets: Targets, split: TimeSplit) -> dict[str, Any]:
    labels = targets.rows.labels
    sizes = split.sizes()
    return {
        "transfer": sizes["train"],
        "calibration": sizes["calibration"],
        "gate": sizes["gate"],
        "total": len(labels),
        "labelled": {
            name: int((labels[part] >= 0).sum())
            for name, part in (
                ("transfer", split.train),
                ("calibration", split.calibration),
                ("gate", split.gate),
            )
        },
        "discarded": targets.rows.discarded | targets.dropped,
    }


def _data_window(
    ctx: JobContext, options: RedistillOptions, targets: Targets, split: TimeSplit
) -> dict[str, Any]:
    created = targets.rows.created_at
    return {
        "before": ctx.now,
        "since": _since(ctx, options),
        "first_input_at": float(created[0]),
        "last_input_at": float(created[-1]),
        "calibration_from": float(created[split.calibration.start]),
        "gate_from": float(created[split.gate.start]),
        "labels_received_before": ctx.now,
    }


def _register(
    ctx: JobContext,
    incumbent: Manifest,
    trained: Trained,
    temperature: float,
    run_manifest: dict[str, Any],
    targets: Targets,
) -> Manifest:
    """A new student version of the same name, validated, never activated."""
    candidate = ctx.registry.register(
        name=ctx.model,
        role="student",
        model=trained.onnx,
        input=incumbent.input,
        output_name=incumbent.output_name,
        class_names=incumbent.class_names,
        temperature=temperature,
        metadata={
            "run": run_manifest,
            "architecture": architecture(trained.student),
            "teacher": f"{targets.name}/{targets.version}",
            "incumbent": incumbent.version,
        },
        extra_files={WEIGHTS_FILE: trained.weights},
    )
    load_onnx_model(ctx.registry, candidate)  # raises ModelValidationError on any defect
    return candidate


def _save_reference(
    registry: ModelRegistry, candidate: Manifest, x: npt.NDArray[np.float32], threads: int
) -> None:
    """Entropy drift's reference for the candidate: its entropies on the gate set at its
    frozen reference temperature, as the server will compute them after a promotion."""
    model = load_onnx_model(registry, candidate, threads=threads)
    probs = softmax(model.logits(np.ascontiguousarray(x)), candidate.reference_temperature)
    registry.save_reference(candidate, normalized_entropy(probs).tolist(), source="gate")
