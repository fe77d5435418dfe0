"""Crash recovery: a writer dies between renaming files into place and committing them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_file
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from minipacs.index.db import make_engine, write_session
from minipacs.index.ingest import apply_records
from minipacs.index.models import Instance
from minipacs.index.recover import recover
from minipacs.index.reindex import read_record
from minipacs.storage.filestore import FileStore
from minipacs.storage.layout import instance_path

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")
X1 = get_charset_files("chrX1.dcm")[0]
OTHER_STUDY = "1.2.826.0.1.3680043.9.7"

# Writes files the way the C-STORE service does, prints their paths, then dies unannounced.
WRITER = """
import os, sys
from pathlib import Path
import pydicom
from minipacs.storage.filestore import FileStore
from minipacs.storage.layout import instance_path
from minipacs.storage.meta import encode_file_meta

store = FileStore(Path(sys.argv[1]), Path(sys.argv[2]), 0)
for item in sys.argv[3:]:
    source, _, study = item.partition("@")
    raw = Path(source).read_bytes()
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    body = raw[132 + 12 + int.from_bytes(raw[140:144], "little"):]
    rel = instance_path(study or ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    meta = encode_file_meta(ds.SOPClassUID, ds.SOPInstanceUID,
                            ds.file_meta.TransferSyntaxUID, "CRASHED")
    store.write_instance(rel, meta, body)
    print(rel, flush=True)
os._exit(0)
"""


def _write_and_die(tmp_path: Path, *items: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WRITER), str(tmp_path / "store"),
         str(tmp_path / "spool"), *items],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return result.stdout.split()


def _commit(store: FileStore, engine: Engine, rel_path: str) -> None:
    with write_session(engine) as session, session.begin():
        apply_records(session, [read_record(store, rel_path)], "keep-first")


@pytest.fixture
def engine(db_url: str) -> Engine:
    """An engine on the test's fresh database."""
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def test_orphans_of_a_dead_writer_are_indexed_or_removed(tmp_path: Path, engine: Engine) -> None:
    store = FileStore(tmp_path / "store", tmp_path / "spool", 0, fsync=False)
    # Indexed long ago; the dead writer then re-sent it under another study ("replace").
    ct = pydicom.dcmread(CT, stop_before_pixels=True)
    _write_and_die(tmp_path, CT)
    original = instance_path(ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID)
    _commit(store, engine, original)
    recover(store, engine)  # the first writer's journal: nothing to do

    committed, orphan, moved = _write_and_die(tmp_path, X1, MR, f"{CT}@{OTHER_STUDY}")
    _commit(store, engine, committed)  # the one commit that made it before the crash
    assert len(store.dead_journals()) == 1

    report = recover(store, engine)

    assert report.checked == 3
    assert report.indexed == [orphan]
    assert report.removed == [moved]
    assert report.failed == []
    assert store.dead_journals() == []
    with Session(engine) as session:
        indexed = set(session.scalars(select(Instance.rel_path)))
        assert (
            session.scalars(select(Instance.calling_ae).where(Instance.rel_path == orphan)).one()
            == "CRASHED"
        )
    assert indexed == set(store.iter_files()) == {original, committed, orphan}
    assert recover(store, engine).checked == 0


def test_a_live_writers_journal_is_left_alone(tmp_path: Path, engine: Engine) -> None:
    store = FileStore(tmp_path / "store", tmp_path / "spool", 0, fsync=False)
    ct = pydicom.dcmread(CT, stop_before_pixels=True)
    rel = instance_path(ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID)
    store.write_instance(rel, b"", b"in flight: its commit is still to come")
    assert store.dead_journals() == []
    assert recover(store, engine).checked == 0
    assert store.exists(rel)
    store.close()
    assert list((tmp_path / "store" / ".journals").iterdir()) == []
