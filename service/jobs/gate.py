"""The promotion gate: a candidate against the incumbent, on the same requests.

Every pair is one request both students answered (`rollout_outputs`); the teacher's
answer (with its inclusion probability π) and the label, when they exist, join in by
request id. The gate reports and judges:
- paired accuracy on labelled pairs, with the exact McNemar test on the discordant pairs
  (b: incumbent right and candidate wrong, c: the reverse);
- agreement with the teacher, weighted by 1/π (METRICS.md), for both students;
- top-label ECE (15 bins) of both on labelled pairs;
- churn: the share of pairs where the two students disagree;
- latency: the ratio of median forward-pass times.
Verdicts: "wait" (too few pairs or labels), "fail" (with every reason), "pass".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, select

from service.monitoring.metrics import CELLS, confidence_bin, expected_calibration_error
from service.monitoring.metrics.intervals import mcnemar_exact
from service.persistence.tables import Feedback, Prediction, RolloutOutput
from service.settings import RolloutSettings

MIN_TEACHER_PAIRS = 30
"""Teacher-observed pairs below which teacher agreement is reported but not judged."""


@dataclass(frozen=True)
class Pairs:
    """Column arrays of a rollout's pairs; label and teacher label are -1 when unknown."""

    created_at: npt.NDArray[np.float64]
    incumbent_label: npt.NDArray[np.int64]
    incumbent_confidence: npt.NDArray[np.float64]
    candidate_label: npt.NDArray[np.int64]
    candidate_confidence: npt.NDArray[np.float64]
    incumbent_seconds: npt.NDArray[np.float64]
    candidate_seconds: npt.NDArray[np.float64]
    teacher_label: npt.NDArray[np.int64]
    inclusion_probability: npt.NDArray[np.float64]
    label: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.created_at)


@dataclass(frozen=True)
class Verdict:
    verdict: str  # pass | fail | wait
    statistics: dict[str, float]
    reasons: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        stats = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in self.statistics.items()}  # fmt: skip
        return {"verdict": self.verdict, "reasons": self.reasons, **stats}


def load_pairs(connection: Connection, rollout_id: int) -> Pairs:
    o, p, f = RolloutOutput, Prediction, Feedback
    rows = connection.execute(
        select(
            o.created_at, o.incumbent_label, o.incumbent_confidence, o.candidate_label,
            o.candidate_confidence, o.incumbent_seconds, o.candidate_seconds,
            p.teacher_label, p.inclusion_probability, f.label,
        )
        .select_from(o)
        .outerjoin(p, p.request_id == o.request_id)
        .outerjoin(f, f.request_id == o.request_id)
        .where(o.rollout_id == rollout_id)
    ).all()  # fmt: skip
    columns: list[Any] = list(zip(*rows, strict=True)) if rows else [()] * 10

    def ints(values: Any) -> npt.NDArray[np.int64]:
        return np.array([-1 if v is None else v for v in values], dtype=np.int64)

    def floats(values: Any, missing: float = math.nan) -> npt.NDArray[np.float64]:
        return np.array([missing if v is None else v for v in values], dtype=np.float64)

    return Pairs(
        created_at=floats(columns[0]), incumbent_label=ints(columns[1]),
        incumbent_confidence=floats(columns[2]), candidate_label=ints(columns[3]),
        candidate_confidence=floats(columns[4]), incumbent_seconds=floats(columns[5]),
        candidate_seconds=floats(columns[6]), teacher_label=ints(columns[7]),
        inclusion_probability=floats(columns[8], 1.0), label=ints(columns[9]),
    )  # fmt: skip


def _ece(confidence: npt.NDArray[np.float64], correct: npt.NDArray[np.bool_]) -> float:
    cells = confidence_bin(confidence)
    counts = np.bincount(cells, minlength=CELLS)
    return expected_calibration_error(
        counts,
        np.bincount(cells, weights=correct.astype(np.float64), minlength=CELLS),
        np.bincount(cells, weights=confidence, minlength=CELLS),
    )


