"""Training: confirmed labels and training runs.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "labels",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=True),
        sa.Column("accession_number", sa.String(64), nullable=True),
        sa.Column("label", sa.String(32), nullable=False),
        sa.Column("confirmed_by", sa.String(128), nullable=True),
        sa.Column("confirmed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("source_file", sa.Text(), nullable=True),
        sa.Column("imported_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_labels")),
    )
    for column in ("sop_instance_uid", "study_instance_uid", "accession_number"):
        op.create_index(op.f(f"ix_labels_{column}"), "labels", [column])
    op.create_table(
        "training_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("labels_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("model_version", sa.String(64), nullable=True),
        sa.Column("summary", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_runs")),
    )


def downgrade() -> None:
    op.drop_table("training_runs")
    for column in ("sop_instance_uid", "study_instance_uid", "accession_number"):
        op.drop_index(op.f(f"ix_labels_{column}"), table_name="labels")
    op.drop_table("labels")
