"""Ingest: a decoded data set becomes an InstanceRecord, and records become index rows."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydicom import Dataset
from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from minipacs.index.models import Instance, Patient, Series, Study

# Binary values above this many bytes are left out of the stored header (PS3.18 F.2.7
# would make them BulkDataURIs; the files hold them).
BULK_THRESHOLD = 1024
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class IngestError(ValueError):
    """A data set that cannot be indexed (missing or malformed identifying UIDs)."""


@dataclass(frozen=True)
class InstanceRecord:
    """Everything the index stores for one instance, free of any ORM object."""

    patient_id: str
    issuer: str
    patient_name: str
    birth_date: str
    sex: str
    study_uid: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    study_description: str
    referring_name: str
    series_uid: str
    modality: str
    series_number: int | None
    series_description: str
    body_part: str
    series_date: str
    series_time: str
    sop_uid: str
    sop_class_uid: str
    instance_number: int | None
    transfer_syntax: str
    number_of_frames: int | None
    rows: int | None
    columns: int | None
    rel_path: str
    size: int
    received_at: datetime
    calling_ae: str
    charset: str
    header: dict[str, Any]


@dataclass(frozen=True)
class IngestOutcome:
    """What happened to a record: stored, a kept duplicate, replaced, or rejected."""

    sop_uid: str
    stored: bool
    duplicate: bool = False
    rejected: bool = False
    # The file of an instance this one replaced, when it lives at another path.
    stale_path: str | None = None


def normalise_name(name: str) -> str:
    """Upper-cased person name, for case-insensitive PN matching (PS3.4 C.2.2.2.1)."""
    return name.upper()


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    value = ds.get(keyword)
    if value is None or value == "":
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    return text.strip()[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _uid(ds: Dataset, keyword: str) -> str:
    value = str(ds.get(keyword, "") or "").rstrip("\0 ")
    if not value or len(value) > 64 or not _UID.match(value):
        raise IngestError(f"{keyword} {value!r} is missing or not a valid UID (PS3.5 9.1)")
    return value


def _bulk(_element: Any) -> str:
    return ""


def header_json(ds: Dataset) -> dict[str, Any]:
    """The data set as DICOM JSON without bulk binary values."""
    data = ds.to_json_dict(bulk_data_threshold=BULK_THRESHOLD, bulk_data_element_handler=_bulk)
    return _drop_bulk(data)


def _drop_bulk(data: dict[str, Any]) -> dict[str, Any]:
    result = {}
    for tag, element in data.items():
        if "BulkDataURI" in element:
            continue
        if element.get("vr") == "SQ" and "Value" in element:
            element = {**element, "Value": [_drop_bulk(item) for item in element["Value"]]}
        result[tag] = element
    return result


def record_from_dataset(
    ds: Dataset,
    *,
    transfer_syntax_uid: str,
    rel_path: str,
    size: int,
    calling_ae: str,
    received_at: datetime,
) -> InstanceRecord:
    """Extract the indexed attributes; names are decoded with the data set's charset."""
    charset = _text(ds, "SpecificCharacterSet", 128)
    try:
        header = header_json(ds)
        patient_name = _text(ds, "PatientName", 324)
        referring = _text(ds, "ReferringPhysicianName", 324)
    except (ValueError, TypeError, LookupError) as exc:
        raise IngestError(f"data set values cannot be decoded: {exc}") from exc
    return InstanceRecord(
        patient_id=_text(ds, "PatientID", 64),
        issuer=_text(ds, "IssuerOfPatientID", 64),
        patient_name=patient_name,
        birth_date=_text(ds, "PatientBirthDate", 8),
        sex=_text(ds, "PatientSex", 16),
        study_uid=_uid(ds, "StudyInstanceUID"),
        study_date=_text(ds, "StudyDate", 8),
        study_time=_text(ds, "StudyTime", 16),
        accession_number=_text(ds, "AccessionNumber", 16),
        study_id=_text(ds, "StudyID", 16),
        study_description=_text(ds, "StudyDescription", 64),
        referring_name=referring,
        series_uid=_uid(ds, "SeriesInstanceUID"),
        modality=_text(ds, "Modality", 16),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription", 64),
        body_part=_text(ds, "BodyPartExamined", 64),
        series_date=_text(ds, "SeriesDate", 8),
        series_time=_text(ds, "SeriesTime", 16),
        sop_uid=_uid(ds, "SOPInstanceUID"),
        sop_class_uid=_uid(ds, "SOPClassUID"),
        instance_number=_int(ds, "InstanceNumber"),
        transfer_syntax=transfer_syntax_uid,
        number_of_frames=_int(ds, "NumberOfFrames"),
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        rel_path=rel_path,
        size=size,
        received_at=received_at,
        calling_ae=calling_ae[:16],
        charset=charset,
        header=header,
    )


def _insert_ignore(session: Session, model: type, values: dict[str, Any]) -> None:
    # INSERT ... ON CONFLICT DO NOTHING: concurrent writers (several nodes on one
    # PostgreSQL) may create the same patient/study/series at once.
    dialect = session.get_bind().dialect.name
    builder = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.execute(builder(model).values(**values).on_conflict_do_nothing())


