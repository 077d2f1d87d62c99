"""The label check before retraining: per-client teacher disagreement and share, by hand."""

from __future__ import annotations

import json

import numpy as np
import numpy.typing as npt

from service.jobs.label_check import LabelPolicy, check_labels
from service.settings import FeedbackSettings

K = 3


def rows(*groups: tuple[str | None, list[int], list[int]]) -> tuple[
    npt.NDArray[np.int64], list[str | None], npt.NDArray[np.int64]
]:  # fmt: skip
    """(client, labels, teacher answers) groups → the three row-aligned inputs."""
    labels: list[int] = []
    clients: list[str | None] = []
    teacher: list[int] = []
    for client, ys, ts in groups:
        assert len(ys) == len(ts)
        labels += ys
        teacher += ts
        clients += [client if y >= 0 else None for y in ys]
    return np.array(labels, dtype=np.int64), clients, np.array(teacher, dtype=np.int64)


def test_no_labels_is_an_empty_report() -> None:
    labels, clients, teacher = rows((None, [-1, -1], [0, 1]))
    check = check_labels(labels, clients, teacher, num_classes=K, policy=LabelPolicy())
    assert not check.keep.any()
    assert check.report["labels"] == 0 and check.report["clients"] == 0
    assert check.report["largest_client_share"] is None
    assert check.report["teacher_disagreement"] is None


def test_honest_labels_are_all_kept_and_described() -> None:
    labels, clients, teacher = rows(
        ("a", [0, 1, 2, -1], [0, 1, 1, 2]),  # 1 of 3 disagrees
        ("b", [2, 2], [2, -1]),  # no teacher answer on the second
    )
    check = check_labels(labels, clients, teacher, num_classes=K, policy=LabelPolicy())
    assert check.keep.tolist() == [True, True, True, False, True, True]
    report = check.report
    assert report["labels"] == 5 and report["used"] == 5 and report["clients"] == 2
    assert report["largest_client_share"] == 3 / 5
    assert report["classes"] == [1, 1, 3]
    assert report["teacher_disagreement"] == 1 / 4
    assert report["left_out"] == {"teacher_disagreement": 0, "client_share": 0}
    assert report["notes"] == []
    json.dumps(report)  # goes into the job's result


def test_a_client_that_mostly_disagrees_with_the_teacher_is_left_out() -> None:
    policy = LabelPolicy(max_teacher_disagreement=0.5, min_judged=4)
    labels, clients, teacher = rows(
        ("bad", [1, 2, 0, 0, 1], [0, 0, 1, 0, -1]),  # 3 of 4 judged disagree: 75%
        ("ok", [0, 1, 2, 0], [0, 1, 2, 1]),  # 1 of 4: 25%
        ("edge", [0, 1, 2, 0], [0, 1, 0, 1]),  # 2 of 4: 50%, not more than the limit
        ("few", [1, 1, 1], [0, 0, 0]),  # 3 of 3, but fewer than 4 judged
    )
    check = check_labels(labels, clients, teacher, num_classes=K, policy=policy)
    assert check.keep.tolist() == [False] * 5 + [True] * 11
    assert check.report["left_out"] == {"teacher_disagreement": 5, "client_share": 0}
    assert check.report["used"] == 11
    (note,) = check.report["notes"]
    assert "5 labels of client 'bad'" in note and "75%" in note and "4 labels" in note


def test_a_client_past_its_share_is_thinned_evenly() -> None:
    # A 80, B 10, C 10 at a 50% cap: the largest c with c ≤ 0.5 (c + 10 + 10) is 20.
    labels, clients, teacher = rows(
        ("A", [0] * 80, [-1] * 80), ("B", [1] * 10, [-1] * 10), ("C", [2] * 10, [-1] * 10)
    )
    policy = LabelPolicy(max_client_share=0.5)
    check = check_labels(labels, clients, teacher, num_classes=K, policy=policy)
    assert np.flatnonzero(check.keep[:80]).tolist() == list(range(0, 80, 4))
    assert check.keep[80:].all()
    assert check.report["used"] == 40
    assert check.report["left_out"] == {"teacher_disagreement": 0, "client_share": 60}
    assert check.report["largest_client_share"] == 0.8  # as supplied, before the check


def test_the_share_cap_can_bind_several_clients() -> None:
    # 40, 40, 10, 10 at 30%: c ≤ 0.3 (2c + 20) → c ≤ 15, so both big ones keep 15 of 40.
    labels, clients, teacher = rows(
        ("A", [0] * 40, [-1] * 40),
        ("B", [1] * 40, [-1] * 40),
        ("C", [2] * 10, [-1] * 10),
        ("D", [2] * 10, [-1] * 10),
    )
    policy = LabelPolicy(max_client_share=0.3)
    check = check_labels(labels, clients, teacher, num_classes=K, policy=policy)
    assert int(check.keep[:40].sum()) == int(check.keep[40:80].sum()) == 15
    assert check.report["used"] == 50 and check.report["left_out"]["client_share"] == 50
    assert len(check.report["notes"]) == 2


def test_with_a_single_client_a_share_cap_leaves_every_label_out() -> None:
    labels, clients, teacher = rows(("only", [0, 1, 2], [0, 1, 2]))
    capped = check_labels(
        labels, clients, teacher, num_classes=K, policy=LabelPolicy(max_client_share=0.9)
    )
    assert not capped.keep.any() and capped.report["left_out"]["client_share"] == 3
    off = check_labels(labels, clients, teacher, num_classes=K, policy=LabelPolicy())
    assert off.keep.all()


def test_disagreement_is_judged_first_and_shares_on_what_is_left() -> None:
    policy = LabelPolicy(max_client_share=0.5, max_teacher_disagreement=0.5, min_judged=2)
    labels, clients, teacher = rows(
        ("liar", [1] * 6, [0] * 6),  # all disagree: left out
        ("a", [0] * 3, [0] * 3),
        ("b", [0] * 3, [0] * 3),
    )
    check = check_labels(labels, clients, teacher, num_classes=K, policy=policy)
    assert check.keep.tolist() == [False] * 6 + [True] * 6  # a and b hold 50% each
    assert check.report["left_out"] == {"teacher_disagreement": 6, "client_share": 0}


def test_the_policy_comes_from_the_feedback_settings() -> None:
    settings = FeedbackSettings(
        max_client_share=0.4, max_teacher_disagreement=0.7, disagreement_min_labels=9
    )
    assert LabelPolicy.from_settings(settings) == LabelPolicy(0.4, 0.7, 9)
    assert LabelPolicy.from_settings(FeedbackSettings()) == LabelPolicy(1.0, 0.8, 50)
