"""Data set -> InstanceRecord: UIDs, decoded and normalised names, cleaned values, header."""

from __future__ import annotations

import copy
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.datadict import keyword_for_tag
from pydicom.tag import Tag

from minipacs.dataset import encode, inspect, read_header
from minipacs.index import records
from minipacs.index.ingest import (
    IngestError,
    InstanceRecord,
    normalise_name,
    record_from_dataset,
)
from minipacs.index.records import HEADER_MAX, INDEXED_KEYWORDS, INDEXED_TAGS

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _record(ds: Dataset) -> InstanceRecord:
    return record_from_dataset(
        ds,
        header=encode(ds, "1.2.840.10008.1.2.1"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        rel_path="aa/bb/x.dcm",
        size=10,
        calling_ae=" MODALITY ",
        received_at=NOW,
    )


def _bare_record(ds: Dataset) -> InstanceRecord:
    """_record without the header (which not every test file can be encoded into)."""
    return record_from_dataset(
        ds,
        header=b"",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        rel_path="aa/bb/x.dcm",
        size=10,
        calling_ae="MODALITY",
        received_at=NOW,
    )


def _charset_file(name: str) -> Dataset:
    return pydicom.dcmread(get_charset_files(name)[0], stop_before_pixels=True)


def test_ct_small() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    record = _record(ds)
    assert record.patient_name == "CompressedSamples^CT1"
    assert record.patient_id == "1CT1"
    assert record.study_uid == ds.StudyInstanceUID
    assert record.series_uid == ds.SeriesInstanceUID
    assert record.sop_uid == ds.SOPInstanceUID
    assert record.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert (record.modality, record.study_date) == ("CT", "20040119")
    assert (record.rows, record.columns, record.number_of_frames) == (128, 128, None)
    assert record.calling_ae == "MODALITY"
    assert record.header is not None
    assert read_header(record.header, "1.2.840.10008.1.2.1").PatientID == "1CT1"


def test_mr_small() -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"), stop_before_pixels=True)
    record = _record(ds)
    assert (record.patient_name, record.modality, record.study_date) == (
        "CompressedSamples^MR1",
        "MR",
        "20040826",
    )


@pytest.mark.parametrize(
    ("name", "patient_name"),
    [
        ("chrH31.dcm", "Yamada^Tarou=山田^太郎=やまだ^たろう"),  # ISO 2022 IR 87
        ("chrH32.dcm", "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"),  # ISO 2022 IR 13 + 87
        ("chrJapMulti.dcm", "やまだ^たろう"),
        ("chrI2.dcm", "Hong^Gildong=洪^吉洞=홍^길동"),  # ISO 2022 IR 149
        ("chrX1.dcm", "Wang^XiaoDong=王^小東"),  # ISO_IR 192 (UTF-8)
        ("chrX2.dcm", "Wang^XiaoDong=王^小东"),  # GB18030
        ("chrFren.dcm", "Buc^Jérôme"),  # ISO_IR 100
        ("chrRuss.dcm", "Люкceмбypг"),  # ISO_IR 144
        ("chrGreek.dcm", "Διονυσιος"),  # ISO_IR 126
    ],
)
def test_names_are_decoded_with_the_data_sets_charset(name: str, patient_name: str) -> None:
    ds = _charset_file(name)
    record = _record(ds)
    assert record.patient_name == patient_name
    charset = ds.SpecificCharacterSet
    assert record.charset == (charset if isinstance(charset, str) else "\\".join(charset))
    assert normalise_name(record.patient_name) == patient_name.upper()


@pytest.mark.parametrize(
    ("name", "normalised"),
    [
        ("Doe^John", "DOE^JOHN"),
        ("DOE^JOHN^^^", "DOE^JOHN"),
        ("Doe^John^^^=", "DOE^JOHN"),
        ("Yamada^Tarou=山田^太郎=", "YAMADA^TAROU=山田^太郎"),
        ("=山田^太郎", "=山田^太郎"),
        ("", ""),
    ],
)
def test_normalise_name(name: str, normalised: str) -> None:
    assert normalise_name(name) == normalised


# pydicom warns about the invalid values these tests set on purpose.
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"]
)
@pytest.mark.parametrize("value", [None, "", "1.02.3", "../../etc", "1." + "2" * 70])
def test_missing_or_malformed_uid_is_an_ingest_error(keyword: str, value: str | None) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    if value is None:
        delattr(ds, keyword)
    else:
        setattr(ds, keyword, value)
    with pytest.raises(IngestError, match=keyword):
        _record(ds)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_values_are_cleaned_for_the_index() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    ds.StudyDate = "2004.01.19"  # ACR-NEMA date form
    ds.SeriesDate = "yesterday"
    ds.StudyTime = "10:11:12"
    ds.SeriesTime = "101112.123456"
    ds.InstanceNumber = "99999999999"  # beyond the IS range
    ds.SeriesNumber = "  7 "
    ds.StudyDescription = "x" * 80 + "\0"
    ds.AccessionNumber = "ACC\0"
    record = _record(ds)
    assert (record.study_date, record.series_date) == ("20040119", "")
    assert (record.study_time, record.series_time) == ("101112", "101112.123456")
    assert (record.instance_number, record.series_number) == (None, 7)
    assert record.study_description == "x" * 64
    assert record.accession_number == "ACC"


