"""Build the bundled digits teacher and student: real distillation in seconds on a CPU.

The teacher (64→256→256→10) learns from 40% of the data with labels. The student
(64→16→10, about 1.2k parameters) is distilled from the teacher's logits on that 40%
plus a 30% "logged traffic" split whose labels it never sees, then temperature-scaled
on a 15% validation split. The last 15% is the test split every reported number uses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from service.backends.onnx import load_onnx_model
from service.errors import ModelValidationError, NotFoundError
from service.monitoring.probabilities import normalized_entropy, softmax
from service.registry import InputSpec, Manifest, ModelRegistry
from service.registry.store import WEIGHTS_FILE, encode_weights
from service.training.distill import UNLABELLED, distill, torch_threads, train_classifier
from service.training.export import export_onnx, onnx_parity
from service.training.models import MLP, architecture, param_count, predict_logits, weight_arrays
from service.training.temperature import fit_temperature, nll

FEATURES = 64
CLASS_NAMES = tuple(str(digit) for digit in range(10))
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MAX_PARITY = 1e-4
"""Largest |Δ logit| between torch and ONNX Runtime a build accepts."""

TEACHER_HIDDEN = (256, 256)
STUDENT_HIDDEN = (16,)
KD_TEMPERATURE = 4.0
KD_ALPHA = 0.3
# Models this small: a second thread costs more in sync than it saves (one thread built
# in 4 s where two took 60 s on a busy 2-core host, with the same result).
BUILD_THREADS = 1

Message = Callable[[str], None]


@dataclass(frozen=True)
class Split:
    """Inputs in [0, 1] (float32 [n, 64]) and their digit labels (int64 [n])."""

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class DigitsSplits:
    """The four stratified, disjoint splits of `load_digits` for one seed (read-only)."""

    teacher_train: Split
    transfer: Split
    validation: Split
    test: Split
    seed: int

    def sizes(self) -> dict[str, int]:
        return {
            "teacher_train": len(self.teacher_train),
            "transfer": len(self.transfer),
            "validation": len(self.validation),
            "test": len(self.test),
        }


@dataclass(frozen=True)
class DigitsBuild:
    """What `build_digits` registered and activated, and the numbers it measured."""

    teacher: Manifest
    student: Manifest
    metrics: dict[str, float]


def digits_splits(seed: int = 0) -> DigitsSplits:
    """Split the 1,797 digits 40/30/15/15 (teacher_train/transfer/validation/test)."""
    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)  # pixels are 0..16
    y = np.asarray(bunch.target, dtype=np.int64)
    n = len(y)
    rest_x, rest_y, test = _carve(x, y, round(0.15 * n), seed)
    rest_x, rest_y, validation = _carve(rest_x, rest_y, round(0.15 * n), seed)
    rest_x, rest_y, transfer = _carve(rest_x, rest_y, round(0.30 * n), seed)
    return DigitsSplits(
        teacher_train=_frozen(rest_x, rest_y),
        transfer=transfer,
        validation=validation,
        test=test,
        seed=seed,
    )


def build_digits(
    registry: ModelRegistry,
    *,
    name: str = "digits",
    seed: int = 0,
    progress: Message | None = None,
) -> DigitsBuild:
    """Train, distil, calibrate, export, register, validate and activate both models.

    The teacher is registered as `{name}-teacher` (role teacher), the student as `name`
    (role student) with its fitted temperature. Raises ModelValidationError when an
    export fails the parity check or a registered version fails validation.
    """
    say = progress or _quiet
    started = time.perf_counter()
    splits = digits_splits(seed)
    with (
        torch_threads(min(BUILD_THREADS, torch.get_num_threads())),
        torch.random.fork_rng(devices=[]),
    ):
        torch.manual_seed(seed)  # the weight initialisation is drawn from the global RNG
        teacher = _train_teacher(splits, seed, say)
        student = _distil_student(teacher, splits, seed, say)
        say("fitting the student's temperature on the validation split")
        calibration = _calibrate(student, splits.validation)
        metrics = _evaluate(teacher, student, splits) | calibration
        say("exporting ONNX and checking parity")
        teacher_onnx, metrics["teacher_parity"] = _export_checked(teacher, splits, "teacher")
        student_onnx, metrics["student_parity"] = _export_checked(student, splits, "student")
        student_weights = encode_weights(weight_arrays(student))
    metrics["train_seconds"] = round(time.perf_counter() - started, 3)
    teacher_manifest, student_manifest = _register_pair(
        registry,
        name=name,
        models=(teacher_onnx, student_onnx),
        architectures=(architecture(teacher), architecture(student)),
        student_weights=student_weights,
        temperature=metrics["student_temperature"],
        metadata={**metrics, "seed": seed, "splits": splits.sizes()},
        say=say,
    )
    _save_entropy_reference(registry, student_manifest, splits.validation)
    metrics["build_seconds"] = round(time.perf_counter() - started, 3)  # incl. validation
    return DigitsBuild(teacher=teacher_manifest, student=student_manifest, metrics=metrics)


def _save_entropy_reference(registry: ModelRegistry, manifest: Manifest, held_out: Split) -> None:
    """Entropy drift's reference: the exported student's entropies on the validation split,
    at its frozen reference temperature (the same numbers the server will compute)."""
    model = load_onnx_model(registry, manifest)
    logits = model.logits(np.ascontiguousarray(held_out.x, dtype=np.float32))
    probs = softmax(logits, manifest.reference_temperature)
    registry.save_reference(manifest, normalized_entropy(probs).tolist(), source="validation")


def ensure_digits(
    registry: ModelRegistry,
    *,
    name: str = "digits",
    seed: int = 0,
    progress: Message | None = None,
) -> bool:
    """Build the demo models unless `name` already has a student version; True if built."""
    try:
        if registry.versions(name, "student"):
            return False
    except NotFoundError:
        pass  # no directory for `name` yet
    build_digits(registry, name=name, seed=seed, progress=progress)
    return True


def _train_teacher(splits: DigitsSplits, seed: int, say: Message) -> MLP:
    teacher = MLP(FEATURES, TEACHER_HIDDEN, len(CLASS_NAMES))
    train_classifier(
        teacher,
        splits.teacher_train.x,
        splits.teacher_train.y,
        epochs=40,
        lr=1e-3,
        batch_size=64,
        seed=seed,
        weight_decay=1e-4,
        progress=_epochs(say, "training teacher"),
    )
    return teacher


def _distil_student(teacher: MLP, splits: DigitsSplits, seed: int, say: Message) -> MLP:
    # Transfer rows stand for logged traffic: teacher soft targets, no labels.
    x = np.concatenate([splits.teacher_train.x, splits.transfer.x])
    labels = np.concatenate(
        [splits.teacher_train.y, np.full(len(splits.transfer), UNLABELLED, dtype=np.int64)]
    )
    teacher_logits = predict_logits(teacher, torch.tensor(x))
    student = MLP(FEATURES, STUDENT_HIDDEN, len(CLASS_NAMES))
    distill(
        student,
        teacher_logits,
        x,
        labels,
        temperature=KD_TEMPERATURE,
        alpha=KD_ALPHA,
        epochs=120,
        lr=3e-3,
        batch_size=64,
        seed=seed,
        progress=_epochs(say, "distilling student"),
    )
    return student


def _calibrate(student: MLP, validation: Split) -> dict[str, float]:
    logits = _logits(student, validation.x)
    temperature = fit_temperature(logits, validation.y)
    return {
        "student_temperature": temperature,
        "student_validation_nll_t1": nll(logits, validation.y, 1.0),
        "student_validation_nll": nll(logits, validation.y, temperature),
    }


def _evaluate(teacher: MLP, student: MLP, splits: DigitsSplits) -> dict[str, float]:
    test = splits.test
    teacher_pred = _logits(teacher, test.x).argmax(axis=1)
    student_pred = _logits(student, test.x).argmax(axis=1)
    return {
        "teacher_accuracy": float(np.mean(teacher_pred == test.y)),
        "student_accuracy": float(np.mean(student_pred == test.y)),
        "agreement": float(np.mean(student_pred == teacher_pred)),
        "teacher_params": param_count(teacher),
        "student_params": param_count(student),
        "kd_temperature": KD_TEMPERATURE,
        "kd_alpha": KD_ALPHA,
    }


def _export_checked(model: MLP, splits: DigitsSplits, role: str) -> tuple[bytes, float]:
    data = export_onnx(model, FEATURES, input_name=INPUT_NAME, output_name=OUTPUT_NAME)
    probe = np.concatenate([splits.validation.x, splits.test.x])
    parity = onnx_parity(model, data, probe)
    if not parity < MAX_PARITY:
        raise ModelValidationError(
            f"{role} ONNX export differs from torch by {parity:.2e} (limit {MAX_PARITY:.0e})"
        )
    return data, parity


def _register_pair(
    registry: ModelRegistry,
    *,
    name: str,
    models: tuple[bytes, bytes],
    architectures: tuple[dict[str, Any], dict[str, Any]],
    student_weights: bytes,
    temperature: float,
    metadata: dict[str, Any],
    say: Message,
) -> tuple[Manifest, Manifest]:
    """Register teacher then student, validate both, and only then activate both.

    The student keeps its trained weights beside its ONNX (`weights.npz`): re-distillation
    warm-starts from them.
    """
    spec = InputSpec(name=INPUT_NAME, features=FEATURES)
    teacher = registry.register(
        name=f"{name}-teacher",
        role="teacher",
        model=models[0],
        input=spec,
        output_name=OUTPUT_NAME,
        class_names=CLASS_NAMES,
        metadata={**metadata, "architecture": architectures[0]},
    )
    student = registry.register(
        name=name,
        role="student",
        model=models[1],
        input=spec,
        output_name=OUTPUT_NAME,
        class_names=CLASS_NAMES,
        temperature=temperature,
        metadata={
            **metadata,
            "teacher": f"{teacher.name}/{teacher.version}",
            "architecture": architectures[1],
        },
        extra_files={WEIGHTS_FILE: student_weights},
    )
    for manifest in (teacher, student):
        load_onnx_model(registry, manifest)  # raises ModelValidationError on any defect
    registry.set_active(teacher.name, "teacher", teacher.version)
    registry.set_active(student.name, "student", student.version)
    say(f"registered {teacher.name}/{teacher.version} and {student.name}/{student.version}")
    return teacher, student


def _epochs(say: Message, what: str) -> Callable[[int, int, float], None]:
    def report(epoch: int, total: int, loss: float) -> None:
        # About ten lines per phase: enough to show progress without flooding a terminal.
        if epoch == 1 or epoch == total or epoch % max(total // 10, 1) == 0:
            say(f"{what} (epoch {epoch}/{total}, loss {loss:.3f})")

    return report


def _logits(model: MLP, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return predict_logits(model, torch.tensor(x)).numpy()


def _carve(
    x: npt.NDArray[np.float32], y: npt.NDArray[np.int64], size: int, seed: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], Split]:
    """Split off `size` rows, stratified by label; returns (rest x, rest y, carved)."""
    rest_x, part_x, rest_y, part_y = train_test_split(
        x, y, test_size=size, stratify=y, random_state=seed
    )
    return np.asarray(rest_x), np.asarray(rest_y), _frozen(part_x, part_y)


def _frozen(x: Any, y: Any) -> Split:
    x_arr = np.ascontiguousarray(x, dtype=np.float32)
    y_arr = np.ascontiguousarray(y, dtype=np.int64)
    # Splits are shared (tests, traffic generator); read-only stops silent mutation.
    x_arr.setflags(write=False)
    y_arr.setflags(write=False)
    return Split(x=x_arr, y=y_arr)


def _quiet(_message: str) -> None:
    """The default progress sink: say nothing."""
