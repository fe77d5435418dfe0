"""Filesystem store: UID validation, layout, File Meta encoding and atomic durable writes."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
import time
from io import BytesIO
from pathlib import Path, PurePosixPath

import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

from minipacs.storage import filestore, writeback
from minipacs.storage.filestore import FileStore, OutOfSpace
from minipacs.storage.layout import instance_path
from minipacs.storage.meta import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    encode_file_meta,
)
from minipacs.storage.uids import InvalidUID, validate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY, SERIES, SOP = "1.2.826.0.1.3680043.9.1", "1.2.826.0.1.3680043.9.1.2", "1.2.3.4.5.6.7"


def _store(tmp_path: Path, **options: object) -> FileStore:
    settings: dict[str, object] = {"min_free_bytes": 0, "fsync": True, **options}
    return FileStore(tmp_path / "store", tmp_path / "spool", **settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1.2.3", "1.2.3"),
        ("0", "0"),
        ("1.0.2", "1.0.2"),
        ("1.2.3\0", "1.2.3"),
        ("1.2.3 ", "1.2.3"),
        ("1." + "2" * 62, "1." + "2" * 62),
        ("1." + "2" * 62 + "\0", "1." + "2" * 62),
    ],
)
def test_valid_uids(value: str, expected: str) -> None:
    assert validate_uid(value) == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("../../etc", "only digits and dots"),
        ("1.2/3", "only digits and dots"),
        ("1.2.3a", "only digits and dots"),
        ("1.2.٣", "only digits and dots"),  # an Arabic-Indic digit is not a PS3.5 9.1 digit
        ("1.2.3\0\0", "only digits and dots"),  # one pad byte at most
        (" 1.2.3", "only digits and dots"),
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
    # Twice: validate_uid keeps the UIDs it passed, never a refusal.
    for _ in range(2):
        with pytest.raises(InvalidUID, match=reason):
            validate_uid(value)


def test_layout_is_deterministic() -> None:
    path = instance_path(STUDY, SERIES, SOP + "\0")
    assert path == instance_path(STUDY, SERIES, SOP)
    parts = PurePosixPath(path).parts
    assert len(parts) == 5
    assert all(len(p) == 2 and set(p) <= set("0123456789abcdef") for p in parts[:2])
    assert parts[2:] == (STUDY, SERIES, SOP + ".dcm")
    # The study decides the fan-out folders, so a study's series stay together.
    assert instance_path(STUDY, "1.2", "3")[:6] == path[:6]


@given(st.text(max_size=70), st.text(max_size=70), st.text(max_size=70))
def test_layout_never_escapes_the_root(study: str, series: str, sop: str) -> None:
    root = Path("/store")
    try:
        path = instance_path(study, series, sop)
    except InvalidUID:
        return
    resolved = (root / path).resolve()
    assert resolved.is_relative_to(root)
    assert len(PurePosixPath(path).parts) == 5
    assert not any(part.startswith(".") for part in PurePosixPath(path).parts)


def _pydicom_meta(transfer_syntax: str, ae: str) -> tuple[bytes, bytes]:
    """(preamble + File Meta, data set) as pydicom writes them."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE
    meta.MediaStorageSOPInstanceUID = SOP
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if ae:
        meta.SourceApplicationEntityTitle = ae
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = SOP
    ds.PatientName = "Doe^Jane"
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    raw = buffer.getvalue()
    end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    return raw[:end], raw[end:]


@pytest.mark.parametrize("ae", ["STORESCU", "ODD", "SIXTEEN_CHARS_AE", ""])
@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit]
)
def test_file_meta_matches_pydicom(ae: str, syntax: str) -> None:
    expected, dataset = _pydicom_meta(syntax, ae)
    meta = encode_file_meta(CT_IMAGE, SOP, syntax, ae)
    assert meta[:132] == b"\0" * 128 + b"DICM"
    ours = pydicom.dcmread(BytesIO(meta + dataset)).file_meta
    theirs = pydicom.dcmread(BytesIO(expected + dataset)).file_meta
    assert ours == theirs
    assert ours.FileMetaInformationGroupLength == len(meta) - 132 - 12
    assert ours.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta == expected


def test_implementation_identity() -> None:
    assert validate_uid(IMPLEMENTATION_CLASS_UID).startswith("2.25.")  # PS3.5 B.2: UUID-derived
    assert IMPLEMENTATION_VERSION_NAME == "MINIPACS_010"


