"""Reporting views: report_daily_volume, report_daily_verdicts, report_positives, report_turnaround,
report_performance, report_delivery_failures.

Every view has a ``day`` column: the UTC date of its natural timestamp (arrival for volume, result for
verdicts, positives and turnaround, prediction for performance, delivery creation for failures), so that
``screener report --since/--until`` and an analyst's ``WHERE day >= ...`` filter the same way. Only two
expressions differ between SQLite and PostgreSQL (a UTC date, and seconds between two timestamps); the rest
of the SQL is shared. No view exposes a patient name, ID, birth date or accession number: the database holds
none of them, and the views show Study and SOP Instance UIDs only.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

VIEW_NAMES = (
    "report_daily_volume",
    "report_daily_verdicts",
    "report_positives",
    "report_turnaround",
    "report_performance",
    "report_delivery_failures",
)


def _day(column: str, dialect: str) -> str:
    """The UTC calendar date of a timestamp column (SQLite stores UTC text; PostgreSQL timestamptz)."""
    if dialect == "postgresql":
        return f"CAST(({column} AT TIME ZONE 'UTC') AS DATE)"
    return f"date({column})"


def _seconds(later: str, earlier: str, dialect: str) -> str:
    """Seconds from ``earlier`` to ``later`` as a floating-point number; NULL when either is NULL."""
    if dialect == "postgresql":
        return f"CAST(EXTRACT(EPOCH FROM ({later} - {earlier})) AS DOUBLE PRECISION)"
    return f"((julianday({later}) - julianday({earlier})) * 86400.0)"


# Delivery summary per study result: 'none' without a destination, 'dead' if any is dead, 'failed' if any
# failed (and none dead), 'pending' if any is still pending, 'sent' when every delivery is sent.
_DELIVERY_SUMMARY = """
    SELECT d.study_result_id AS study_result_id,
           COUNT(*) AS deliveries,
           SUM(CASE WHEN d.status = 'sent' THEN 1 ELSE 0 END) AS sent,
           SUM(CASE WHEN d.status = 'pending' THEN 1 ELSE 0 END) AS pending,
           SUM(CASE WHEN d.status = 'failed' THEN 1 ELSE 0 END) AS failed,
           SUM(CASE WHEN d.status = 'dead' THEN 1 ELSE 0 END) AS dead,
           SUM(CASE WHEN d.object_kind = 'sr' THEN 1 ELSE 0 END) AS sr_deliveries,
           SUM(CASE WHEN d.object_kind = 'sr' AND d.status <> 'sent' THEN 1 ELSE 0 END) AS sr_unsent,
           MAX(CASE WHEN d.object_kind = 'sr' THEN d.sent_at END) AS sr_last_sent_at
    FROM deliveries d
    GROUP BY d.study_result_id
"""

_DELIVERY_STATUS = """
    CASE
        WHEN ds.deliveries IS NULL THEN 'none'
        WHEN ds.dead > 0 THEN 'dead'
        WHEN ds.failed > 0 THEN 'failed'
        WHEN ds.pending > 0 THEN 'pending'
        ELSE 'sent'
    END
