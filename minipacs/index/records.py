"""A decoded data set becomes an InstanceRecord: the plain values the index stores.

Text is decoded with the data set's own Specific Character Set (PS3.5 6.1.2.3; pydicom
handles ISO_IR 100..., ISO_IR 192 and the ISO 2022 code extensions), then cleaned so that
both backends accept it and range matching works: NULs dropped, values cut to the column
sizes, dates and times reduced to their DA/TM form or left empty when unusable.

Most values are plain ASCII in a character set whose G0 is ASCII: those are read from the
raw element bytes directly (one decode and strip), which gives the same text as pydicom's
conversion (tests/test_index_records.py compares both on every pydicom test file) at a
fraction of its cost. Anything else (other bytes, escapes, other character sets, binary
VRs in an unexpected form) goes through pydicom.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from pydicom import Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.multival import MultiValue

from minipacs.dataset import Inspected
from minipacs.storage.uids import InvalidUID, validate_uid

# A header longer than this (waveforms, large private blocks) is not copied into the index;
# queries needing it read the file instead.
HEADER_MAX = 256 * 1024
_INT32 = range(-(2**31), 2**31)  # IS range, PS3.5 Table 6.2-1
_DA = re.compile(r"\d{8}")
_IS = re.compile(r"[+-]?\d+")
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
_TAGS: Final = {keyword: tag_for_keyword(keyword) for keyword in INDEXED_KEYWORDS}
# Character sets whose code for every byte below 0x80 is ASCII (PS3.3 C.12.1.1.2), as
# long as no escape sequence switches the G0 set: ISO_IR 13 (JIS X 0201) is not one.
_ASCII_G0: Final = frozenset(
    {
        "",
        "ISO_IR 6",
        "ISO 2022 IR 6",
        "ISO_IR 100",
        "ISO_IR 101",
        "ISO_IR 109",
        "ISO_IR 110",
        "ISO_IR 144",
        "ISO_IR 127",
        "ISO_IR 126",
        "ISO_IR 138",
        "ISO_IR 148",
        "ISO_IR 166",
        "ISO_IR 203",
        "ISO_IR 192",
        "GB18030",
        "GBK",
    }
)
# Rows and Columns (US): the one binary VR the index reads.
_US: Final = {True: struct.Struct("<H"), False: struct.Struct(">H")}
_BINARY: Final = frozenset({_TAGS["Rows"], _TAGS["Columns"]})


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


class _Values:
    """The indexed attributes of a data set: raw ASCII bytes read directly, else pydicom."""

    def __init__(self, element: Callable[[int], Any], dataset: Callable[[], Dataset]) -> None:
        # element(tag): the element as read (raw or decoded), None if absent; dataset():
        # the data set for pydicom's conversion, which only some values take.
        self.element = element
        self.dataset = dataset
        # The defined terms are ASCII themselves, whichever way they are read.
        self.ascii_ok = True
        # With a charset whose G0 is not ASCII, or several (code extensions), every value
        # takes pydicom's path.
        self.ascii_ok = self.text("SpecificCharacterSet", 128) in _ASCII_G0

    def _raw_text(self, tag: int) -> str | None:
        """A string element's raw value as text, or None when pydicom must decode it."""
        raw = self.element(tag)
        if raw is None:
            return ""
        if not isinstance(raw, RawDataElement) or tag in _BINARY:
            return None
        value = raw.value
        if value is None:
            return ""
        if not isinstance(value, bytes) or not value.isascii() or b"\x1b" in value:
            return None
        return value.decode("ascii")

    def text(self, keyword: str, limit: int) -> str:
        """An element's value as decoded text, multiple values joined by a backslash."""
        raw = self._raw_text(_TAGS[keyword]) if self.ascii_ok else None
        if raw is not None:
            if "\\" in raw:
                # pydicom drops each value's trailing padding and keeps leading spaces.
                raw = "\\".join(v.rstrip(" \0") for v in raw.split("\\"))
            # PostgreSQL text cannot hold NUL, and some senders pad with it.
            return raw.replace("\0", "").strip()[:limit]
        value = self.dataset().get(keyword)
        if value is None or value == "":
            return ""
        if isinstance(value, MultiValue | list | tuple):
            text = "\\".join(str(v) for v in value)
        else:
            text = str(value)
        return text.replace("\0", "").strip()[:limit]

    def date(self, keyword: str) -> str:
        """A DA value as YYYYMMDD (the ACR-NEMA form YYYY.MM.DD accepted), else empty."""
        text = self.text(keyword, 10)
        if len(text) == 10 and text[4] == text[7] == ".":
            text = text.replace(".", "")
        return text if _DA.fullmatch(text) else ""

    def time(self, keyword: str) -> str:
        """A TM value as HH[MM[SS[.F...]]] (the ACR-NEMA form HH:MM:SS accepted), else empty."""
        text = self.text(keyword, 16).replace(":", "")
        return text if _TM.fullmatch(text) else ""

    def integer(self, keyword: str) -> int | None:
        """An IS/US value as an int, or None when absent, malformed or out of range."""
        tag = _TAGS[keyword]
        raw = self.element(tag)
        if raw is None:
            return None
        if isinstance(raw, RawDataElement) and isinstance(raw.value, bytes):
            if tag in _BINARY and raw.length == 2 and raw.VR in (None, "US"):
                return int(_US[raw.is_little_endian].unpack(raw.value)[0])
            if tag not in _BINARY and raw.value.isascii():
                text = raw.value.decode("ascii").strip(" \0")
                if _IS.fullmatch(text):
                    number = int(text)
                    return number if number in _INT32 else None
        value = self.dataset().get(keyword)
        if value is None or value == "":
            return None
        try:
            number = int(value)
        except (TypeError, ValueError):
            return None
        return number if number in _INT32 else None

    def uid(self, keyword: str) -> str:
        """A required UID, validated (PS3.5 9.1)."""
        value = self.text(keyword, 1000)
        if not value:
            raise IngestError(f"{keyword} is missing")
        try:
            return validate_uid(value)
        except InvalidUID as exc:
            raise IngestError(f"{keyword}: {exc}") from exc


