"""PostgreSQL compresses instance headers with lz4, where it was built with it.

pglz took ~65 us of the ~205 us PostgreSQL spent inserting one instance row with a 6 KB
header (pg_stat_statements, 1000 small instances over one association: 205 -> 141 us
with lz4), and it decompresses slower for C-FIND return keys; lz4 compresses that
header to 2.8 KB against pglz's 2.6 KB. Values written from now on use it; those
already stored keep pglz, which PostgreSQL reads as before. SQLite compresses nothing.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Set lz4 on instances.header (PostgreSQL 14+ built with lz4; elsewhere nothing)."""
    if op.get_bind().dialect.name != "postgresql":
        return
    # The ALTER locks the table for a moment, but waits behind any long reader, and
    # everything else would queue behind it: better to fail and be run again.
    op.execute("SET LOCAL lock_timeout = '10s'")
    # Before 14 there is no SET COMPRESSION; a server without lz4 refuses with
    # feature_not_supported. Either way pglz stays, as before.
    op.execute(
        "DO $$ BEGIN"
        " IF current_setting('server_version_num')::int >= 140000 THEN"
        " ALTER TABLE instances ALTER COLUMN header SET COMPRESSION lz4;"
        " END IF;"
        " EXCEPTION WHEN feature_not_supported THEN"
        " RAISE NOTICE 'no lz4 in this PostgreSQL: instance headers stay pglz';"
        " END $$"
    )
    op.execute("SET LOCAL lock_timeout = DEFAULT")


def downgrade() -> None:
    """Back to the server's default compression (PostgreSQL 14+)."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "DO $$ BEGIN"
            " IF current_setting('server_version_num')::int >= 140000 THEN"
            " ALTER TABLE instances ALTER COLUMN header SET COMPRESSION DEFAULT;"
            " END IF; END $$"
        )