"""


def _views(dialect: str) -> dict[str, str]:
    """The SELECT of each view, for ``dialect`` ("sqlite" or "postgresql")."""
    return {
        "report_daily_volume": f"""
            SELECT {_day("i.received_at", dialect)} AS day,
                   COUNT(*) AS received,
                   SUM(CASE WHEN i.status = 'queued' THEN 1 ELSE 0 END) AS queued,
                   SUM(CASE WHEN i.status = 'processing' THEN 1 ELSE 0 END) AS processing,
                   SUM(CASE WHEN i.status = 'classified' THEN 1 ELSE 0 END) AS classified,
                   SUM(CASE WHEN i.status = 'skipped' THEN 1 ELSE 0 END) AS skipped,
                   SUM(CASE WHEN i.status = 'failed' THEN 1 ELSE 0 END) AS failed
            FROM instances i
            GROUP BY {_day("i.received_at", dialect)}
        """,
        "report_daily_verdicts": f"""
            SELECT {_day("r.created_at", dialect)} AS day,
                   COUNT(*) AS results,
                   COUNT(DISTINCT r.study_id) AS studies,
                   SUM(CASE WHEN r.verdict = 'normal' THEN 1 ELSE 0 END) AS normal,
                   SUM(CASE WHEN r.verdict = 'covid19' THEN 1 ELSE 0 END) AS covid19,
                   SUM(CASE WHEN r.verdict = 'viral_pneumonia' THEN 1 ELSE 0 END) AS viral_pneumonia,
                   SUM(CASE WHEN r.verdict = 'not_analysed' THEN 1 ELSE 0 END) AS not_analysed
            FROM study_results r
            GROUP BY {_day("r.created_at", dialect)}
        """,
        "report_positives": f"""
            SELECT {_day("r.created_at", dialect)} AS day,
                   s.study_instance_uid AS study_instance_uid,
                   r.verdict AS verdict,
                   r.revision AS revision,
                   r.p_normal AS p_normal,
                   r.p_covid19 AS p_covid19,
                   r.p_viral_pneumonia AS p_viral_pneumonia,
                   s.first_received_at AS arrived_at,
                   r.created_at AS result_at,
                   m.version AS model_version,
                   {_DELIVERY_STATUS} AS delivery_status
            FROM study_results r
            JOIN studies s ON s.id = r.study_id
            JOIN model_versions m ON m.id = r.model_version_id
            LEFT JOIN ({_DELIVERY_SUMMARY}) ds ON ds.study_result_id = r.id
            WHERE r.verdict IN ('covid19', 'viral_pneumonia')
              AND r.id = (SELECT MAX(r2.id) FROM study_results r2 WHERE r2.study_id = r.study_id)
        """,
        "report_turnaround": f"""
            SELECT {_day("r.created_at", dialect)} AS day,
                   r.id AS study_result_id,
                   s.study_instance_uid AS study_instance_uid,
                   r.revision AS revision,
                   r.verdict AS verdict,
                   m.version AS model_version,
                   s.first_received_at AS arrived_at,
                   r.created_at AS result_at,
                   CASE WHEN ds.sr_deliveries > 0 AND ds.sr_unsent = 0 THEN ds.sr_last_sent_at END
                       AS delivered_at,
                   {_seconds("r.created_at", "s.first_received_at", dialect)} AS seconds_to_result,
                   CASE WHEN ds.sr_deliveries > 0 AND ds.sr_unsent = 0
                        THEN {_seconds("ds.sr_last_sent_at", "s.first_received_at", dialect)}
                   END AS seconds_to_delivery,
                   {_DELIVERY_STATUS} AS delivery_status
            FROM study_results r
            JOIN studies s ON s.id = r.study_id
            JOIN model_versions m ON m.id = r.model_version_id
            LEFT JOIN ({_DELIVERY_SUMMARY}) ds ON ds.study_result_id = r.id
        """,
        # Labels by SOP Instance UID win over labels by Study Instance UID; among several labels for one
        # key the latest import wins (as trainer.data does). Accession-number labels need the DICOM headers
        # and are not joined here.
        "report_performance": f"""
            SELECT day, prediction_id, model_version, study_instance_uid, sop_instance_uid,
                   CASE WHEN sop_label IS NOT NULL THEN 'sop_instance_uid' ELSE 'study_instance_uid' END
                       AS label_source,
                   COALESCE(sop_label, study_label) AS true_label,
                   predicted_label, p_normal, p_covid19, p_viral_pneumonia, predicted_at
            FROM (
                SELECT {_day("p.created_at", dialect)} AS day,
                       p.id AS prediction_id,
                       m.version AS model_version,
                       s.study_instance_uid AS study_instance_uid,
                       i.sop_instance_uid AS sop_instance_uid,
                       (SELECT l.label FROM labels l
                         WHERE l.sop_instance_uid = i.sop_instance_uid
                         ORDER BY l.imported_at DESC, l.id DESC LIMIT 1) AS sop_label,
                       (SELECT l.label FROM labels l
                         WHERE l.study_instance_uid = s.study_instance_uid AND l.sop_instance_uid IS NULL
                         ORDER BY l.imported_at DESC, l.id DESC LIMIT 1) AS study_label,
                       p.label AS predicted_label,
                       p.p_normal AS p_normal,
                       p.p_covid19 AS p_covid19,
                       p.p_viral_pneumonia AS p_viral_pneumonia,
                       p.created_at AS predicted_at
                FROM predictions p
                JOIN instances i ON i.id = p.instance_id
                JOIN model_versions m ON m.id = p.model_version_id
                LEFT JOIN studies s ON s.id = i.study_id
            ) labelled
            WHERE COALESCE(sop_label, study_label) IS NOT NULL
        """,
        "report_delivery_failures": f"""
            SELECT {_day("d.created_at", dialect)} AS day,
                   d.id AS delivery_id,
                   s.study_instance_uid AS study_instance_uid,
                   r.revision AS revision,
                   d.destination AS destination,
                   d.object_kind AS object_kind,
                   d.status AS status,
                   d.attempts AS attempts,
                   d.last_error AS last_error,
                   d.created_at AS created_at,
                   d.next_attempt_at AS next_attempt_at
            FROM deliveries d
            JOIN study_results r ON r.id = d.study_result_id
            JOIN studies s ON s.id = r.study_id
            WHERE d.status IN ('failed', 'dead')
        """,
    }


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    for name, select in _views(dialect).items():
        op.execute(f"CREATE VIEW {name} AS {select}")


def downgrade() -> None:
    for name in reversed(VIEW_NAMES):
        op.execute(f"DROP VIEW IF EXISTS {name}")
