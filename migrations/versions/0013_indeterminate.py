"""Operating points and abstention: why an image or a study is ``indeterminate``.

``predictions.reason`` and ``study_results.reason`` (nullable text) say why the label or verdict is
``indeterminate``: no class reached its operating point (the card's ``thresholds``, with the
probabilities), or the image-content gate found the image borderline (its score and band). NULL for every
other label, and for rows written before this revision. ``indeterminate`` itself is a value of the existing
``label`` and ``verdict`` columns; the reporting views of revision 0012 count it like any verdict.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # SQLite: the reporting views read both tables; migrations/env.py sets legacy_alter_table so that a
    # batch rebuild keeps them.
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("reason", sa.Text(), nullable=True))
    with op.batch_alter_table("study_results") as batch:
        batch.add_column(sa.Column("reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("study_results") as batch:
        batch.drop_column("reason")
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("reason")