def _patient_id(session: Session, record: InstanceRecord) -> int:
    key = (Patient.patient_id == record.patient_id, Patient.issuer == record.issuer)
    found = session.scalar(select(Patient.id).where(*key))
    if found is not None:
        return found
    _insert_ignore(
        session,
        Patient,
        {
            "patient_id": record.patient_id,
            "issuer": record.issuer,
            "patient_name": record.patient_name,
            "patient_name_norm": normalise_name(record.patient_name),
            "birth_date": record.birth_date,
            "sex": record.sex,
            "num_studies": 0,
            "num_series": 0,
            "num_instances": 0,
        },
    )
    return session.scalars(select(Patient.id).where(*key)).one()


def _study_id(session: Session, record: InstanceRecord, patient: int) -> tuple[int, bool]:
    found = session.scalar(select(Study.id).where(Study.study_uid == record.study_uid))
    if found is not None:
        return found, False
    _insert_ignore(
        session,
        Study,
        {
            "patient_fk": patient,
            "study_uid": record.study_uid,
            "study_date": record.study_date,
            "study_time": record.study_time,
            "accession_number": record.accession_number,
            "study_id": record.study_id,
            "description": record.study_description,
            "referring_name": record.referring_name,
            "referring_name_norm": normalise_name(record.referring_name),
            "modalities": "",
            "num_series": 0,
            "num_instances": 0,
        },
    )
    study = session.scalars(select(Study.id).where(Study.study_uid == record.study_uid)).one()
    session.execute(
        update(Patient).where(Patient.id == patient).values(num_studies=Patient.num_studies + 1)
    )
    return study, True


def _series_id(session: Session, record: InstanceRecord, study: int, patient: int) -> int:
    found = session.scalar(select(Series.id).where(Series.series_uid == record.series_uid))
    if found is not None:
        return found
    _insert_ignore(
        session,
        Series,
        {
            "study_fk": study,
            "series_uid": record.series_uid,
            "modality": record.modality,
            "series_number": record.series_number,
            "description": record.series_description,
            "body_part": record.body_part,
            "series_date": record.series_date,
            "series_time": record.series_time,
            "num_instances": 0,
        },
    )
    series = session.scalars(select(Series.id).where(Series.series_uid == record.series_uid)).one()
    modalities = session.scalars(
        select(Series.modality).where(Series.study_fk == study).distinct()
    ).all()
    session.execute(
        update(Study)
        .where(Study.id == study)
        .values(
            num_series=Study.num_series + 1,
            modalities="\\".join(sorted(m for m in modalities if m)),
        )
    )
    session.execute(
        update(Patient).where(Patient.id == patient).values(num_series=Patient.num_series + 1)
    )
    return series


def _count_instance(session: Session, series: int, delta: int) -> None:
    study, patient = session.execute(
        select(Series.study_fk, Study.patient_fk)
        .join(Study, Study.id == Series.study_fk)
        .where(Series.id == series)
    ).one()
    session.execute(
        update(Series).where(Series.id == series).values(num_instances=Series.num_instances + delta)
    )
    session.execute(
        update(Study).where(Study.id == study).values(num_instances=Study.num_instances + delta)
    )
    session.execute(
        update(Patient)
        .where(Patient.id == patient)
        .values(num_instances=Patient.num_instances + delta)
    )


def apply_record(session: Session, record: InstanceRecord, duplicate_policy: str) -> IngestOutcome:
    """Add one record to the index under the duplicate policy (keep-first/replace/reject)."""
    existing = session.execute(
        select(Instance.id, Instance.series_fk, Instance.rel_path).where(
            Instance.sop_uid == record.sop_uid
        )
    ).first()
    stale_path = None
    if existing is not None:
        if duplicate_policy == "keep-first":
            return IngestOutcome(record.sop_uid, stored=False, duplicate=True)
        if duplicate_policy == "reject":
            return IngestOutcome(record.sop_uid, stored=False, duplicate=True, rejected=True)
        session.execute(Instance.__table__.delete().where(Instance.id == existing.id))
        _count_instance(session, existing.series_fk, -1)
        stale_path = existing.rel_path if existing.rel_path != record.rel_path else None
    patient = _patient_id(session, record)
    study, _ = _study_id(session, record, patient)
    series = _series_id(session, record, study, patient)
    session.add(
        Instance(
            series_fk=series,
            sop_uid=record.sop_uid,
            sop_class_uid=record.sop_class_uid,
            instance_number=record.instance_number,
            transfer_syntax=record.transfer_syntax,
            number_of_frames=record.number_of_frames,
            rows=record.rows,
            columns=record.columns,
            rel_path=record.rel_path,
            size=record.size,
            received_at=record.received_at,
            calling_ae=record.calling_ae,
            charset=record.charset,
            header=record.header,
        )
    )
    session.flush()
    _count_instance(session, series, +1)
    return IngestOutcome(
        record.sop_uid, stored=True, duplicate=existing is not None, stale_path=stale_path
    )


def instance_path_of(session: Session, sop_uid: str) -> str | None:
    """The stored file of an instance, if indexed."""
    return session.scalar(select(Instance.rel_path).where(Instance.sop_uid == sop_uid))


def total_instances(session: Session) -> int:
    """Number of indexed instances."""
    return int(session.scalar(select(func.count(Instance.id))) or 0)
