"""Alembic revisions for the screener database (installed as ``screener._migrations``)."""
