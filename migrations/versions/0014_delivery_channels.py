"""Delivery channels: one ``deliveries`` outbox for DICOM, HL7 v2, webhooks and email.

- ``channel`` (``dicom`` | ``hl7`` | ``webhook`` | ``email``): existing rows are ``dicom``.
- ``event``: the alert event a webhook or email delivery reports (``finding``, ``delivery_dead``, ...).
- ``idempotency_key``: unique; derived from (study, model version, revision) for result messages and from
  (event, subject, time window) for alerts, so a re-run after a crash or a repeated alert adds no row.
- ``payload``: the alert document (JSON) of a webhook or email delivery; DICOM and HL7 deliveries keep
  their message in the spool (``spool_name``), built once in the verdict's transaction.
- ``study_result_id``, ``sop_instance_uid`` and ``spool_name`` become optional: an alert such as
  ``disk_low`` reports no study, and only DICOM objects have a SOP Instance UID.

Downgrade deletes every delivery that is not ``dicom`` (the old schema cannot hold them).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # SQLite: the reporting views read `deliveries`; migrations/env.py sets legacy_alter_table so that a
    # batch rebuild of the table keeps them.
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("channel", sa.String(16), nullable=False, server_default="dicom"))
        batch.add_column(sa.Column("event", sa.String(32), nullable=True))
        batch.add_column(sa.Column("idempotency_key", sa.String(160), nullable=True))
        batch.add_column(sa.Column("payload", sa.Text(), nullable=True))
        batch.alter_column("study_result_id", existing_type=sa.Integer(), nullable=True)
        batch.alter_column("sop_instance_uid", existing_type=sa.String(64), nullable=True)
        batch.alter_column("spool_name", existing_type=sa.String(128), nullable=True)
        batch.create_unique_constraint(op.f("uq_deliveries_idempotency_key"), ["idempotency_key"])
        batch.create_index("ix_deliveries_event_created_at", ["event", "created_at"])


def downgrade() -> None:
    op.execute("DELETE FROM deliveries WHERE channel <> 'dicom'")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_index("ix_deliveries_event_created_at")
        batch.drop_constraint(op.f("uq_deliveries_idempotency_key"), type_="unique")
        batch.alter_column("spool_name", existing_type=sa.String(128), nullable=False)
        batch.alter_column("sop_instance_uid", existing_type=sa.String(64), nullable=False)
        batch.alter_column("study_result_id", existing_type=sa.Integer(), nullable=False)
        batch.drop_column("payload")
        batch.drop_column("idempotency_key")
        batch.drop_column("event")
        batch.drop_column("channel")
