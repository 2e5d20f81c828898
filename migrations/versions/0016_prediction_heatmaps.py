"""Heatmaps: ``predictions.heatmap``, the class activation map of the prediction as an 8-bit PNG (nullable).

The worker stores it for every image it classifies with a model whose card has a ``heatmap`` section (the
graph's ``heatmap`` output, :mod:`screener.model.cam`): a grey PNG of a few kilobytes, 0-255 for 0-1, over
the letterboxed network input. The Secondary Capture of the study's verdict draws it over the image that
carries the verdict. Null for rows written before this revision and for models without the output.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # SQLite: the reporting views read `predictions`; migrations/env.py sets legacy_alter_table so that a
    # batch rebuild of the table keeps them.
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("heatmap", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("heatmap")
