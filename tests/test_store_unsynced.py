"""Rows committed while their file was still flushing (models.UnsyncedFile).

A new instance file is put in place, then flushed while its index row commits listed as
unsynced. These tests play the power loss that this leaves open (the listed row durable,
its file short or gone), a flush that fails, and the settling of listings after success.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import fcntl
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from sqlalchemy import Engine, delete, func, insert, select
from sqlalchemy.orm import Session

from minipacs.app import build_server, open_archive
from minipacs.config import Settings, load_settings
from minipacs.index import recover as recover_module
from minipacs.index import schema
from minipacs.index.db import make_engine, share_writes, write_lock_path
from minipacs.index.fastpath import FastPath
from minipacs.index.models import Instance, Series, Study, UnsyncedFile
from minipacs.index.records import InstanceRecord
from minipacs.index.recover import recover
from minipacs.index.writer import IndexWriter
from minipacs.services.store import StoreService, _Prepared
from minipacs.storage import groupflush
from minipacs.storage.filestore import WRITER_ID, FileStore, StagedFile
from minipacs.storage.groupflush import GroupFlush
from minipacs.storage.layout import instance_path
from minipacs.storage.meta import encode_file_meta
from tests.servers import free_port
from tests.test_index import _record

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")
RT = get_testdata_file("rtdose.dcm")

# Stores files the way the C-STORE service does (staged, committed listed as unsynced,
# flushed), prints their paths, then dies before settling any listing.
WRITER = """
import asyncio, os, sys, secrets
from datetime import UTC, datetime
from pathlib import Path
from minipacs.dataset import read_part10
from minipacs.index.db import make_engine
from minipacs.index.records import INDEXED_TAGS, record_from_dataset
from minipacs.index.writer import IndexWriter
from minipacs.storage.filestore import FileStore
from minipacs.storage.layout import instance_path
from minipacs.storage.meta import encode_file_meta

store = FileStore(Path(sys.argv[1]), Path(sys.argv[2]), 0, fsync=False)
writer = IndexWriter(make_engine(sys.argv[3]), "keep-first")
writer.start()
for source in sys.argv[4:]:
    meta, inspected = read_part10(Path(source), INDEXED_TAGS)
    ds = inspected.dataset
    raw = Path(source).read_bytes()
    body = raw[132 + 12 + int.from_bytes(raw[140:144], "little"):]
    rel = instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    file_meta = encode_file_meta(
        ds.SOPClassUID, ds.SOPInstanceUID, str(meta.TransferSyntaxUID), "FLUSHING"
    )
    staged = store.stage_instance(rel, file_meta, body)
    record = record_from_dataset(
        ds, header=inspected.header, transfer_syntax_uid=str(meta.TransferSyntaxUID),
        rel_path=rel, size=staged.size, calling_ae="FLUSHING", received_at=datetime.now(UTC),
    )
    writer.enqueue(record, unsynced=secrets.token_hex(16)).result(30)
    store.sync_staged(staged)
    print(rel, flush=True)
os._exit(0)
"""


@pytest.fixture
def engine(db_url: str) -> Engine:
    """An engine on the test's fresh database."""
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def _store_and_die(tmp_path: Path, db_url: str, *sources: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WRITER), str(tmp_path / "store"),
         str(tmp_path / "spool"), db_url, *sources],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return result.stdout.split()


def _counts(engine: Engine) -> tuple[int, int, int]:
    with Session(engine) as session:
        return (
            session.scalar(select(func.count()).select_from(Instance)) or 0,
            session.scalar(select(func.coalesce(func.sum(Study.num_instances), 0))) or 0,
            session.scalar(select(func.count()).select_from(UnsyncedFile)) or 0,
        )


