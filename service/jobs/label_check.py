"""The check of feedback labels before a retraining job uses them (RELIABILITY.md, Security).

Labels come from clients, so one client can try to steer a re-distillation or a
recalibration. Before a job trains or fits on them, each client's labels are judged:

1. Teacher disagreement: a client whose labels disagree with the teacher's answer on more
   than `max_teacher_disagreement` of its rows that have one (at least `min_judged` of
   them) has all its labels left out. Honest labels disagree about as often as the
   teacher is wrong; random labels over K classes disagree on (K - 1) / K.
2. Client share: no client supplies more than `max_client_share` of the labels kept.
   A client past it keeps an evenly spaced subset of its labels, as many as the share
   allows (the largest cap c with c ≤ share · Σ min(n_i, c)).

Left-out labels are not deleted: the rows stay as unlabelled ones, so re-distillation
still learns the teacher on them and recalibration may fall back to the teacher. The
report says what was found and what was left out, for the job's result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from service.settings import FeedbackSettings

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class LabelPolicy:
    max_client_share: float = 1.0  # 1: off
    max_teacher_disagreement: float = 0.8  # 1: off
    min_judged: int = 50

    @classmethod
    def from_settings(cls, settings: FeedbackSettings) -> LabelPolicy:
        return cls(
            max_client_share=settings.max_client_share,
            max_teacher_disagreement=settings.max_teacher_disagreement,
            min_judged=settings.disagreement_min_labels,
        )


@dataclass(frozen=True, eq=False)
class LabelCheck:
    """`keep[i]`: row i's label is used; `report`: JSON-able findings for the job result."""

    keep: BoolArray
    report: dict[str, Any]


def check_labels(
    labels: IntArray,
    clients: Sequence[str | None],
    teacher: IntArray,
    *,
    num_classes: int,
    policy: LabelPolicy,
) -> LabelCheck:
    """Judge the labels of one job's rows.

    Row i has `labels[i]` (-1: none), the client that sent it, and `teacher[i]`, the
    teacher's answer for it (-1: none recorded).
    """
    labelled = labels >= 0
    found, code = np.unique(np.array([c or "" for c in clients], dtype=str), return_inverse=True)
    names = [str(name) for name in found]
    code = code.reshape(-1)

    def per_client(rows: BoolArray) -> IntArray:
        return np.bincount(code[rows], minlength=len(names)).astype(np.int64)

    judged = labelled & (teacher >= 0)
    disagree = judged & (labels != teacher)
    supplied, n_judged, n_disagree = per_client(labelled), per_client(judged), per_client(disagree)
    suspect = (n_judged >= policy.min_judged) & (
        n_disagree > policy.max_teacher_disagreement * n_judged
    )
    keep = labelled & ~suspect[code]
    notes = [
        f"left out {supplied[i]} labels of client {names[i]!r}: {n_disagree[i] / n_judged[i]:.0%} "
        f"of its {n_judged[i]} labels with a teacher answer disagree with it "
        f"(limit {policy.max_teacher_disagreement:.0%})"
        for i in np.flatnonzero(suspect)
    ]
    thinned = _cap_shares(keep, code, policy.max_client_share)
    notes += [
        f"left out {dropped} labels of client {names[i]!r}: it supplied more than "
        f"{policy.max_client_share:.0%} of the labels"
        for i, dropped in thinned.items()
    ]
    n = int(labelled.sum())
    report = {
        "labels": n,
        "used": int(keep.sum()),
        "clients": int((supplied > 0).sum()),
        "largest_client_share": int(supplied.max()) / n if n else None,
        "classes": np.bincount(labels[labelled], minlength=num_classes).tolist(),
        "teacher_disagreement": int(disagree.sum()) / int(judged.sum()) if judged.any() else None,
        "left_out": {
            "teacher_disagreement": int(supplied[suspect].sum()),
            "client_share": sum(thinned.values()),
        },
        "notes": notes,
    }
    return LabelCheck(keep, report)


def _cap_shares(keep: BoolArray, code: IntArray, share: float) -> dict[int, int]:
    """Thin `keep` in place so no client holds more than `share` of it; {client: dropped}."""
    if share >= 1.0 or not keep.any():
        return {}
    sizes = np.bincount(code[keep])
    low, high = 0, int(sizes.max())  # the cap: the largest c with c ≤ share · Σ min(n_i, c)
    while low < high:
        c = (low + high + 1) // 2
        if c <= share * int(np.minimum(sizes, c).sum()) + 1e-9:
            low = c
        else:
            high = c - 1
    thinned = {}
    for client in np.flatnonzero(sizes > low):
        rows = np.flatnonzero(keep & (code == client))
        keep[rows] = False
        keep[rows[np.arange(low) * len(rows) // max(low, 1)]] = True
        thinned[int(client)] = len(rows) - low
    return thinned