def test_the_header_is_kept_up_to_its_limit() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    assert _record(ds).header == encode(ds, "1.2.840.10008.1.2.1")
    # A waveform-sized header stays in its file only.
    ds.add_new(0x00091010, "OB", b"\1" * HEADER_MAX)
    assert _record(ds).header is None


class _Recording(Dataset):
    """A data set that notes every keyword read from it."""

    def __init__(self, source: Dataset) -> None:
        super().__init__(source)
        self.read: set[str] = set()

    def get(self, key: object, default: object = None) -> object:
        """Note the keyword, then read it."""
        if isinstance(key, str):
            self.read.add(key)
        return super().get(key, default)

    def get_item(self, key: object, *, keep_deferred: bool = False) -> object:
        """Note the keyword of a raw read by the record code (pydicom's own are not), then read."""
        if sys._getframe(1).f_globals["__name__"] == records.__name__:
            self.read.add(keyword_for_tag(Tag(key)))  # type: ignore[arg-type]
        return super().get_item(key, keep_deferred=keep_deferred)  # type: ignore[arg-type]


def test_a_record_reads_only_the_indexed_attributes() -> None:
    # inspect() decodes INDEXED_TAGS only: an attribute read beyond them would be empty.
    for name in ("chrH31.dcm", "chrRuss.dcm"):  # pydicom's path, the raw bytes' path
        ds = _Recording(_charset_file(name))
        _record(ds)
        assert ds.read == set(INDEXED_KEYWORDS)


@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("CT_small.dcm", "1.2.840.10008.1.2.1"),
        ("CT_small.dcm", "1.2.840.10008.1.2"),
        ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2"),
        ("CT_small.dcm", "1.2.840.10008.1.2.1.99"),
        ("chrH31.dcm", "1.2.840.10008.1.2.1"),
        ("chrX2.dcm", "1.2.840.10008.1.2"),
        ("chrRuss.dcm", "1.2.840.10008.1.2.1"),
    ],
)
def test_inspect_yields_the_record_a_full_read_does(name: str, syntax: str) -> None:
    path = get_charset_files(name)[0] if name.startswith("chr") else get_testdata_file(name)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    inspected = inspect(encode(ds, syntax), syntax, INDEXED_TAGS)
    assert set(inspected.dataset.keys()) == INDEXED_TAGS & set(ds.keys())
    # The header field is _record's own encoding of what it is given: compare the rest.
    expected = replace(_record(ds), header=None)
    assert replace(_record(inspected.dataset), header=None) == expected
    # The store's way: straight from the raw elements, the header as inspect() kept it.
    from_raw = record_from_dataset(
        inspected,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        rel_path="aa/bb/x.dcm",
        size=10,
        calling_ae=" MODALITY ",
        received_at=NOW,
    )
    assert replace(from_raw, header=None) == expected
    assert from_raw.header == inspected.header


def _every_test_file() -> list[Path]:
    """pydicom's bundled test files (character set files too) holding the identifying UIDs."""
    found = []
    for path in sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        if all(k in ds for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")):
            found.append(path)
    return found


def test_raw_values_give_the_record_pydicom_conversion_gives() -> None:
    # The fast path reads raw ASCII bytes; converting every element first forces pydicom's.
    compared = 0
    for path in _every_test_file():
        raw = pydicom.dcmread(path, stop_before_pixels=True)
        converted = pydicom.dcmread(path, stop_before_pixels=True)
        for _ in converted:  # iterating converts each raw element
            pass
        try:
            expected = _bare_record(converted)
        except IngestError:
            with pytest.raises(IngestError):
                _bare_record(raw)
            continue
        assert _bare_record(raw) == expected, path.name
        compared += 1
    assert compared > 50


@pytest.mark.parametrize(
    ("keyword", "raw", "expected"),
    [
        ("StudyDescription", b"A\\ B ", "A\\ B"),
        ("StudyDescription", b" A \\B\0", "A\\B"),
        ("PatientName", b"DOE^J\\ SMITH ", "DOE^J\\ SMITH"),
        ("SeriesNumber", b"+-5 ", None),
        ("SeriesNumber", b"--5", None),
        ("SeriesNumber", b" +12 ", 12),
        ("SeriesNumber", b"1.0 ", 1),
        ("SeriesNumber", b"99999999999", None),
    ],
)
def test_raw_values_that_need_care(keyword: str, raw: bytes, expected: object) -> None:
    # Each value through the raw path and through pydicom's conversion: the same record.
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    vr = {"StudyDescription": "LO", "PatientName": "PN", "SeriesNumber": "IS"}[keyword]
    tag = pydicom.datadict.tag_for_keyword(keyword)
    ds[tag] = pydicom.dataelem.RawDataElement(Tag(tag), vr, len(raw), raw, 0, False, True)
    converted = copy.deepcopy(ds)
    for _ in converted:
        pass
    field = {"StudyDescription": "study_description", "PatientName": "patient_name"}.get(
        keyword, "series_number"
    )
    assert getattr(_bare_record(ds), field) == expected
    assert getattr(_bare_record(converted), field) == expected
