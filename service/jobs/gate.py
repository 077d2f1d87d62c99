"""The promotion gate: a candidate against the incumbent, on the same requests.

Every pair is one request both students answered (`rollout_outputs`); the teacher's
answer (with its inclusion probability π) and the label, when they exist, join in by
request id. The gate reports and judges:
- paired accuracy on labelled pairs, with the exact McNemar test on the discordant pairs
  (b: incumbent right and candidate wrong, c: the reverse);
- agreement with the teacher, weighted by 1/π (METRICS.md), for both students, and the
  paired difference with a Wald interval on the effective sample size;
- top-label ECE (15 bins) of both on labelled pairs, with the candidate's null quantile
  (the ECE a perfectly calibrated model shows at that n: small samples inflate ECE);
- churn: the share of pairs where the two students disagree;
- latency: the ratio of median forward-pass times.
Verdicts: "wait" (too few pairs or labels, or the evidence is not yet conclusive),
"fail" (with every reason), "pass". A candidate fails only on evidence that it is worse
beyond a margin, and passes only on evidence that it is not (non-inferiority): an
inconclusive comparison waits for more traffic rather than flipping a coin. Labels
outrank the teacher: a candidate significantly more accurate on labelled pairs (McNemar)
is not held back by agreeing less with a teacher that is itself wrong on drifted inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, select

from service.monitoring.metrics import (
    CELLS,
    confidence_bin,
    ece_null_quantile,
    expected_calibration_error,
)
from service.monitoring.metrics.intervals import effective_sample_size, mcnemar_exact, z_quantile
from service.persistence.loop import RolloutRow
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


def evaluate(connection: Connection, rollout: RolloutRow, defaults: RolloutSettings) -> Verdict:
    """The gate on a stored rollout: its pairs since it entered its stage, its own settings
    (the defaults overridden by those it was created with). A closed rollout is judged as
    if it were in A/B."""
    settings = defaults.model_copy(update=rollout.config)
    stats = statistics(load_pairs(connection, rollout.id), stage_started=rollout.updated_at)
    return judge(stats, settings, stage=rollout.stage if rollout.open else "ab")


def _ece(
    confidence: npt.NDArray[np.float64], correct: npt.NDArray[np.bool_]
) -> tuple[float, float]:
    """ECE and its null 95% quantile at these bin counts."""
    cells = confidence_bin(confidence)
    counts = np.bincount(cells, minlength=CELLS)
    sum_conf = np.bincount(cells, weights=confidence, minlength=CELLS)
    ece = expected_calibration_error(
        counts, np.bincount(cells, weights=correct.astype(np.float64), minlength=CELLS), sum_conf
    )
    return ece, ece_null_quantile(counts, sum_conf)


def statistics(
    pairs: Pairs, *, stage_started: float = -math.inf, alpha: float = 0.05
) -> dict[str, float]:
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
        inc_agrees = (pairs.incumbent_label[observed] == t).astype(np.float64)
        cand_agrees = (pairs.candidate_label[observed] == t).astype(np.float64)
        inc = float((w * inc_agrees).sum() / w.sum())
        cand = float((w * cand_agrees).sum() / w.sum())
        # Paired difference d = 1[cand = t] - 1[inc = t]: weighted mean, Wald on n_eff.
        d = cand_agrees - inc_agrees
        n_eff = effective_sample_size(float(w.sum()), float((w * w).sum()))
        spread = float((w * (d - (cand - inc)) ** 2).sum() / w.sum())
        half = z_quantile(alpha) * math.sqrt(spread / n_eff) if n_eff > 0 else math.inf
        stats |= {"agreement_incumbent": inc, "agreement_candidate": cand,
                  "agreement_delta": cand - inc, "agreement_delta_low": cand - inc - half,
                  "agreement_delta_high": cand - inc + half}  # fmt: skip
    labelled = pairs.label >= 0
    stats["labelled_pairs"] = float(labelled.sum())
    if labelled.any():
        y = pairs.label[labelled]
        inc_right = pairs.incumbent_label[labelled] == y
        cand_right = pairs.candidate_label[labelled] == y
        b = int((inc_right & ~cand_right).sum())
        c = int((cand_right & ~inc_right).sum())
        ece_inc, _ = _ece(pairs.incumbent_confidence[labelled], inc_right)
        ece_cand, ece_null = _ece(pairs.candidate_confidence[labelled], cand_right)
        stats |= {
            "accuracy_incumbent": float(inc_right.mean()),
            "accuracy_candidate": float(cand_right.mean()),
            "accuracy_delta": float(cand_right.mean() - inc_right.mean()),
            "b_incumbent_only": float(b), "c_candidate_only": float(c),
            "mcnemar_p": mcnemar_exact(b, c),
            "ece_incumbent": ece_inc, "ece_candidate": ece_cand, "ece_delta": ece_cand - ece_inc,
            "ece_candidate_null95": ece_null,
        }  # fmt: skip
    return stats


def judge(stats: dict[str, float], settings: RolloutSettings, *, stage: str) -> Verdict:
    """The gate's verdict for a rollout in `stage` ("shadow": may it serve some traffic?
    "ab": may it replace the incumbent?)."""
    in_stage = stats.get("pairs_in_stage", 0.0)
    if in_stage < settings.min_pairs:  # judged on a full sample only: no early rollbacks
        return Verdict("wait", stats, [f"{in_stage:.0f}/{settings.min_pairs} pairs in stage"])
    reasons: list[str] = []
    waiting: list[str] = []
    labelled = stats.get("labelled_pairs", 0.0)
    judged_labels = labelled >= max(settings.min_labelled, 1)
    significant = judged_labels and stats["mcnemar_p"] < settings.alpha
    more_accurate = significant and stats["c_candidate_only"] > stats["b_incumbent_only"]
    margin = settings.max_agreement_drop
    if more_accurate:
        pass  # the teacher is a proxy for the labels; the labels have spoken
    elif stats.get("teacher_pairs", 0.0) >= MIN_TEACHER_PAIRS:
        low, high = stats["agreement_delta_low"], stats["agreement_delta_high"]
        if high < -margin:
            reasons.append(
                f"teacher agreement lower by more than {margin} (CI {low:.3f}..{high:.3f})"
            )
        elif low < -margin:
            waiting.append(f"teacher agreement not yet shown within {margin} (CI low {low:.3f})")
    else:
        waiting.append(f"{stats.get('teacher_pairs', 0):.0f}/{MIN_TEACHER_PAIRS} teacher pairs")
    churn = stats.get("churn", 0.0)
    gains = more_accurate or stats.get("agreement_delta_low", -1.0) > 0
    if churn > settings.max_churn and not gains:
        reasons.append(
            f"churn {churn:.3f} > {settings.max_churn} without gaining teacher agreement"
        )
    latency = stats.get("latency_ratio", math.nan)
    if latency > settings.max_latency_ratio:
        reasons.append(f"latency {latency:.2f}x the incumbent's")
    if judged_labels:
        b, c = stats["b_incumbent_only"], stats["c_candidate_only"]
        if significant and b > c:
            reasons.append(
                f"less accurate (McNemar p={stats['mcnemar_p']:.3g}, b={b:.0f}, c={c:.0f})"
            )
        allowed = max(stats["ece_incumbent"] + settings.max_ece_increase,
                      stats["ece_candidate_null95"])  # fmt: skip
        if stats["ece_candidate"] > allowed:
            incumbent = stats["ece_incumbent"]
            reasons.append(
                f"ECE {stats['ece_candidate']:.3f} > {allowed:.3f} (incumbent {incumbent:.3f} "
                f"+ {settings.max_ece_increase}, or the noise level at this n)"
            )
    elif stage == "ab" and settings.min_labelled > 0:
        waiting.append(f"{labelled:.0f}/{settings.min_labelled} labelled pairs")
    if reasons:
        return Verdict("fail", stats, reasons)
    if waiting:
        return Verdict("wait", stats, waiting)
    return Verdict("pass", stats, [])
