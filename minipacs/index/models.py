"""The index schema: Patient / Study / Series / Instance (PS3.4 C.6.1.1 levels).

Every C-FIND matching key of these levels is a column. Person names are kept as sent
(decoded to Unicode) and normalised (upper case) for case-insensitive PN matching
(PS3.4 C.2.2.2.1). Dates are DA ``YYYYMMDD`` and times TM ``HHMMSS.FFFFFF`` strings, which
order like the values they stand for, so range matching (PS3.4 C.2.2.2.5) is a string
comparison. Every instance also keeps its encoded header (every element before Pixel
Data, in its transfer syntax, inflated when deflated) so any return key can be answered
without reading files: copying bytes costs nothing at ingest, where converting to DICOM
JSON cost more than everything else together; a query decodes only what it returns. The
counts behind "Number of ... Related ..." return keys (PS3.4 C.3.2-C.3.4) are maintained
at ingest.

Text matched with wildcards gets, on PostgreSQL, a ``varchar_pattern_ops`` index: LIKE
'ABC%' can use it whatever the database collation is (a plain index only serves LIKE
under the C collation). On SQLite, LIKE is made case-sensitive (db.py) so that a plain
index serves prefix LIKE there.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

UID = String(64)  # PS3.5 Table 6.2-1: UI at most 64 characters
PN = String(324)  # three component groups of 64 characters, five components each
DA = String(8)
TM = String(16)
CS = String(16)
SH = String(16)
LO = String(64)


def _pattern_index(name: str, column: str) -> Index:
    """An index serving equality and prefix LIKE on PostgreSQL whatever its collation."""
    return Index(name, column, postgresql_ops={column: "varchar_pattern_ops"})


class Base(DeclarativeBase):
    """Declarative base of the index tables."""

    # Named constraints: later migrations can drop or alter them, also on SQLite (batch mode).
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class Patient(Base):
    """A patient, identified by Patient ID and Issuer of Patient ID."""

    __tablename__ = "patients"
    __table_args__ = (
        Index("uq_patients_identity", "patient_id", "issuer", unique=True),
        _pattern_index("ix_patients_patient_id_pattern", "patient_id"),
        _pattern_index("ix_patients_patient_name_norm_pattern", "patient_name_norm"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(LO, default="")
    issuer: Mapped[str] = mapped_column(LO, default="")
    patient_name: Mapped[str] = mapped_column(PN, default="")
    patient_name_norm: Mapped[str] = mapped_column(PN, default="")
    birth_date: Mapped[str] = mapped_column(DA, default="", index=True)
    sex: Mapped[str] = mapped_column(CS, default="")
    num_studies: Mapped[int] = mapped_column(Integer, default=0)
    num_series: Mapped[int] = mapped_column(Integer, default=0)
    num_instances: Mapped[int] = mapped_column(Integer, default=0)


class Study(Base):
    """A study of one patient."""

    __tablename__ = "studies"
    __table_args__ = (
        _pattern_index("ix_studies_accession_number_pattern", "accession_number"),
        _pattern_index("ix_studies_referring_name_norm_pattern", "referring_name_norm"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_date: Mapped[str] = mapped_column(DA, default="", index=True)
    study_time: Mapped[str] = mapped_column(TM, default="")
    accession_number: Mapped[str] = mapped_column(SH, default="")
    study_id: Mapped[str] = mapped_column(SH, default="")
    description: Mapped[str] = mapped_column(LO, default="")
    referring_name: Mapped[str] = mapped_column(PN, default="")
    referring_name_norm: Mapped[str] = mapped_column(PN, default="")
    # ModalitiesInStudy (0008,0061): the distinct series modalities, backslash-separated.
    modalities: Mapped[str] = mapped_column(String(160), default="")
    num_series: Mapped[int] = mapped_column(Integer, default=0)
    num_instances: Mapped[int] = mapped_column(Integer, default=0)


class Series(Base):
    """A series of one study."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str] = mapped_column(CS, default="", index=True)
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    description: Mapped[str] = mapped_column(LO, default="")
    body_part: Mapped[str] = mapped_column(CS, default="")
    series_date: Mapped[str] = mapped_column(DA, default="", index=True)
    series_time: Mapped[str] = mapped_column(TM, default="")
    num_instances: Mapped[int] = mapped_column(Integer, default=0)


class Instance(Base):
    """A stored SOP instance: its file and its header."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID, index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    transfer_syntax: Mapped[str] = mapped_column(UID)
    number_of_frames: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rel_path: Mapped[str] = mapped_column(String(400))
    size: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    # Specific Character Set (0008,0005) as sent; the text columns are already decoded.
    charset: Mapped[str] = mapped_column(String(128), default="")
    # None when the header was too long to copy (records.HEADER_MAX): the file has it.
    # PostgreSQL compresses it with lz4 where the server has it (migration 0003).
    header: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class UnsyncedFile(Base):
    """An instance row committed while its file was still being made durable.

    The store writes the file, renames it into place, then flushes it to disk while the
    index commits (one disk flush on the critical path instead of three). Until its flush
    is confirmed the row is listed here, in the same transaction as the instance row; a
    writer that died with rows listed leaves them to recovery (minipacs.index.recover),
    which keeps each instance whose file is whole and withdraws the others.
    """

    __tablename__ = "unsynced_files"

    token: Mapped[str] = mapped_column(String(32), primary_key=True)
    rel_path: Mapped[str] = mapped_column(String(400))
    sop_uid: Mapped[str] = mapped_column(UID)
    # The storing process, as <host>~<pid>~<run> (storage.filestore.WRITER_ID).
    writer: Mapped[str] = mapped_column(String(300), index=True)
