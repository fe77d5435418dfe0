"""Filesystem store: UID validation, layout, File Meta encoding and atomic durable writes."""

import os
import struct
from io import BytesIO
from pathlib import Path, PurePosixPath

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from minipacs.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from minipacs.storage.filestore import FileStore, OutOfSpace
from minipacs.storage.layout import instance_path
from minipacs.storage.meta import encode_file_meta
from minipacs.storage.uids import InvalidUID, validate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY, SERIES, SOP = "1.2.826.0.1.3680043.9.1", "1.2.826.0.1.3680043.9.1.2", "1.2.3.4.5.6.7"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1.2.3", "1.2.3"),
        ("0", "0"),
        ("1.0.2", "1.0.2"),
        ("1.2.3\0", "1.2.3"),
        ("1.2.3 ", "1.2.3"),
        ("1." + "2" * 62, "1." + "2" * 62),
    ],
)
def test_valid_uids(value: str, expected: str) -> None:
    assert validate_uid(value) == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("../../etc", "only digits and dots"),
        ("1.2/3", "only digits and dots"),
        ("1.2.03", "leading zero"),
        ("00", "leading zero"),
        ("1..2", "empty component"),
        (".1.2", "empty component"),
        ("1.2.", "empty component"),
        ("1." + "2" * 63, "exceeds 64"),
        ("", "empty"),
        ("\0", "empty"),
    ],
)
def test_invalid_uids(value: str, reason: str) -> None:
    with pytest.raises(InvalidUID, match=reason):
        validate_uid(value)


def test_layout_is_deterministic_and_stays_inside() -> None:
    path = instance_path(STUDY, SERIES, SOP + "\0")
    assert path == instance_path(STUDY, SERIES, SOP)
    parts = PurePosixPath(path).parts
    assert len(parts) == 5
    assert all(len(p) == 2 and set(p) <= set("0123456789abcdef") for p in parts[:2])
    assert parts[2:] == (STUDY, SERIES, SOP + ".dcm")
    with pytest.raises(InvalidUID):
        instance_path(STUDY, "../..", SOP)
    with pytest.raises(InvalidUID):
        instance_path("/etc", SERIES, SOP)


def _pydicom_file(ae: str) -> tuple[bytes, bytes]:
    """Return (File Meta bytes, data set bytes) as pydicom writes them."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE
    meta.MediaStorageSOPInstanceUID = SOP
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if ae:
        meta.SourceApplicationEntityTitle = ae
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = SOP
    ds.PatientName = "Doe^Jane"
    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    raw = buf.getvalue()
    (group_length,) = struct.unpack_from("<I", raw, 132 + 8)
    end = 132 + 12 + group_length
    return raw[:end], raw[end:]


@pytest.mark.parametrize("ae", ["STORESCU", "ODD", ""])
def test_file_meta_matches_pydicom(ae: str) -> None:
    expected_meta, dataset = _pydicom_file(ae)
    meta = encode_file_meta(CT_IMAGE, SOP, ExplicitVRLittleEndian, ae)
    assert meta[:132] == b"\0" * 128 + b"DICM"
    ours = pydicom.dcmread(BytesIO(meta + dataset)).file_meta
    theirs = pydicom.dcmread(BytesIO(expected_meta + dataset)).file_meta
    assert ours.FileMetaInformationGroupLength == theirs.FileMetaInformationGroupLength
    assert ours.FileMetaInformationGroupLength == len(meta) - 132 - 12
    for keyword in (
        "FileMetaInformationVersion",
        "MediaStorageSOPClassUID",
        "MediaStorageSOPInstanceUID",
        "TransferSyntaxUID",
        "ImplementationClassUID",
        "ImplementationVersionName",
    ):
        assert ours[keyword].value == theirs[keyword].value, keyword
    assert ours.get("SourceApplicationEntityTitle") == theirs.get("SourceApplicationEntityTitle")
    assert meta == expected_meta


def test_write_instance_from_bytes_and_path(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    rel = instance_path(STUDY, SERIES, SOP)
    stored = store.write_instance(rel, b"HEAD", b"body")
    assert (stored.rel_path, stored.size) == (rel, 8)
    assert store.path(rel).read_bytes() == b"HEADbody"
    assert store.exists(rel)

    source = tmp_path / "spooled"
    source.write_bytes(os.urandom(3 << 20))
    rel2 = instance_path(STUDY, SERIES, "1.2.3.9")
    stored = store.write_instance(rel2, b"HEAD", source)
    assert stored.size == 4 + (3 << 20)
    assert store.path(rel2).read_bytes() == b"HEAD" + source.read_bytes()

    assert sorted(store.iter_files()) == sorted([rel, rel2])
    assert list((tmp_path / "store" / ".tmp").iterdir()) == []
    store.remove(rel)
    store.remove(rel)
    assert not store.exists(rel)


@pytest.mark.parametrize("rel", ["/etc/passwd", "../x.dcm", "a/../../x.dcm", ""])
def test_write_instance_refuses_escaping_paths(tmp_path: Path, rel: str) -> None:
    with pytest.raises(ValueError):
        FileStore(tmp_path).write_instance(rel, b"", b"")


def test_crash_before_rename_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileStore(tmp_path, fsync=False)
    rel = instance_path(STUDY, SERIES, SOP)

    def crash(*_: object) -> None:
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        store.write_instance(rel, b"HEAD", b"body")
    assert not store.exists(rel)
    assert list((tmp_path / ".tmp").iterdir()) == []


def test_cleanup_temp_removes_orphans(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    (tmp_path / ".tmp" / "orphan.part").write_bytes(b"half")
    (tmp_path / ".tmp" / "dir").mkdir()
    assert store.cleanup_temp() == 2
    assert list((tmp_path / ".tmp").iterdir()) == []


def test_ensure_free_space(tmp_path: Path) -> None:
    FileStore(tmp_path).ensure_free_space()
    with pytest.raises(OutOfSpace, match="below the floor"):
        FileStore(tmp_path, min_free_bytes=1 << 60).ensure_free_space()
