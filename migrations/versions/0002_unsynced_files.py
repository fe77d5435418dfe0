"""Instance rows whose file is not yet confirmed durable (see models.UnsyncedFile).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create unsynced_files."""
    op.create_table(
        "unsynced_files",
        sa.Column("token", sa.String(32), nullable=False),
        sa.Column("rel_path", sa.String(400), nullable=False),
        sa.Column("sop_uid", sa.String(64), nullable=False),
        sa.Column("writer", sa.String(300), nullable=False),
        sa.PrimaryKeyConstraint("token", name="pk_unsynced_files"),
    )
    op.create_index("ix_unsynced_files_writer", "unsynced_files", ["writer"])


def downgrade() -> None:
    """Drop unsynced_files."""
    op.drop_table("unsynced_files")
