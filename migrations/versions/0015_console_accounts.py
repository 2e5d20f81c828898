"""Web console: local accounts (``console_users``), their sessions (``console_sessions``) and the reviews
radiologists record on a study (``study_reviews``).

A password is stored only as its argon2 hash; a session only as the sha256 of its cookie token, so a copy of
the database lets no one sign in. A review that names a class (agree, or disagree with the correct class)
also adds a ``labels`` row, exactly as ``trainer labels import`` would (``label_id`` points at it); "not
assessable" and the optional comment live here only, since ``labels`` holds classes.

Two indexes serve the console's dashboard windows (the last day, week or 30 days) with range scans:
``instances.received_at`` and ``study_results.created_at``.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "console_users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("failed_logins", sa.Integer(), nullable=False),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("password_changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_login_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_console_users")),
        sa.UniqueConstraint("name", name=op.f("uq_console_users_name")),
    )
    op.create_table(
        "console_sessions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        sa.Column("client", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["console_users.id"], name=op.f("fk_console_sessions_user_id_console_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_console_sessions")),
        sa.UniqueConstraint("token_sha256", name=op.f("uq_console_sessions_token_sha256")),
    )
    op.create_index(op.f("ix_console_sessions_user_id"), "console_sessions", ["user_id"])
    op.create_table(
        "study_reviews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("study_result_id", sa.Integer(), nullable=True),
        sa.Column("reviewer", sa.String(64), nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("label", sa.String(32), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("label_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], name=op.f("fk_study_reviews_study_id_studies")),
        sa.ForeignKeyConstraint(
            ["study_result_id"],
            ["study_results.id"],
            name=op.f("fk_study_reviews_study_result_id_study_results"),
        ),
        sa.ForeignKeyConstraint(["label_id"], ["labels.id"], name=op.f("fk_study_reviews_label_id_labels")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study_reviews")),
    )
    op.create_index(op.f("ix_study_reviews_study_id"), "study_reviews", ["study_id"])
    op.create_index("ix_instances_received_at", "instances", ["received_at"])
    op.create_index("ix_study_results_created_at", "study_results", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_study_results_created_at", table_name="study_results")
    op.drop_index("ix_instances_received_at", table_name="instances")
    op.drop_index(op.f("ix_study_reviews_study_id"), table_name="study_reviews")
    op.drop_table("study_reviews")
    op.drop_index(op.f("ix_console_sessions_user_id"), table_name="console_sessions")
    op.drop_table("console_sessions")
    op.drop_table("console_users")
