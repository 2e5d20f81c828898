"""Classes come from the model card: probabilities as a JSON map per class, and whether a verdict flags.

``predictions.probs`` and ``study_results.probs`` (``{class: probability}`` over the classes of the model
that made the row, in its card's output order) replace the ``p_normal``, ``p_covid19`` and
``p_viral_pneumonia`` columns, which named the paper's three classes. ``study_results.flagged`` records
whether the verdict is a finding of that model's card (a positive to review); ``report_positives`` lists the
flagged latest results instead of naming two classes.

The data migrates both ways. Upgrade: each row's three columns become its map (a study result without
probabilities keeps NULL); ``flagged`` is true for the verdicts ``covid19`` and ``viral_pneumonia``, the
findings of every card before this revision. Downgrade: the map's ``normal``, ``covid19`` and
``viral_pneumonia`` entries go back to their columns (0 for a class the model did not have; classes other
than those three are dropped, as the old schema cannot hold them), and ``flagged`` is dropped.

The reporting views read these columns, so all of them are dropped first and created again afterwards:
``report_daily_verdicts`` becomes one row per (day, verdict) so that any class, ``indeterminate`` and
``not_analysed`` count alike; ``report_positives`` and ``report_performance`` carry ``probs`` (the map, as
JSON) instead of the three columns. The other views are those of revision 0006, unchanged.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

PAPER_CLASSES = ("normal", "covid19", "viral_pneumonia")
PAPER_FINDINGS = ("covid19", "viral_pneumonia")
CHANGED_VIEWS = ("report_daily_verdicts", "report_positives", "report_performance")


def _revision_0006() -> ModuleType:
    """The reporting-views revision, for its view names, its SQL helpers and the views it creates."""
    path = Path(__file__).with_name("0006_reporting_views.py")
    spec = importlib.util.spec_from_file_location("_cxrs_revision_0006", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _views(dialect: str) -> dict[str, str]:
    """The views after this revision: 0006's, with the three that read class columns rewritten."""
    base = _revision_0006()
    day = base._day
    views: dict[str, str] = dict(base._views(dialect))
    views["report_daily_verdicts"] = f"""
        SELECT {day("r.created_at", dialect)} AS day,
               r.verdict AS verdict,
               COUNT(*) AS results,
               COUNT(DISTINCT r.study_id) AS studies
        FROM study_results r
        GROUP BY {day("r.created_at", dialect)}, r.verdict
    """
    views["report_positives"] = f"""
        SELECT {day("r.created_at", dialect)} AS day,
               s.study_instance_uid AS study_instance_uid,
               r.verdict AS verdict,
               r.revision AS revision,
               r.probs AS probs,
               s.first_received_at AS arrived_at,
               r.created_at AS result_at,
               m.version AS model_version,
               {base._DELIVERY_STATUS} AS delivery_status
        FROM study_results r
        JOIN studies s ON s.id = r.study_id
        JOIN model_versions m ON m.id = r.model_version_id
        LEFT JOIN ({base._DELIVERY_SUMMARY}) ds ON ds.study_result_id = r.id
        WHERE r.flagged
          AND r.id = (SELECT MAX(r2.id) FROM study_results r2 WHERE r2.study_id = r.study_id)
    """
    views["report_performance"] = f"""
        SELECT day, prediction_id, model_version, study_instance_uid, sop_instance_uid,
               CASE WHEN sop_label IS NOT NULL THEN 'sop_instance_uid' ELSE 'study_instance_uid' END
                   AS label_source,
               COALESCE(sop_label, study_label) AS true_label,
               predicted_label, probs, predicted_at
        FROM (
            SELECT {day("p.created_at", dialect)} AS day,
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
                   p.probs AS probs,
                   p.created_at AS predicted_at
            FROM predictions p
            JOIN instances i ON i.id = p.instance_id
            JOIN model_versions m ON m.id = p.model_version_id
            LEFT JOIN studies s ON s.id = i.study_id
        ) labelled
        WHERE COALESCE(sop_label, study_label) IS NOT NULL
    """
    return views


def _drop_views() -> None:
    for name in reversed(_revision_0006().VIEW_NAMES):
        op.execute(f"DROP VIEW IF EXISTS {name}")


def _json_map(dialect: str, prefix: str) -> str:
    """SQL building ``{class: column}`` from the three ``p_*`` columns."""
    function = "json_build_object" if dialect == "postgresql" else "json_object"
    pairs = ", ".join(f"'{c}', {prefix}p_{c}" for c in PAPER_CLASSES)
    return f"{function}({pairs})"


def _json_entry(dialect: str, cls: str) -> str:
    """SQL reading one class's probability from the ``probs`` map (NULL when absent)."""
    if dialect == "postgresql":
        return f"CAST(probs ->> '{cls}' AS DOUBLE PRECISION)"
    return f"CAST(json_extract(probs, '$.{cls}') AS REAL)"


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    _drop_views()
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("probs", sa.JSON(), nullable=True))
    with op.batch_alter_table("study_results") as batch:
        batch.add_column(sa.Column("probs", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("flagged", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.execute(f"UPDATE predictions SET probs = {_json_map(dialect, '')}")
    op.execute(f"UPDATE study_results SET probs = {_json_map(dialect, '')} WHERE p_normal IS NOT NULL")
    findings = ", ".join(f"'{c}'" for c in PAPER_FINDINGS)
    op.execute(
        sa.text(f"UPDATE study_results SET flagged = :yes WHERE verdict IN ({findings})").bindparams(
            sa.bindparam("yes", True, type_=sa.Boolean())
        )
    )
    with op.batch_alter_table("predictions") as batch:
        batch.alter_column("probs", existing_type=sa.JSON(), nullable=False)
        for cls in PAPER_CLASSES:
            batch.drop_column(f"p_{cls}")
    with op.batch_alter_table("study_results") as batch:
        for cls in PAPER_CLASSES:
            batch.drop_column(f"p_{cls}")
    for name, select in _views(dialect).items():
        op.execute(f"CREATE VIEW {name} AS {select}")


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    _drop_views()
    with op.batch_alter_table("predictions") as batch:
        for cls in PAPER_CLASSES:
            batch.add_column(sa.Column(f"p_{cls}", sa.Float(), nullable=True))
    with op.batch_alter_table("study_results") as batch:
        for cls in PAPER_CLASSES:
            batch.add_column(sa.Column(f"p_{cls}", sa.Float(), nullable=True))
    # Class names are the fixed PAPER_CLASSES, never input.
    sets = ", ".join(f"p_{c} = COALESCE({_json_entry(dialect, c)}, 0.0)" for c in PAPER_CLASSES)
    op.execute(f"UPDATE predictions SET {sets}")
    op.execute(f"UPDATE study_results SET {sets} WHERE probs IS NOT NULL")
    with op.batch_alter_table("predictions") as batch:
        for cls in PAPER_CLASSES:
            batch.alter_column(f"p_{cls}", existing_type=sa.Float(), nullable=False)
        batch.drop_column("probs")
    with op.batch_alter_table("study_results") as batch:
        batch.drop_column("flagged")
        batch.drop_column("probs")
    _revision_0006().upgrade()
