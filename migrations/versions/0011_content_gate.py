"""Image-content gate: ``instances.novelty``, the gate's score of the image (nullable).

The worker records it for every image the model ran on when the model's card has a gate (the graph's
``novelty`` output): classified images, and images the gate refused, which are ``skipped`` with the score
and the threshold in ``status_reason``. Null for rows finished before this revision, for images that never
reached the model, and for models without a gate.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-20
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # SQLite: the reporting views read `instances`; migrations/env.py sets legacy_alter_table so that a
    # batch rebuild of the table keeps them.
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("novelty", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("novelty")
