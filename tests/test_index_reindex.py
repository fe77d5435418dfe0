"""Rebuilding the index from the store, with unreadable files among good ones."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_file
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from minipacs.index.db import make_engine
from minipacs.index.models import Instance, Patient
from minipacs.index.reindex import reindex
from minipacs.index.stats import counts
from minipacs.storage.filestore import FileStore
from minipacs.storage.layout import instance_path
from minipacs.storage.meta import encode_file_meta

SOURCES = [
    get_testdata_file("CT_small.dcm"),
    get_testdata_file("MR_small.dcm"),
    get_charset_files("chrX1.dcm")[0],
]


def _store_file(store: FileStore, source: str, study: str | None = None) -> str:
    """Store a pydicom test file the way the C-STORE service does; return its path."""
    raw = Path(source).read_bytes()
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    body = raw[132 + 12 + int.from_bytes(raw[140:144], "little") :]
    rel = instance_path(study or ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    meta = encode_file_meta(
        ds.SOPClassUID, ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID, "MODALITY"
    )
    store.write_instance(rel, meta, body)
    return rel


@pytest.fixture
def engine(db_url: str) -> Engine:
    """An engine on the test's fresh database."""
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def test_reindex_reports_unreadable_files_and_keeps_going(tmp_path: Path, engine: Engine) -> None:
    store = FileStore(tmp_path / "store", tmp_path / "spool", 0, fsync=False)
    good = [_store_file(store, source) for source in SOURCES]
    store.write_instance("00/00/1.2/1.2.3/1.2.3.4.dcm", b"", b"not DICOM at all" * 8)
    store.write_instance("00/00/1.2/1.2.3/1.2.3.5.dcm", b"", b"")
    # A stale copy of the CT under another study: older, so the newer file wins.
    stale = _store_file(store, SOURCES[0], study="1.2.826.0.1.3680043.9.7")
    os.utime(store.path(stale), (1_000_000, 1_000_000))
    calls: list[tuple[int, int]] = []

    report = reindex(store, engine, progress=lambda done, total: calls.append((done, total)))

    assert report.files == 6
    assert report.indexed == 3
    assert report.superseded == [stale]
    assert sorted(path for path, _ in report.failed) == [
        "00/00/1.2/1.2.3/1.2.3.4.dcm",
        "00/00/1.2/1.2.3/1.2.3.5.dcm",
    ]
    assert all("cannot be read" in reason for _, reason in report.failed)
    assert calls[-1] == (6, 6)
    with Session(engine) as session:
        assert sorted(session.scalars(select(Instance.rel_path))) == sorted(good)
        assert session.scalars(select(Instance.calling_ae)).all() == ["MODALITY"] * 3
        names = set(session.scalars(select(Patient.patient_name)))
    assert "Wang^XiaoDong=王^小東" in names
    sizes = sum(store.path(rel).stat().st_size for rel in good)
    assert counts(engine) == {
        "patients": 3,
        "studies": 3,
        "series": 3,
        "instances": 3,
        "bytes": sizes,
    }


def test_reindex_twice_gives_the_same_index(tmp_path: Path, engine: Engine) -> None:
    store = FileStore(tmp_path / "store", tmp_path / "spool", 0, fsync=False)
    for source in SOURCES:
        _store_file(store, source)
    first = reindex(store, engine, batch_size=2)
    before = counts(engine)
    store.remove(_store_file(store, SOURCES[1]))
    second = reindex(store, engine)
    assert (first.indexed, second.indexed) == (3, 2)
    assert counts(engine)["instances"] == before["instances"] - 1
    assert second.failed == []
