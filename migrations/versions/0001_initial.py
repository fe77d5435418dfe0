"""Initial index schema: patients, studies, series, instances.

Hand-checked against minipacs/index/models.py; tests/test_index.py compares the migrated
database with the models (autogenerate finds no difference) on SQLite and PostgreSQL.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _pattern_index(name: str, table: str, column: str) -> None:
    """Equality and prefix LIKE on PostgreSQL whatever the collation (see models.py)."""
    op.create_index(name, table, [column], postgresql_ops={column: "varchar_pattern_ops"})


def upgrade() -> None:
    """Create the four levels with their query indexes."""
    op.create_table(
        "patients",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("issuer", sa.String(64), nullable=False),
        sa.Column("patient_name", sa.String(324), nullable=False),
        sa.Column("patient_name_norm", sa.String(324), nullable=False),
        sa.Column("birth_date", sa.String(8), nullable=False),
        sa.Column("sex", sa.String(16), nullable=False),
        sa.Column("num_studies", sa.Integer(), nullable=False),
        sa.Column("num_series", sa.Integer(), nullable=False),
        sa.Column("num_instances", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_patients"),
    )
    op.create_index("uq_patients_identity", "patients", ["patient_id", "issuer"], unique=True)
    _pattern_index("ix_patients_patient_id_pattern", "patients", "patient_id")
    _pattern_index("ix_patients_patient_name_norm_pattern", "patients", "patient_name_norm")
    op.create_index("ix_patients_birth_date", "patients", ["birth_date"])

    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("patient_fk", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("study_date", sa.String(8), nullable=False),
        sa.Column("study_time", sa.String(16), nullable=False),
        sa.Column("accession_number", sa.String(16), nullable=False),
        sa.Column("study_id", sa.String(16), nullable=False),
        sa.Column("description", sa.String(64), nullable=False),
        sa.Column("referring_name", sa.String(324), nullable=False),
        sa.Column("referring_name_norm", sa.String(324), nullable=False),
        sa.Column("modalities", sa.String(160), nullable=False),
        sa.Column("num_series", sa.Integer(), nullable=False),
        sa.Column("num_instances", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["patient_fk"], ["patients.id"], name="fk_studies_patient_fk_patients"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_studies"),
        sa.UniqueConstraint("study_uid", name="uq_studies_study_uid"),
    )
    op.create_index("ix_studies_patient_fk", "studies", ["patient_fk"])
    op.create_index("ix_studies_study_date", "studies", ["study_date"])
    _pattern_index("ix_studies_accession_number_pattern", "studies", "accession_number")
    _pattern_index("ix_studies_referring_name_norm_pattern", "studies", "referring_name_norm")

    op.create_table(
        "series",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_fk", sa.Integer(), nullable=False),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("description", sa.String(64), nullable=False),
        sa.Column("body_part", sa.String(16), nullable=False),
        sa.Column("series_date", sa.String(8), nullable=False),
        sa.Column("series_time", sa.String(16), nullable=False),
        sa.Column("num_instances", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["study_fk"], ["studies.id"], name="fk_series_study_fk_studies"),
        sa.PrimaryKeyConstraint("id", name="pk_series"),
        sa.UniqueConstraint("series_uid", name="uq_series_series_uid"),
    )
    op.create_index("ix_series_study_fk", "series", ["study_fk"])
    op.create_index("ix_series_modality", "series", ["modality"])
    op.create_index("ix_series_series_date", "series", ["series_date"])

    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_fk", sa.Integer(), nullable=False),
        sa.Column("sop_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("transfer_syntax", sa.String(64), nullable=False),
        sa.Column("number_of_frames", sa.Integer(), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("columns", sa.Integer(), nullable=True),
        sa.Column("rel_path", sa.String(400), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("calling_ae", sa.String(16), nullable=False),
        sa.Column("charset", sa.String(128), nullable=False),
        sa.Column("header", sa.LargeBinary(), nullable=True),
        sa.ForeignKeyConstraint(["series_fk"], ["series.id"], name="fk_instances_series_fk_series"),
        sa.PrimaryKeyConstraint("id", name="pk_instances"),
        sa.UniqueConstraint("sop_uid", name="uq_instances_sop_uid"),
    )
    op.create_index("ix_instances_series_fk", "instances", ["series_fk"])
    op.create_index("ix_instances_sop_class_uid", "instances", ["sop_class_uid"])


def downgrade() -> None:
    """Drop everything (the tables' indexes go with them)."""
    op.drop_table("instances")
    op.drop_table("series")
    op.drop_table("studies")
    op.drop_table("patients")
