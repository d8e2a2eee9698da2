"""Workspace identity and attempt ownership; checkpoint paths made relative to the workspace root.

``workspace`` holds one row: the id of the workspace that owns this ledger, so that a command can tell
its own ledger from a copied or foreign one. ``increments.attempt_run_id`` is the MLflow run an attempt
recorded before it wrote anything: clean-up of an interrupted attempt deletes only what that run made.
Checkpoints stored as absolute paths into ``<root>/.strata/`` become ``.strata/...``, resolved at use, and
so does a data version's record of the default DVC remote (``<root>/.strata/dvc-remote``). The workspace's
id is not made here: ``strata.tasks.workspace.identity`` gives it on first use, with the MLflow store's tags.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

STATE_MARK = "/.strata/"
DEFAULT_REMOTE = "/.strata/dvc-remote"


def upgrade() -> None:
    op.create_table(
        "workspace",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workspace")),
    )
    with op.batch_alter_table("increments") as batch:
        batch.add_column(sa.Column("attempt_run_id", sa.String(length=64), nullable=True))
    increments = sa.table("increments", sa.column("id", sa.Integer), sa.column("checkpoint_uri", sa.String))
    connection = op.get_bind()
    for row in connection.execute(sa.select(increments.c.id, increments.c.checkpoint_uri)).all():
        uri = row.checkpoint_uri or ""
        if uri.startswith("/") and STATE_MARK in uri:
            relative = ".strata/" + uri.rsplit(STATE_MARK, 1)[1]
            connection.execute(increments.update().where(increments.c.id == row.id).values(checkpoint_uri=relative))
    versions = sa.table("data_versions", sa.column("id", sa.Integer), sa.column("remote", sa.String))
    for row in connection.execute(sa.select(versions.c.id, versions.c.remote)).all():
        if (row.remote or "").startswith("/") and row.remote.endswith(DEFAULT_REMOTE):
            connection.execute(versions.update().where(versions.c.id == row.id).values(remote=DEFAULT_REMOTE[1:]))


def downgrade() -> None:
    with op.batch_alter_table("increments") as batch:
        batch.drop_column("attempt_run_id")
    op.drop_table("workspace")
