"""Rolling-upgrade probe: the schema's next version, as the release after this one would ship it.

Not part of the daemon's migrations. ``tests/hardening/test_rolling_upgrade.py`` builds a second release
("v2": this checkout's daemon with this file added as its newest migration, ``down_revision`` set to the
current head) and applies it with v2's ``screener db upgrade`` while this release's listeners and worker
serve, then restarts them one by one on v2.

It changes what such a release typically changes on the hottest table, additively (the "expand" step),
so the running release goes on working against it:

- ``instances.priority`` SMALLINT NOT NULL DEFAULT 0 (a worklist priority): the running release's inserts
  do not name it and get the server default;
- a backfill touching every row (instances still waiting get priority 1): row locks that the worker's
  claims and updates meet while it runs;
- an index on (status, priority, received_at), built while listeners insert.

Revision ID: rolling_upgrade_v2
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "rolling_upgrade_v2"
down_revision: str | None = None  # DOWN_REVISION: the test writes the current head here
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("priority", sa.SmallInteger(), nullable=False, server_default="0"))
    op.execute("UPDATE instances SET priority = CASE WHEN status = 'queued' THEN 1 ELSE 0 END")
    op.create_index(
        "ix_instances_status_priority_received", "instances", ["status", "priority", "received_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_instances_status_priority_received", table_name="instances")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("priority")
