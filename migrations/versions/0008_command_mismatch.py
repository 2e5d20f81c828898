"""Command/data set mismatch: the command's SOP Instance and Class UIDs on instance_clashes.

A C-STORE whose command names another SOP instance or class than its data set is refused, or (with
``listener.on_mismatch = "keep"``) kept under the data set's own UID with a clash row that records what the
command said. ``action`` gains the value ``mismatch_kept`` (a non-native enum: no schema change).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-14
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instance_clashes") as batch:
        batch.add_column(sa.Column("command_sop_instance_uid", sa.String(64), nullable=True))
        batch.add_column(sa.Column("command_sop_class_uid", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instance_clashes") as batch:
        batch.drop_column("command_sop_class_uid")
        batch.drop_column("command_sop_instance_uid")
