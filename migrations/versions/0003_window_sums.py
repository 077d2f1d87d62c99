"""Window sums: per-bucket sums of the metrics' inputs, filled from the rows already stored.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05 08:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Rows stored before this revision are summed into buckets of this length: the default of
# recording.bucket_s. Windows that cover them should stay multiples of it.
BUCKET_S = 60


def upgrade() -> None:
    op.create_table(
        "prediction_sums",
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("bucket_start", sa.Float(), nullable=False),
        sa.Column("decile", sa.SmallInteger(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("teacher_n", sa.BigInteger(), nullable=False),
        sa.Column("sum_w", sa.Float(), nullable=False),
        sa.Column("sum_w2", sa.Float(), nullable=False),
        sa.Column("sum_w_flip", sa.Float(), nullable=False),
        sa.Column("sum_w_tv", sa.Float(), nullable=False),
        sa.Column("sum_w_kl", sa.Float(), nullable=False),
        sa.Column("served_n", sa.BigInteger(), nullable=False),
        sa.Column("served_sum_w", sa.Float(), nullable=False),
        sa.Column("served_sum_w2", sa.Float(), nullable=False),
        sa.Column("served_sum_w_flip", sa.Float(), nullable=False),
        sa.Column("shadow_n", sa.BigInteger(), nullable=False),
        sa.Column("shadow_sum_w", sa.Float(), nullable=False),
        sa.Column("shadow_sum_w2", sa.Float(), nullable=False),
        sa.Column("shadow_sum_w_delta", sa.Float(), nullable=False),
        sa.Column("shadow_sum_w_delta2", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("model", "bucket_start", "decile", name=op.f("pk_prediction_sums")),
    )
    op.create_table(
        "entropy_sums",
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("bucket_start", sa.Float(), nullable=False),
        sa.Column("entropy_fine", sa.SmallInteger(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "model", "bucket_start", "entropy_fine", name=op.f("pk_entropy_sums")
        ),
    )
    op.create_table(
        "label_sums",
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("bucket_start", sa.Float(), nullable=False),
        sa.Column("conf_bin", sa.SmallInteger(), nullable=False),
        sa.Column("conf_fine", sa.SmallInteger(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("sum_correct", sa.Float(), nullable=False),
        sa.Column("sum_conf", sa.Float(), nullable=False),
        sa.Column("sum_nll", sa.Float(), nullable=False),
        sa.Column("sum_brier", sa.Float(), nullable=False),
        sa.Column("paired_n", sa.BigInteger(), nullable=False),
        sa.Column("paired_sum_w", sa.Float(), nullable=False),
        sa.Column("paired_sum_w2", sa.Float(), nullable=False),
        sa.Column("both_w", sa.Float(), nullable=False),
        sa.Column("teacher_only_w", sa.Float(), nullable=False),
        sa.Column("student_only_w", sa.Float(), nullable=False),
        sa.Column("both_n", sa.BigInteger(), nullable=False),
        sa.Column("teacher_only_n", sa.BigInteger(), nullable=False),
        sa.Column("student_only_n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "model", "bucket_start", "conf_bin", "conf_fine", name=op.f("pk_label_sums")
        ),
    )
    _fill_from_stored_rows()


def downgrade() -> None:
    op.drop_table("label_sums")
    op.drop_table("entropy_sums")
    op.drop_table("prediction_sums")


def _fill_from_stored_rows() -> None:
    """The sums of every prediction and label already stored (the writer and feedback add
    the rest as they come)."""
    if op.get_bind().dialect.name == "postgresql":
        bucket = f"floor(p.created_at / {BUCKET_S}) * {BUCKET_S}"
    else:  # SQLite has no floor(); the times are positive, so truncation is the floor
        bucket = f"CAST(p.created_at / {BUCKET_S} AS INTEGER) * {BUCKET_S}"
    teacher = "p.teacher_label IS NOT NULL"
    w = "(1.0 / p.inclusion_probability)"
    flip = f"{teacher} AND p.student_label <> p.teacher_label"
    served = f"{teacher} AND NOT p.served_by_teacher"
    shadow = "p.teacher_outcome = 'shadow'"
    delta = "COALESCE(p.teacher_confidence - p.teacher_p_student, 0.0)"
    op.execute(
        f"""
        INSERT INTO prediction_sums (model, bucket_start, decile, n, teacher_n, sum_w, sum_w2,
            sum_w_flip, sum_w_tv, sum_w_kl, served_n, served_sum_w, served_sum_w2,
            served_sum_w_flip, shadow_n, shadow_sum_w, shadow_sum_w2, shadow_sum_w_delta,
            shadow_sum_w_delta2)
        SELECT p.model, {bucket}, p.conf_fine / 100, count(*),
            sum(CASE WHEN {teacher} THEN 1 ELSE 0 END),
            sum(CASE WHEN {teacher} THEN {w} ELSE 0.0 END),
            sum(CASE WHEN {teacher} THEN {w} * {w} ELSE 0.0 END),
            sum(CASE WHEN {flip} THEN {w} ELSE 0.0 END),
            sum(CASE WHEN {teacher} THEN {w} * COALESCE(p.total_variation, 0.0) ELSE 0.0 END),
            sum(CASE WHEN {teacher} THEN {w} * COALESCE(p.kl_teacher_student, 0.0) ELSE 0.0 END),
            sum(CASE WHEN {served} THEN 1 ELSE 0 END),
            sum(CASE WHEN {served} THEN {w} ELSE 0.0 END),
            sum(CASE WHEN {served} THEN {w} * {w} ELSE 0.0 END),
            sum(CASE WHEN {served} AND p.student_label <> p.teacher_label THEN {w} ELSE 0.0 END),
            sum(CASE WHEN {shadow} THEN 1 ELSE 0 END),
            sum(CASE WHEN {shadow} THEN {w} ELSE 0.0 END),
            sum(CASE WHEN {shadow} THEN {w} * {w} ELSE 0.0 END),
            sum(CASE WHEN {shadow} THEN {w} * {delta} ELSE 0.0 END),
            sum(CASE WHEN {shadow} THEN {w} * {delta} * {delta} ELSE 0.0 END)
        FROM predictions AS p
        GROUP BY p.model, {bucket}, p.conf_fine / 100
        """  # noqa: S608  # static text: no value comes from outside
    )
    op.execute(
        f"""
        INSERT INTO entropy_sums (model, bucket_start, entropy_fine, n)
        SELECT p.model, {bucket}, p.entropy_fine, count(*)
        FROM predictions AS p
        GROUP BY p.model, {bucket}, p.entropy_fine
        """  # noqa: S608  # as above
    )
    paired = "f.teacher_correct IS NOT NULL"
    s, t = "f.student_correct", "f.teacher_correct"
    op.execute(
        f"""
        INSERT INTO label_sums (model, bucket_start, conf_bin, conf_fine, n, sum_correct,
            sum_conf, sum_nll, sum_brier, paired_n, paired_sum_w, paired_sum_w2, both_w,
            teacher_only_w, student_only_w, both_n, teacher_only_n, student_only_n)
        SELECT p.model, {bucket}, p.conf_bin, p.conf_fine, count(*),
            sum(CASE WHEN {s} THEN 1.0 ELSE 0.0 END), sum(p.confidence), sum(f.nll),
            sum(f.brier),
            sum(CASE WHEN {paired} THEN 1 ELSE 0 END),
            sum(CASE WHEN {paired} THEN {w} ELSE 0.0 END),
            sum(CASE WHEN {paired} THEN {w} * {w} ELSE 0.0 END),
            sum(CASE WHEN {s} AND {t} THEN {w} ELSE 0.0 END),
            sum(CASE WHEN {t} AND NOT {s} THEN {w} ELSE 0.0 END),
            sum(CASE WHEN {s} AND NOT {t} THEN {w} ELSE 0.0 END),
            sum(CASE WHEN {s} AND {t} THEN 1 ELSE 0 END),
            sum(CASE WHEN {t} AND NOT {s} THEN 1 ELSE 0 END),
            sum(CASE WHEN {s} AND NOT {t} THEN 1 ELSE 0 END)
        FROM predictions AS p JOIN feedback AS f ON f.request_id = p.request_id
        GROUP BY p.model, {bucket}, p.conf_bin, p.conf_fine
        """  # noqa: S608  # as above
    )