def statistics(pairs: Pairs, *, stage_started: float = -math.inf) -> dict[str, float]:
    n = len(pairs)
    stats: dict[str, float] = {
        "pairs": float(n),
        "pairs_in_stage": float(int((pairs.created_at >= stage_started).sum())),
    }
    if n == 0:
        return stats
    stats["churn"] = float((pairs.candidate_label != pairs.incumbent_label).mean())
    median_incumbent = float(np.median(pairs.incumbent_seconds))
    stats["latency_ratio"] = (
        float(np.median(pairs.candidate_seconds)) / median_incumbent
        if median_incumbent > 0
        else math.nan
    )
    observed = pairs.teacher_label >= 0
    stats["teacher_pairs"] = float(observed.sum())
    if observed.any():
        w = 1.0 / np.clip(pairs.inclusion_probability[observed], 1e-6, 1.0)
        t = pairs.teacher_label[observed]
        inc = float((w * (pairs.incumbent_label[observed] == t)).sum() / w.sum())
        cand = float((w * (pairs.candidate_label[observed] == t)).sum() / w.sum())
        stats |= {"agreement_incumbent": inc, "agreement_candidate": cand,
                  "agreement_delta": cand - inc}  # fmt: skip
    labelled = pairs.label >= 0
    stats["labelled_pairs"] = float(labelled.sum())
    if labelled.any():
        y = pairs.label[labelled]
        inc_right = pairs.incumbent_label[labelled] == y
        cand_right = pairs.candidate_label[labelled] == y
        b = int((inc_right & ~cand_right).sum())
        c = int((cand_right & ~inc_right).sum())
        ece_inc = _ece(pairs.incumbent_confidence[labelled], inc_right)
        ece_cand = _ece(pairs.candidate_confidence[labelled], cand_right)
        stats |= {
            "accuracy_incumbent": float(inc_right.mean()),
            "accuracy_candidate": float(cand_right.mean()),
            "accuracy_delta": float(cand_right.mean() - inc_right.mean()),
            "b_incumbent_only": float(b), "c_candidate_only": float(c),
            "mcnemar_p": mcnemar_exact(b, c),
            "ece_incumbent": ece_inc, "ece_candidate": ece_cand, "ece_delta": ece_cand - ece_inc,
        }  # fmt: skip
    return stats


def judge(stats: dict[str, float], settings: RolloutSettings, *, stage: str) -> Verdict:
    """The gate's verdict for a rollout in `stage` ("shadow": may it serve some traffic?
    "ab": may it replace the incumbent?)."""
    reasons: list[str] = []
    waiting: list[str] = []
    in_stage = stats.get("pairs_in_stage", 0.0)
    if in_stage < settings.min_pairs:  # judged on a full sample only: no early rollbacks
        return Verdict("wait", stats, [f"{in_stage:.0f}/{settings.min_pairs} pairs in stage"])
    delta = stats.get("agreement_delta", math.nan)
    judged_teacher = stats.get("teacher_pairs", 0.0) >= MIN_TEACHER_PAIRS
    if judged_teacher and delta < -settings.max_agreement_drop:
        reasons.append(f"teacher agreement drops by {-delta:.3f}")
    churn = stats.get("churn", 0.0)
    if churn > settings.max_churn and not (judged_teacher and delta > 0):
        reasons.append(
            f"churn {churn:.3f} > {settings.max_churn} without gaining teacher agreement"
        )
    latency = stats.get("latency_ratio", math.nan)
    if latency > settings.max_latency_ratio:
        reasons.append(f"latency {latency:.2f}x the incumbent's")
    labelled = stats.get("labelled_pairs", 0.0)
    if labelled >= max(settings.min_labelled, 1):
        b, c = stats["b_incumbent_only"], stats["c_candidate_only"]
        if b > c and stats["mcnemar_p"] < settings.alpha:
            reasons.append(
                f"less accurate (McNemar p={stats['mcnemar_p']:.3g}, b={b:.0f}, c={c:.0f})"
            )
        if stats["ece_delta"] > settings.max_ece_increase:
            reasons.append(f"ECE worse by {stats['ece_delta']:.3f}")
    elif stage == "ab" and settings.min_labelled > 0:
        waiting.append(f"{labelled:.0f}/{settings.min_labelled} labelled pairs")
    if reasons:
        return Verdict("fail", stats, reasons)
    if waiting:
        return Verdict("wait", stats, waiting)
    return Verdict("pass", stats, [])