def record_from_dataset(
    source: Dataset | Inspected,
    *,
    header: bytes | None = None,
    transfer_syntax_uid: str,
    rel_path: str,
    size: int,
    calling_ae: str,
    received_at: datetime,
) -> InstanceRecord:
    """Extract the indexed attributes; raise IngestError if the identifying UIDs are unusable.

    `source` is a pydicom data set with its encoded `header`, or a data set as
    dataset.inspect() read it, which carries its header.
    """
    element: Callable[[int], Any]
    dataset: Callable[[], Dataset]
    if isinstance(source, Inspected):
        # Straight from the raw elements: pydicom's Dataset is built only for the values
        # that need its conversion.
        element, dataset, header = source.elements.get, lambda: source.dataset, source.header
    else:
        element, dataset = source.get_item, lambda: source
    if header is None:
        raise TypeError("a pydicom data set needs its encoded header")
    try:
        values = _Values(element, dataset)
        study_uid = values.uid("StudyInstanceUID")
        series_uid = values.uid("SeriesInstanceUID")
        sop_uid = values.uid("SOPInstanceUID")
        sop_class_uid = values.uid("SOPClassUID")
        text, date, time, integer = values.text, values.date, values.time, values.integer
        return InstanceRecord(
            patient_id=text("PatientID", 64),
            issuer=text("IssuerOfPatientID", 64),
            patient_name=text("PatientName", 324),
            birth_date=date("PatientBirthDate"),
            sex=text("PatientSex", 16),
            study_uid=study_uid,
            study_date=date("StudyDate"),
            study_time=time("StudyTime"),
            accession_number=text("AccessionNumber", 16),
            study_id=text("StudyID", 16),
            study_description=text("StudyDescription", 64),
            referring_name=text("ReferringPhysicianName", 324),
            series_uid=series_uid,
            modality=text("Modality", 16),
            series_number=integer("SeriesNumber"),
            series_description=text("SeriesDescription", 64),
            body_part=text("BodyPartExamined", 16),
            series_date=date("SeriesDate"),
            series_time=time("SeriesTime"),
            sop_uid=sop_uid,
            sop_class_uid=sop_class_uid,
            instance_number=integer("InstanceNumber"),
            transfer_syntax=transfer_syntax_uid,
            number_of_frames=integer("NumberOfFrames"),
            rows=integer("Rows"),
            columns=integer("Columns"),
            rel_path=rel_path,
            size=size,
            received_at=received_at,
            calling_ae=calling_ae.replace("\0", "").strip()[:16],
            charset=text("SpecificCharacterSet", 128),
            header=header if len(header) <= HEADER_MAX else None,
        )
    except (ValueError, TypeError, LookupError) as exc:
        # e.g. a value that cannot be decoded in the declared character set.
        raise IngestError(f"data set values cannot be decoded: {exc}") from exc