def test_power_loss_before_the_flush_withdraws_rows_whose_file_is_short_or_gone(
    tmp_path: Path, db_url: str, engine: Engine
) -> None:
    store = FileStore(tmp_path / "store", tmp_path / "spool", 0, fsync=False)
    whole, short, gone = _store_and_die(tmp_path, db_url, CT, MR, RT)
    assert _counts(engine) == (3, 3, 3)
    # What a power loss before the flush can leave: data cut short, or no entry at all.
    path = store.path(short)
    path.write_bytes(path.read_bytes()[:-1000])
    store.path(gone).unlink()

    report = recover(store, engine)

    assert report.checked >= 3
    assert sorted(report.withdrawn) == sorted([short, gone])
    assert _counts(engine) == (1, 1, 0)
    with Session(engine) as session:
        assert list(session.scalars(select(Instance.rel_path))) == [whole]
        # The emptied series and studies went with their only instance.
        assert session.scalar(select(func.count()).select_from(Series)) == 1
    assert list(store.iter_files()) == [whole]
    assert recover(store, engine).withdrawn == []


def test_recovery_reads_a_file_outside_the_shared_write_turn(
    tmp_path: Path, db_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Worker mode: other workers commit while one recovers what a dead one left, and
    # their turns must not wait for a walk of the file.
    if not db_url.startswith("sqlite"):
        pytest.skip("only SQLite writers take turns")
    share_writes(engine)
    store = FileStore(tmp_path / "store", tmp_path / "spool", 0, fsync=False)
    _store_and_die(tmp_path, db_url, CT)
    lock_path = write_lock_path(engine)
    assert lock_path is not None
    probe = os.open(lock_path, os.O_RDWR)
    turn_free: list[bool] = []
    real = recover_module._is_whole

    def is_whole(*args: Any) -> bool | None:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            turn_free.append(False)
        else:
            fcntl.flock(probe, fcntl.LOCK_UN)
            turn_free.append(True)
        return real(*args)

    monkeypatch.setattr(recover_module, "_is_whole", is_whole)
    try:
        report = recover(store, engine)
    finally:
        os.close(probe)
    assert report.withdrawn == []
    assert turn_free == [True]
    assert _counts(engine) == (1, 1, 0)


def test_listings_of_live_writers_and_other_hosts_are_left_alone(
    tmp_path: Path, db_url: str, engine: Engine
) -> None:
    store = FileStore(tmp_path / "store", tmp_path / "spool", 0, fsync=False)
    (rel,) = _store_and_die(tmp_path, db_url, CT)
    store.path(rel).unlink()  # were these listings dead writers', this row would go
    with Session(engine) as session, session.begin():
        session.execute(delete(UnsyncedFile))
        session.execute(
            insert(UnsyncedFile),
            [
                {"token": "a" * 32, "rel_path": rel, "sop_uid": "1.2", "writer": WRITER_ID},
                {"token": "b" * 32, "rel_path": rel, "sop_uid": "1.2", "writer": "elsewhere~1~x"},
            ],
        )
    report = recover(store, engine)
    assert report.withdrawn == []
    assert _counts(engine) == (1, 1, 2)


def _settings(tmp_path: Path, db_url: str) -> Settings:
    return load_settings(
        None,
        {
            "MINIPACS_SERVER_HOST": "127.0.0.1",
            "MINIPACS_SERVER_PORT": str(free_port()),
            "MINIPACS_STORAGE_PATH": str(tmp_path / "store"),
            "MINIPACS_STORAGE_MIN_FREE_BYTES": "0",
            "MINIPACS_DATABASE_URL": db_url,
        },
    )


def _c_store(port: int, path: str, calling_ae: str = "FLUSHTEST") -> int:
    """One C-STORE with pynetdicom; its status."""
    ds = pydicom.dcmread(path)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="MINIPACS")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def _serve_one_store(tmp_path: Path, db_url: str, path: str) -> int:
    async def scenario() -> int:
        settings = _settings(tmp_path, db_url)
        archive = await asyncio.to_thread(open_archive, settings)
        server = build_server(settings, archive)
        await server.start()
        try:
            return await asyncio.wait_for(asyncio.to_thread(_c_store, server.port, path), 60)
        finally:
            await server.shutdown(1.0)
            await archive.close()

    return asyncio.run(scenario())


def test_a_stored_instance_leaves_no_listing(tmp_path: Path, db_url: str, engine: Engine) -> None:
    assert _serve_one_store(tmp_path, db_url, CT) == 0x0000
    # Settling rides on later commits, or on the writer's close at the latest.
    assert _counts(engine) == (1, 1, 0)


