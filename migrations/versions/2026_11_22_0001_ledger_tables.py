"""Ledger tables: learners, data versions, increments, classes, leases.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "learners",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("method", sa.String(length=64), nullable=True),
        sa.Column("method_config", sa.JSON(), nullable=False),
        sa.Column("backbone", sa.String(length=256), nullable=True),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_learners")),
        sa.UniqueConstraint("name", name=op.f("uq_learners_name")),
    )
    op.create_table(
        "classes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("learner_id", sa.Integer(), nullable=False),
        sa.Column("class_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("first_task", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["learner_id"], ["learners.id"], name=op.f("fk_classes_learner_id_learners")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_classes")),
        sa.UniqueConstraint("learner_id", "class_id", name="uq_classes_learner_class_id"),
        sa.UniqueConstraint("learner_id", "name", name="uq_classes_learner_name"),
    )
    op.create_table(
        "data_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("learner_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(length=512), nullable=False),
        sa.Column("classes", sa.JSON(), nullable=False),
        sa.Column("split", sa.JSON(), nullable=False),
        sa.Column("md5", sa.String(length=64), nullable=False),
        sa.Column("hash_name", sa.String(length=32), nullable=False),
        sa.Column("git_rev", sa.String(length=64), nullable=False),
        sa.Column("remote", sa.String(length=1024), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["learner_id"], ["learners.id"], name=op.f("fk_data_versions_learner_id_learners")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_data_versions")),
        sa.UniqueConstraint("batch_id", name=op.f("uq_data_versions_batch_id")),
    )
    with op.batch_alter_table("data_versions") as batch_op:
        batch_op.create_index(batch_op.f("ix_data_versions_learner_id"), ["learner_id"], unique=False)
    op.create_table(
        "leases",
        sa.Column("learner_id", sa.Integer(), nullable=False),
        sa.Column("holder", sa.String(length=256), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["learner_id"], ["learners.id"], name=op.f("fk_leases_learner_id_learners")),
        sa.PrimaryKeyConstraint("learner_id", name=op.f("pk_leases")),
    )
    op.create_table(
        "increments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("learner_id", sa.Integer(), nullable=False),
        sa.Column("task_index", sa.Integer(), nullable=False),
        sa.Column("data_version_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("checkpoint_uri", sa.String(length=1024), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("mlflow_run_id", sa.String(length=64), nullable=True),
        sa.Column("model_version", sa.String(length=64), nullable=True),
        sa.Column("started", sa.DateTime(), nullable=False),
        sa.Column("finished", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["data_version_id"], ["data_versions.id"], name=op.f("fk_increments_data_version_id_data_versions")
        ),
        sa.ForeignKeyConstraint(["learner_id"], ["learners.id"], name=op.f("fk_increments_learner_id_learners")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_increments")),
        sa.UniqueConstraint("learner_id", "task_index", name="uq_increments_learner_task"),
    )


def downgrade() -> None:
    op.drop_table("increments")
    op.drop_table("leases")
    with op.batch_alter_table("data_versions") as batch_op:
        batch_op.drop_index(batch_op.f("ix_data_versions_learner_id"))
    op.drop_table("data_versions")
    op.drop_table("classes")
    op.drop_table("learners")
