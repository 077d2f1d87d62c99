"""The promotion gate's statistics and verdicts on synthetic pairs."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from service.jobs.gate import Pairs, judge, statistics
from service.settings import RolloutSettings

SETTINGS = RolloutSettings(min_pairs=200, min_labelled=100)


def pairs(
    n: int,
    *,
    candidate_right: float,
    incumbent_right: float,
    candidate_agrees: float,
    incumbent_agrees: float,
    labelled: float = 1.0,
    confidence: float = 0.9,
    seed: int = 0,
) -> Pairs:
    """n requests of 10 classes, truth y = teacher's answer flipped on a share of rows."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)

    def answer(share_right: float) -> npt.NDArray[np.int64]:
        right = rng.random(n) < share_right
        return np.where(right, y, (y + 1 + rng.integers(0, 9, n)) % 10).astype(np.int64)

    inc, cand = answer(incumbent_right), answer(candidate_right)
    teacher_inc = rng.random(n) < incumbent_agrees
    teacher = np.where(teacher_inc, inc, (inc + 1) % 10)
    cand = np.where(rng.random(n) < candidate_agrees, teacher, cand)
    label = np.where(rng.random(n) < labelled, y, -1)
    conf = np.full(n, confidence)
    return Pairs(
        created_at=np.arange(n, dtype=np.float64), incumbent_label=inc,
        incumbent_confidence=conf, candidate_label=cand.astype(np.int64),
        candidate_confidence=conf, incumbent_seconds=np.full(n, 1e-4),
        candidate_seconds=np.full(n, 1e-4), teacher_label=teacher.astype(np.int64),
        inclusion_probability=np.ones(n), label=label.astype(np.int64),
    )  # fmt: skip


def test_too_few_pairs_waits_whatever_they_show() -> None:
    bad = pairs(150, candidate_right=0.2, incumbent_right=0.9, candidate_agrees=0.2,
                incumbent_agrees=0.95)  # fmt: skip
    verdict = judge(statistics(bad), SETTINGS, stage="shadow")
    assert verdict.verdict == "wait" and "pairs" in verdict.reasons[0]


def test_the_same_model_passes() -> None:
    p = pairs(2000, candidate_right=0.9, incumbent_right=0.9, candidate_agrees=0.0,
              incumbent_agrees=0.95)  # fmt: skip
    same = Pairs(**{**p.__dict__, "candidate_label": p.incumbent_label,
                    "candidate_confidence": p.incumbent_confidence})  # fmt: skip
    stats = statistics(same)
    assert stats["churn"] == 0.0 and stats["agreement_delta"] == 0.0
    assert judge(stats, SETTINGS, stage="ab").verdict == "pass"


def test_clearly_less_accurate_fails_on_mcnemar() -> None:
    worse = pairs(2000, candidate_right=0.6, incumbent_right=0.9, candidate_agrees=0.0,
                  incumbent_agrees=0.9)  # fmt: skip
    verdict = judge(statistics(worse), SETTINGS, stage="ab")
    assert verdict.verdict == "fail"
    assert any("less accurate" in reason for reason in verdict.reasons)


def test_less_teacher_agreement_without_labels_fails_beyond_the_margin() -> None:
    drifts = pairs(3000, candidate_right=0.9, incumbent_right=0.9, candidate_agrees=0.0,
                   incumbent_agrees=0.95, labelled=0.0)  # fmt: skip
    stats = statistics(drifts)
    assert stats["agreement_delta_high"] < -SETTINGS.max_agreement_drop
    verdict = judge(stats, SETTINGS, stage="shadow")
    assert verdict.verdict == "fail" and any("agreement" in r for r in verdict.reasons)


def test_labels_outrank_the_teacher() -> None:
    """More accurate on labels, less in agreement with a teacher that is often wrong."""
    better = pairs(3000, candidate_right=0.85, incumbent_right=0.7, candidate_agrees=0.0,
                   incumbent_agrees=0.95)  # fmt: skip
    stats = statistics(better)
    assert stats["agreement_delta"] < 0 and stats["c_candidate_only"] > stats["b_incumbent_only"]
    assert judge(stats, SETTINGS, stage="ab").verdict == "pass"


def test_ece_is_judged_against_the_noise_at_this_n() -> None:
    # Both overconfident by the same amount: no ECE increase, no failure.
    p = pairs(400, candidate_right=0.8, incumbent_right=0.8, candidate_agrees=0.5,
              incumbent_agrees=0.95, confidence=0.99)  # fmt: skip
    stats = statistics(p)
    assert stats["ece_candidate"] > 0.1 and abs(stats["ece_delta"]) < 0.05
    assert not any("ECE" in r for r in judge(stats, SETTINGS, stage="ab").reasons)
    # The candidate alone overconfident: an ECE failure.
    worse = Pairs(**{**p.__dict__, "incumbent_confidence": np.full(400, 0.8)})
    verdict = judge(statistics(worse), SETTINGS, stage="ab")
    assert any("ECE" in r for r in verdict.reasons)


def test_ab_waits_for_labels_before_promotion() -> None:
    unlabelled = pairs(2000, candidate_right=0.9, incumbent_right=0.9, candidate_agrees=0.97,
                       incumbent_agrees=0.95, labelled=0.0)  # fmt: skip
    stats = statistics(unlabelled)
    assert judge(stats, SETTINGS, stage="shadow").verdict == "pass"
    ab = judge(stats, SETTINGS, stage="ab")
    assert ab.verdict == "wait" and "labelled" in ab.reasons[0]
