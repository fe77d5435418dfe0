"""A decoded data set becomes an InstanceRecord: the plain values the index stores.

Text is decoded with the data set's own Specific Character Set (PS3.5 6.1.2.3; pydicom
handles ISO_IR 100..., ISO_IR 192 and the ISO 2022 code extensions), then cleaned so that
both backends accept it and range matching works: NULs dropped, values cut to the column
sizes, dates and times reduced to their DA/TM form or left empty when unusable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from pydicom import Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.multival import MultiValue

from minipacs.storage.uids import InvalidUID, validate_uid

# A header longer than this (waveforms, large private blocks) is not copied into the index;
# queries needing it read the file instead.
HEADER_MAX = 256 * 1024
_INT32 = range(-(2**31), 2**31)  # IS range, PS3.5 Table 6.2-1
_DA = re.compile(r"\d{8}")
_TM = re.compile(r"\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?")
# Every attribute record_from_dataset reads (tests check it reads no other): a received
# data set is decoded only this far (dataset.inspect).
INDEXED_KEYWORDS = (
    "SpecificCharacterSet",
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "SeriesDate",
    "SeriesTime",
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
    "NumberOfFrames",
    "Rows",
    "Columns",
)
INDEXED_TAGS = frozenset(tag_for_keyword(keyword) for keyword in INDEXED_KEYWORDS)


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
    # The encoded elements before Pixel Data, as dataset.inspect() yields them; None when
    # longer than HEADER_MAX.
    header: bytes | None


def normalise_name(name: str) -> str:
    """The form of a person name used for case-insensitive PN matching (PS3.4 C.2.2.2.1).

    Upper case, and without the empty trailing components and groups that PS3.5 6.2.1.1
    allows a sender to keep or drop ("DOE^JOHN^^" and "Doe^John" are the same name).
    A C-FIND query value must go through this function too.
    """
    groups = [group.rstrip("^ ") for group in name.upper().split("=")]
    return "=".join(groups).rstrip("=")


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    """An element's value as decoded text, multiple values joined by a backslash."""
    value = ds.get(keyword)
    if value is None or value == "":
        return ""
    if isinstance(value, MultiValue | list | tuple):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    # PostgreSQL text cannot hold NUL, and some senders pad with it.
    return text.replace("\0", "").strip()[:limit]


def _date(ds: Dataset, keyword: str) -> str:
    """A DA value as YYYYMMDD (the ACR-NEMA form YYYY.MM.DD accepted), else empty."""
    text = _text(ds, keyword, 10)
    if len(text) == 10 and text[4] == text[7] == ".":
        text = text.replace(".", "")
    return text if _DA.fullmatch(text) else ""


def _time(ds: Dataset, keyword: str) -> str:
    """A TM value as HH[MM[SS[.F...]]] (the ACR-NEMA form HH:MM:SS accepted), else empty."""
    text = _text(ds, keyword, 16).replace(":", "")
    return text if _TM.fullmatch(text) else ""


def _int(ds: Dataset, keyword: str) -> int | None:
    """An IS/US value as an int, or None when absent, malformed or out of range."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number in _INT32 else None


def _uid(ds: Dataset, keyword: str) -> str:
    """A required UID, validated (PS3.5 9.1)."""
    value = ds.get(keyword)
    if value is None or value == "":
        raise IngestError(f"{keyword} is missing")
    try:
        return validate_uid(str(value))
    except InvalidUID as exc:
        raise IngestError(f"{keyword}: {exc}") from exc


def record_from_dataset(
    ds: Dataset,
    *,
    header: bytes,
    transfer_syntax_uid: str,
    rel_path: str,
    size: int,
    calling_ae: str,
    received_at: datetime,
) -> InstanceRecord:
    """Extract the indexed attributes; raise IngestError if the identifying UIDs are unusable."""
    study_uid = _uid(ds, "StudyInstanceUID")
    series_uid = _uid(ds, "SeriesInstanceUID")
    sop_uid = _uid(ds, "SOPInstanceUID")
    sop_class_uid = _uid(ds, "SOPClassUID")
    try:
        return InstanceRecord(
            patient_id=_text(ds, "PatientID", 64),
            issuer=_text(ds, "IssuerOfPatientID", 64),
            patient_name=_text(ds, "PatientName", 324),
            birth_date=_date(ds, "PatientBirthDate"),
            sex=_text(ds, "PatientSex", 16),
            study_uid=study_uid,
            study_date=_date(ds, "StudyDate"),
            study_time=_time(ds, "StudyTime"),
            accession_number=_text(ds, "AccessionNumber", 16),
            study_id=_text(ds, "StudyID", 16),
            study_description=_text(ds, "StudyDescription", 64),
            referring_name=_text(ds, "ReferringPhysicianName", 324),
            series_uid=series_uid,
            modality=_text(ds, "Modality", 16),
            series_number=_int(ds, "SeriesNumber"),
            series_description=_text(ds, "SeriesDescription", 64),
            body_part=_text(ds, "BodyPartExamined", 16),
            series_date=_date(ds, "SeriesDate"),
            series_time=_time(ds, "SeriesTime"),
            sop_uid=sop_uid,
            sop_class_uid=sop_class_uid,
            instance_number=_int(ds, "InstanceNumber"),
            transfer_syntax=transfer_syntax_uid,
            number_of_frames=_int(ds, "NumberOfFrames"),
            rows=_int(ds, "Rows"),
            columns=_int(ds, "Columns"),
            rel_path=rel_path,
            size=size,
            received_at=received_at,
            calling_ae=calling_ae.replace("\0", "").strip()[:16],
            charset=_text(ds, "SpecificCharacterSet", 128),
            header=header if len(header) <= HEADER_MAX else None,
        )
    except (ValueError, TypeError, LookupError) as exc:
        # e.g. a value that cannot be decoded in the declared character set.
        raise IngestError(f"data set values cannot be decoded: {exc}") from exc
