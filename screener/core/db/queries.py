"""SQL text the ORM cannot say well, kept beside the models (no SQL text outside core/db and the reporting
views): the console dashboard's turnaround percentiles, computed inside PostgreSQL."""

from __future__ import annotations

from sqlalchemy import text

PG_TURNAROUND = text(
    """
    WITH r AS (
        SELECT EXTRACT(EPOCH FROM (sr.created_at - s.first_received_at)) AS to_result,
               CASE WHEN d.n > 0 AND d.unsent = 0
                    THEN EXTRACT(EPOCH FROM (d.last_sent - s.first_received_at)) END AS to_delivery
        FROM study_results sr
        JOIN studies s ON s.id = sr.study_id
        LEFT JOIN LATERAL (
            SELECT COUNT(*) AS n, SUM(CASE WHEN status = 'sent' THEN 0 ELSE 1 END) AS unsent,
                   MAX(sent_at) AS last_sent
            FROM deliveries WHERE study_result_id = sr.id AND object_kind = 'sr'
        ) d ON TRUE
        WHERE sr.created_at >= :since
    )
    SELECT COUNT(*) AS total,
           COUNT(to_result) AS n_result,
           percentile_cont(CAST(:qs AS double precision[])) WITHIN GROUP (ORDER BY to_result) AS p_result,
           COUNT(to_delivery) AS n_delivery,
           percentile_cont(CAST(:qs AS double precision[])) WITHIN GROUP (ORDER BY to_delivery) AS p_delivery
    FROM r
    """
)
