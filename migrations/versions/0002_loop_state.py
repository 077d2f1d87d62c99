"""Loop state: serving state, rollout pairs, job runner fields, record temperature.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 05:48:20.320418
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "serving_state",
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("student_version", sa.String(length=64), nullable=False),
        sa.Column("temperature", sa.Float(), nullable=False),
        sa.Column("fallback_threshold", sa.Float(), nullable=False),
        sa.Column("shadow_rate", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("updated_by", sa.String(length=64), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("model", name=op.f("pk_serving_state")),
    )
    op.create_table(
        "rollout_outputs",
        sa.Column(
            "rollout_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("arm", sa.String(length=16), nullable=False),
        sa.Column("incumbent_label", sa.SmallInteger(), nullable=False),
        sa.Column("incumbent_confidence", sa.Float(), nullable=False),
        sa.Column("candidate_label", sa.SmallInteger(), nullable=False),
        sa.Column("candidate_confidence", sa.Float(), nullable=False),
        sa.Column("incumbent_seconds", sa.Float(), nullable=False),
        sa.Column("candidate_seconds", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name=op.f("fk_rollout_outputs_rollout_id_rollouts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("rollout_id", "request_id", name=op.f("pk_rollout_outputs")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("runner", sa.String(length=16), nullable=True))
        batch_op.add_column(
            sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("heartbeat_at", sa.Float(), nullable=True))
        batch_op.add_column(
            sa.Column("applied", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.create_index(
            "uq_jobs_open_rule",
            ["model", "rule"],
            unique=True,
            sqlite_where=sa.text("status IN ('pending', 'running')"),
            postgresql_where=sa.text("status IN ('pending', 'running')"),
        )

    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("student_temperature", sa.Float(), nullable=True))

    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("job_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True)
        )
        batch_op.add_column(sa.Column("decided_at", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("config", sa.JSON(), nullable=False, server_default="{}"))
        batch_op.create_foreign_key(
            batch_op.f("fk_rollouts_job_id_jobs"), "jobs", ["job_id"], ["id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_rollouts_job_id_jobs"), type_="foreignkey")
        batch_op.drop_column("config")
        batch_op.drop_column("decided_at")
        batch_op.drop_column("job_id")

    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.drop_column("student_temperature")

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_jobs_open_rule",
            sqlite_where=sa.text("status IN ('pending', 'running')"),
            postgresql_where=sa.text("status IN ('pending', 'running')"),
        )
        batch_op.drop_column("applied")
        batch_op.drop_column("heartbeat_at")
        batch_op.drop_column("cancel_requested")
        batch_op.drop_column("runner")

    op.drop_table("rollout_outputs")
    op.drop_table("serving_state")