def test_a_failed_flush_answers_out_of_resources_and_keeps_nothing(
    tmp_path: Path, db_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_flush(self: FileStore, staged: object) -> None:
        import os

        os.close(staged.fd)  # type: ignore[attr-defined]
        raise OSError(errno.EIO, "simulated I/O error")

    monkeypatch.setattr(FileStore, "sync_staged", failing_flush)
    assert _serve_one_store(tmp_path, db_url, CT) == 0xA700
    assert _counts(engine) == (0, 0, 0)
    store = FileStore(tmp_path / "store", tmp_path / "spool", 0, fsync=False)
    assert list(store.iter_files()) == []


def test_the_same_instance_stored_twice_at_once_is_answered_after_it_is_durable(
    tmp_path: Path, db_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first store is held in its flush; a retry of it arriving meanwhile must neither
    # be told "stored" before that flush ends nor put its own file under the first's row.
    real_sync = FileStore.sync_staged
    flushed_at: list[float] = []

    def slow_sync(self: FileStore, staged: StagedFile) -> object:
        time.sleep(1.0)
        result = real_sync(self, staged)
        flushed_at.append(time.monotonic())
        return result

    monkeypatch.setattr(FileStore, "sync_staged", slow_sync)

    async def scenario() -> list[tuple[int, float]]:
        settings = _settings(tmp_path, db_url)
        archive = await asyncio.to_thread(open_archive, settings)
        server = build_server(settings, archive)
        await server.start()

        def timed(calling_ae: str) -> tuple[int, float]:
            status = _c_store(server.port, CT, calling_ae)
            return status, time.monotonic()

        try:
            first = asyncio.create_task(asyncio.to_thread(timed, "FIRSTTRY"))
            await asyncio.sleep(0.3)
            second = asyncio.create_task(asyncio.to_thread(timed, "RETRY"))
            return list(await asyncio.wait_for(asyncio.gather(first, second), 60))
        finally:
            await server.shutdown(1.0)
            await archive.close()

    (status1, _), (status2, answered2) = asyncio.run(scenario())
    assert (status1, status2) == (0x0000, 0x0000)
    assert len(flushed_at) == 1  # keep-first: the retry wrote nothing
    assert answered2 >= flushed_at[0]
    assert _counts(engine) == (1, 1, 0)
    store = FileStore(tmp_path / "store", tmp_path / "spool", 0, fsync=False)
    with Session(engine) as session:
        rel_path, size = session.execute(select(Instance.rel_path, Instance.size)).one()
    assert store.path(rel_path).stat().st_size == size
    assert pydicom.dcmread(store.path(rel_path)).file_meta.SourceApplicationEntityTitle == (
        "FIRSTTRY"
    )


def test_a_sqlite_commit_is_flushed_by_the_store_after_it(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the SQLite index on the store's filesystem, the writer commits without fsync
    # and the store's syncfs, which the answer waits for, must begin after that commit.
    if groupflush.unsupported(tmp_path):
        pytest.skip(f"no group flush here: {groupflush.unsupported(tmp_path)}")
    events: list[str] = []
    real_flush, real_commit = GroupFlush.flush, FastPath.commit

    def flush(self: GroupFlush, since: int | None = None) -> None:
        events.append("flush")
        real_flush(self, since)

    def commit(self: FastPath, *args: object) -> object:
        outcomes = real_commit(self, *args)  # type: ignore[arg-type]
        events.append("commit")
        return outcomes

    monkeypatch.setattr(GroupFlush, "flush", flush)
    monkeypatch.setattr(FastPath, "commit", commit)
    sqlite = db_url.startswith("sqlite")

    async def scenario() -> int:
        settings = _settings(tmp_path, db_url)
        archive = await asyncio.to_thread(open_archive, settings)
        assert archive.writer.durable_commits is not sqlite
        server = build_server(settings, archive)
        await server.start()
        try:
            # A first instance creates its series; the second is the usual case, a new
            # instance in a known series.
            assert await asyncio.to_thread(_c_store, server.port, CT) == 0x0000
            events.clear()
            second = tmp_path / "second.dcm"
            ds = pydicom.dcmread(CT)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ds.SOPInstanceUID}.2"
            ds.save_as(second)
            return await asyncio.wait_for(asyncio.to_thread(_c_store, server.port, str(second)), 60)
        finally:
            await server.shutdown(1.0)
            await archive.close()

    assert asyncio.run(scenario()) == 0x0000
    if sqlite:
        assert events[:2] == ["commit", "flush"]
    engine = make_engine(db_url)
    try:
        assert _counts(engine) == (2, 2, 0)
    finally:
        engine.dispose()


def test_a_duplicate_is_answered_after_a_flush_of_the_row_it_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Relaxed commits: store A's row is committed, its flush not yet begun, when the same
    # instance arrives under another series (store B, nothing staged). B's keep-first
    # Success vouches for A's row, so it must wait for a flush begun after A's commit.
    if groupflush.unsupported(tmp_path):
        pytest.skip(f"no group flush here: {groupflush.unsupported(tmp_path)}")
    database = tmp_path / "index.sqlite"
    url = f"sqlite:///{database}"
    schema.upgrade(url)
    engine = make_engine(url)
    store = FileStore(tmp_path / "store", tmp_path / "spool", 0, True, "filesystem")
    store._links = False  # as without hard links: nothing is staged, flushes are flush_all
    writer = IndexWriter(engine, "keep-first", durable_commits=False)
    writer.start()
    service = StoreService(store, writer, engine, None, "keep-first")  # type: ignore[arg-type]
    base = _record()  # CT_small.dcm
    assert service._store_claimed(_prepared(base)) == (0x0000, None)
    events: list[str] = []
    a_flushing, release_a = threading.Event(), threading.Event()
    real_flush = GroupFlush.flush

    def flush(self: GroupFlush, since: int | None = None) -> None:
        events.append(f"{threading.current_thread().name} flush")
        if threading.current_thread().name == "A":
            a_flushing.set()
            release_a.wait(10)
        real_flush(self, since)

    monkeypatch.setattr(GroupFlush, "flush", flush)
    first = dataclasses.replace(base, sop_uid=f"{base.sop_uid}.5")
    again = dataclasses.replace(first, series_uid=f"{base.series_uid}.9")
    answers: dict[str, object] = {}
    a = threading.Thread(
        target=lambda: answers.update(a=service._store_claimed(_prepared(first))), name="A"
    )
    try:
        a.start()
        assert a_flushing.wait(10)  # A's row committed, A held before its syncfs
        answers["b"] = service._store_claimed(_prepared(again))
        events.append("B answered")
        release_a.set()
        a.join(10)
        assert answers == {"a": (0x0000, None), "b": (0x0000, None)}
        assert events == ["A flush", "MainThread flush", "B answered"]
    finally:
        release_a.set()
        asyncio.run(writer.close())
        store.close()
        engine.dispose()


def _prepared(record: InstanceRecord) -> _Prepared:
    """What StoreService._prepare makes of a data set (its body is not read here)."""
    rel_path = instance_path(record.study_uid, record.series_uid, record.sop_uid)
    meta = encode_file_meta(record.sop_class_uid, record.sop_uid, record.transfer_syntax, "TEST")
    return _Prepared(dataclasses.replace(record, rel_path=rel_path), rel_path, meta, b"\0" * 64)


@pytest.mark.parametrize(
    ("in_flight", "durable_commits", "early"),
    [(1, False, True), (2, False, False), (1, True, False)],
)
def test_only_a_lone_store_that_commits_before_its_flush_starts_writeback_early(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    in_flight: int,
    durable_commits: bool,
    early: bool,
) -> None:
    # With company the group flush writes every file in one pass; with durable commits
    # the flush begins at once, so there is nothing for an early writeback to overlap.
    store = FileStore(tmp_path / "store", tmp_path / "spool", 0, True, "filesystem")
    asked: list[bool] = []
    real_stage = store.stage_instance

    def stage(*args: Any, early_writeback: bool = False) -> Any:
        asked.append(early_writeback)
        return real_stage(*args, early_writeback=early_writeback)

    monkeypatch.setattr(store, "stage_instance", stage)
    index = type("Index", (), {"durable_commits": durable_commits})()
    service = StoreService(store, index, None, None, "keep-first")  # type: ignore[arg-type]
    service._in_flight = in_flight
    written = service._write(_prepared(_record()))
    assert written is not None and isinstance(written.staged, StagedFile)
    store.sync_staged(written.staged)
    assert asked == [early]
    store.close()