def test_written_file_reads_back_as_the_original(tmp_path: Path) -> None:
    source = Path(get_testdata_file("CT_small.dcm"))
    original = pydicom.dcmread(source)
    raw = source.read_bytes()
    dataset_bytes = raw[132 + 12 + int.from_bytes(raw[140:144], "little") :]
    store = _store(tmp_path)
    rel = instance_path(
        original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID
    )
    meta = encode_file_meta(
        original.SOPClassUID, original.SOPInstanceUID, original.file_meta.TransferSyntaxUID, "CT1"
    )
    stored = store.write_instance(rel, meta, dataset_bytes)
    assert stored.size == len(meta) + len(dataset_bytes)
    with store.open_instance(rel) as handle:
        copy = pydicom.dcmread(handle)
    assert copy.file_meta.SourceApplicationEntityTitle == "CT1"
    assert copy == original


@pytest.mark.parametrize("kind", ["bytes", "memoryview", "chunks", "path"])
def test_write_instance_sources(tmp_path: Path, kind: str) -> None:
    store = _store(tmp_path)
    body = os.urandom(3 << 20)
    spooled = tmp_path / "spool" / "rx-1.spool"
    spooled.write_bytes(body)
    source = {
        "bytes": body,
        "memoryview": memoryview(body),
        "chunks": [body[:1000], body[1000:70000], body[70000:]],
        "path": spooled,
    }[kind]
    rel = instance_path(STUDY, SERIES, SOP)
    stored = store.write_instance(rel, b"HEAD", source)
    assert (stored.rel_path, stored.size) == (rel, 4 + len(body))
    assert store.path(rel).read_bytes() == b"HEAD" + body
    assert store.exists(rel)
    assert list(store.iter_files()) == [rel]
    assert list((tmp_path / "store" / ".tmp").iterdir()) == []


def test_overwrite_and_remove(tmp_path: Path) -> None:
    store = _store(tmp_path, fsync=False)
    rel = instance_path(STUDY, SERIES, SOP)
    store.write_instance(rel, b"", b"old")
    store.write_instance(rel, b"", b"new")
    assert store.path(rel).read_bytes() == b"new"
    store.remove(rel)
    store.remove(rel)
    assert not store.exists(rel)


@pytest.mark.parametrize(
    "rel",
    [
        "/etc/passwd",
        "../x.dcm",
        "a/../../x.dcm",
        "",
        "a//b.dcm",
        ".tmp/x.dcm",
        "a\\..\\b",
        "a/",
        "a/.spool/x",
        "a/b\0.dcm",
        "a/b.dcm\n/..",
        "./a.dcm",
    ],
)
def test_unsafe_relative_paths_are_refused(tmp_path: Path, rel: str) -> None:
    store = _store(tmp_path)
    with pytest.raises(ValueError, match="not a safe relative path"):
        store.write_instance(rel, b"", b"")
    with pytest.raises(ValueError):
        store.open_instance(rel)


def _with_old_file(tmp_path: Path) -> tuple[FileStore, str]:
    """A store holding b"old" at the test instance's path."""
    store = _store(tmp_path)
    rel = instance_path(STUDY, SERIES, SOP)
    store.write_instance(rel, b"", b"old")
    return store, rel


def test_failed_rename_keeps_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, rel = _with_old_file(tmp_path)

    def broken_rename(*_: object) -> None:
        raise OSError("simulated rename failure")

    monkeypatch.setattr(os, "replace", broken_rename)
    with pytest.raises(OSError, match="simulated"):
        store.write_instance(rel, b"", b"new")
    assert store.path(rel).read_bytes() == b"old"
    assert list((tmp_path / "store" / ".tmp").iterdir()) == []


