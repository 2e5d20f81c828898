"""Site monitoring: what the worker saw of each instance, for the drift and site-performance reports.

``instances`` gains the header facts and the decoded image's mean intensity recorded at classification
time (``manufacturer``, ``image_rows``, ``image_columns``, ``mean_intensity``), and the model version that
was serving when the worker finished the instance (``model_version_id``: classified, skipped or failed), so
that a report can tell which model left a labelled instance unanalysed. All nullable: rows finished before
this revision, and instances whose header could not be read, have none.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-15
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # SQLite: the reporting views read `instances`; migrations/env.py sets legacy_alter_table so that a
    # batch rebuild of the table keeps them.
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("manufacturer", sa.String(64), nullable=True))
        batch.add_column(sa.Column("image_rows", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("image_columns", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("mean_intensity", sa.Float(), nullable=True))
        batch.add_column(sa.Column("model_version_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_instances_model_version_id_model_versions"),
            "model_versions",
            ["model_version_id"],
            ["id"],
        )


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_constraint(op.f("fk_instances_model_version_id_model_versions"), type_="foreignkey")
        batch.drop_column("model_version_id")
        batch.drop_column("mean_intensity")
        batch.drop_column("image_columns")
        batch.drop_column("image_rows")
        batch.drop_column("manufacturer")
