"""Ingest: studies, instances (status state machine), instance_clashes.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
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
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("first_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
        sa.UniqueConstraint("study_instance_uid", name=op.f("uq_studies_study_instance_uid")),
    )
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=True),
        sa.Column("series_instance_uid", sa.String(64), nullable=True),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("calling_ae_title", sa.String(16), nullable=False),
        sa.Column("spool_name", sa.String(128), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "queued",
                "processing",
                "classified",
                "skipped",
                "failed",
                name="instancestatus",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name=op.f("fk_instances_study_id_studies")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_instances_sop_instance_uid")),
    )
    op.create_index(op.f("ix_instances_study_id"), "instances", ["study_id"])
    op.create_index("ix_instances_status_received_at", "instances", ["status", "received_at"])
    op.create_table(
        "instance_clashes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("kept_sha256", sa.String(64), nullable=False),
        sa.Column("received_sha256", sa.String(64), nullable=False),
        sa.Column("received_size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("calling_ae_title", sa.String(16), nullable=False),
        sa.Column(
            "action",
            sa.Enum("kept_first", "refused", name="clashaction", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("spool_name", sa.String(128), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instance_clashes")),
    )
    op.create_index(op.f("ix_instance_clashes_sop_instance_uid"), "instance_clashes", ["sop_instance_uid"])


def downgrade() -> None:
    op.drop_index(op.f("ix_instance_clashes_sop_instance_uid"), table_name="instance_clashes")
    op.drop_table("instance_clashes")
    op.drop_index("ix_instances_status_received_at", table_name="instances")
    op.drop_index(op.f("ix_instances_study_id"), table_name="instances")
    op.drop_table("instances")
    op.drop_table("studies")