def test_crash_between_write_and_rename(tmp_path: Path) -> None:
    """A process killed before the rename leaves no file at the final path, only an orphan."""
    child = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from minipacs.storage.filestore import FileStore
        store = FileStore(Path({str(tmp_path / "store")!r}), Path({str(tmp_path / "spool")!r}), 0)
        os.replace = lambda *args: os._exit(9)  # the power goes out here
        store.write_instance("ab/cd/1.2/1.2.3/1.2.3.4.dcm", b"HEAD", b"body" * 1000)
        """
    )
    result = subprocess.run([sys.executable, "-c", child], timeout=60, check=False)
    assert result.returncode == 9
    store = _store(tmp_path)
    assert not store.exists("ab/cd/1.2/1.2.3/1.2.3.4.dcm")
    orphans = list((tmp_path / "store" / ".tmp").iterdir())
    assert len(orphans) == 1 and orphans[0].read_bytes() == b"HEAD" + b"body" * 1000
    assert store.cleanup_temp() == 1
    assert list((tmp_path / "store" / ".tmp").iterdir()) == []
    assert list(store.iter_files()) == []
    # The path it was about to rename into place is journalled for the index's recovery.
    (journal,) = store.dead_journals()
    assert journal.rel_paths == ["ab/cd/1.2/1.2.3/1.2.3.4.dcm"]


def test_journals_rotate_and_keep_two(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(filestore, "JOURNAL_ROTATE_SECONDS", -1.0)  # rotate at every write
    store = _store(tmp_path, fsync=False)
    paths = [instance_path(STUDY, SERIES, f"1.2.3.{n}") for n in range(5)]
    for rel in paths:
        store.write_instance(rel, b"", b"x")
    journals = sorted((tmp_path / "store" / ".journals").iterdir())
    assert [j.read_text() for j in journals] == [f"{paths[3]}\n", f"{paths[4]}\n"]
    assert store.dead_journals() == []  # ours, while we run
    store.close()
    assert list((tmp_path / "store" / ".journals").iterdir()) == []


def test_cleanup_temp_spares_live_writers(tmp_path: Path) -> None:
    store = _store(tmp_path)
    tmp = tmp_path / "store" / ".tmp"
    # This process's own in-flight file, and one of a live process on another node.
    own = tmp / f"{filestore.HOST}~{os.getpid()}~{filestore._RUN_TOKEN}~1.part"
    other_node = tmp / "otherhost~123~abcd1234~2.part"
    # Left by an earlier run of this process's PID (a restarted container), by a dead
    # node long ago, and an old spool file; a fresh spool file belongs to a live receive.
    earlier_run = tmp / f"{filestore.HOST}~{os.getpid()}~00000000~3.part"
    dead_node = tmp / "deadhost~77~abcd1234~4.part"
    old_spool = tmp_path / "spool" / "rx-old.spool"
    new_spool = tmp_path / "spool" / "rx-new.spool"
    for path in (own, other_node, earlier_run, dead_node, old_spool, new_spool):
        path.write_bytes(b"x")
    long_ago = time.time() - 2 * filestore.STALE_SECONDS
    os.utime(dead_node, (long_ago, long_ago))
    os.utime(old_spool, (long_ago, long_ago))
    assert store.cleanup_temp() == 3
    assert sorted(p.name for p in tmp.iterdir()) == sorted([own.name, other_node.name])
    assert [p.name for p in (tmp_path / "spool").iterdir()] == [new_spool.name]


def test_ensure_free_space(tmp_path: Path) -> None:
    _store(tmp_path).ensure_free_space()
    with pytest.raises(OutOfSpace, match="below the floor"):
        _store(tmp_path, min_free_bytes=1 << 62).ensure_free_space()


def test_a_passing_free_space_check_stands_for_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(filestore.time, "monotonic", lambda: now[0])
    store = _store(tmp_path)
    store.ensure_free_space()
    store.min_free_bytes = 1 << 62
    store.ensure_free_space()  # within FREE_SPACE_RECHECK of a passing check
    now[0] += filestore.FREE_SPACE_RECHECK
    with pytest.raises(OutOfSpace):
        store.ensure_free_space()
    with pytest.raises(OutOfSpace):
        store.ensure_free_space()  # a failing check is never kept
    store.min_free_bytes = 0
    store.ensure_free_space()


def test_a_folder_removed_behind_the_stores_back_is_made_again(tmp_path: Path) -> None:
    store = _store(tmp_path)
    first = instance_path(STUDY, SERIES, SOP)
    store.write_instance(first, b"", b"one")
    shutil.rmtree(store.path(first).parent.parent)  # the study folder
    second = instance_path(STUDY, SERIES, SOP + ".2")
    store.write_instance(second, b"", b"two")
    assert store.path(second).read_bytes() == b"two"
    assert list(store.iter_files()) == [second]
    assert list((tmp_path / "store" / ".tmp").iterdir()) == []


def test_iter_files_skips_temp_spool_and_foreign_files(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store", tmp_path / "store" / "incoming", 0, fsync=False)
    rel = instance_path(STUDY, SERIES, SOP)
    store.write_instance(rel, b"", b"x")
    (tmp_path / "store" / "incoming" / "rx.dcm").write_bytes(b"x")
    (tmp_path / "store" / ".tmp" / "a.dcm").write_bytes(b"x")
    (tmp_path / "store" / "notes.txt").write_bytes(b"x")
    assert list(store.iter_files()) == [rel]


@pytest.mark.parametrize("flush", ["file", "filesystem"])
def test_a_staged_file_is_in_place_before_its_flush_and_durable_after(
    tmp_path: Path, flush: str
) -> None:
    store = FileStore(tmp_path / "store", tmp_path / "spool", 0, flush=flush)
    rel = instance_path(STUDY, SERIES, SOP)
    staged = store.stage_instance(rel, b"meta", b"data")
    assert isinstance(staged, filestore.StagedFile)
    # Readers see the whole file at once (it was linked in complete).
    assert store.path(rel).read_bytes() == b"metadata"
    stored = store.sync_staged(staged)
    assert (stored.rel_path, stored.size) == (rel, 8)
    assert list((tmp_path / "store" / ".tmp").iterdir()) == []
    store.close()


@pytest.mark.parametrize(("early", "fsync"), [(True, True), (False, True), (True, False)])
def test_early_writeback_starts_on_the_staged_file_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, early: bool, fsync: bool
) -> None:
    store = _store(tmp_path, flush="filesystem", fsync=fsync)
    rel = instance_path(STUDY, SERIES, SOP)
    started: list[bool] = []

    def start(fd: int) -> bool:
        # The real call, on the temp file just written, before it is linked into place.
        assert os.fstat(fd).st_size == len(b"metadata")
        assert not store.path(rel).exists()
        started.append(real_start(fd))
        return started[-1]

    real_start = writeback.start
    monkeypatch.setattr(writeback, "start", start)
    staged = store.stage_instance(rel, b"meta", b"data", early_writeback=early)
    assert isinstance(staged, filestore.StagedFile)
    # Linux queues the writeback; without fsync nothing is to be flushed, so nothing is
    # started. The file is the same either way.
    assert started == ([sys.platform.startswith("linux")] if early and fsync else [])
    store.sync_staged(staged)
    assert store.path(rel).read_bytes() == b"metadata"
    store.close()


def test_staging_onto_an_existing_file_replaces_it_flushed_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, rel = _with_old_file(tmp_path)
    flushed: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (flushed.append(fd), real_fsync(fd))[1])
    placed = store.stage_instance(rel, b"", b"new")
    # Never linked over the old file: flushed, then renamed over it, like write_instance.
    assert isinstance(placed, filestore.StoredFile)
    assert flushed
    assert store.path(rel).read_bytes() == b"new"
    assert list((tmp_path / "store" / ".tmp").iterdir()) == []


def test_without_hard_links_files_are_flushed_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(tmp_path)

    def no_links(*_: object) -> None:
        raise OSError(errno.EPERM, "simulated filesystem without hard links")

    monkeypatch.setattr(os, "link", no_links)
    for n, sop in enumerate((SOP, SOP + ".1")):
        rel = instance_path(STUDY, SERIES, sop)
        placed = store.stage_instance(rel, b"", b"data")
        # Durable already, and not a replacement: a failing index may remove it again.
        assert isinstance(placed, filestore.StoredFile) and not placed.replaced, n
        assert store.path(rel).read_bytes() == b"data"
    assert list((tmp_path / "store" / ".tmp").iterdir()) == []


def test_exists_answers_only_for_nothing_there_and_raises_otherwise(tmp_path: Path) -> None:
    # An error that says nothing of the file (ESTALE on a shared store, say) must not
    # read as "no file": a file already acknowledged would then be taken for a new one.
    store = FileStore(tmp_path / "store", tmp_path / "spool", 0, fsync=False)
    store.write_instance("a/b.dcm", b"meta", b"data")
    assert store.exists("a/b.dcm")
    assert not store.exists("a/c.dcm")
    assert not store.exists("a/b.dcm/c.dcm")  # ENOTDIR
    (tmp_path / "store" / "d").mkdir()
    assert not store.exists("d")  # a folder is no stored file
    with pytest.raises(OSError) as raised:
        store.exists("a/" + "x" * 300)
    assert raised.value.errno == errno.ENAMETOOLONG
