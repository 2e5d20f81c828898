"""Inference: model_versions, predictions (one per instance per model), study_results.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
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
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column(
            "status",
            sa.Enum("candidate", "active", "retired", name="modelstatus", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("architectures", sa.String(64), nullable=False),
        sa.Column("fusion_weight", sa.Float(), nullable=False),
        sa.Column("onnx_sha256", sa.String(64), nullable=False),
        sa.Column("card_json", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        sa.UniqueConstraint("version", name=op.f("uq_model_versions_version")),
    )
    op.create_table(
        "predictions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(32), nullable=False),
        sa.Column("p_normal", sa.Float(), nullable=False),
        sa.Column("p_covid19", sa.Float(), nullable=False),
        sa.Column("p_viral_pneumonia", sa.Float(), nullable=False),
        sa.Column("probs_a", sa.JSON(), nullable=False),
        sa.Column("probs_b", sa.JSON(), nullable=False),
        sa.Column("disagreement", sa.Float(), nullable=False),
        sa.Column("backend", sa.String(32), nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("preprocess_ms", sa.Float(), nullable=False),
        sa.Column("inference_ms", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["instances.id"], name=op.f("fk_predictions_instance_id_instances")
        ),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_predictions_model_version_id_model_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_predictions")),
        sa.UniqueConstraint("instance_id", "model_version_id", name=op.f("uq_predictions_instance_id")),
    )
    op.create_index(op.f("ix_predictions_instance_id"), "predictions", ["instance_id"])
    op.create_table(
        "study_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("verdict", sa.String(32), nullable=False),
        sa.Column("p_normal", sa.Float(), nullable=True),
        sa.Column("p_covid19", sa.Float(), nullable=True),
        sa.Column("p_viral_pneumonia", sa.Float(), nullable=True),
        sa.Column("instances_total", sa.Integer(), nullable=False),
        sa.Column("instances_classified", sa.Integer(), nullable=False),
        sa.Column("instances_skipped", sa.Integer(), nullable=False),
        sa.Column("instances_failed", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name=op.f("fk_study_results_study_id_studies")),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_versions.id"],
            name=op.f("fk_study_results_model_version_id_model_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study_results")),
        sa.UniqueConstraint(
            "study_id", "model_version_id", "revision", name=op.f("uq_study_results_study_id")
        ),
    )
    op.create_index(op.f("ix_study_results_study_id"), "study_results", ["study_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_study_results_study_id"), table_name="study_results")
    op.drop_table("study_results")
    op.drop_index(op.f("ix_predictions_instance_id"), table_name="predictions")
    op.drop_table("predictions")
    op.drop_table("model_versions")
