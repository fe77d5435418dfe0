"""Rebuild the index from the files in the store (after a lost or restored database)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pydicom import dcmread
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from minipacs.index.ingest import InstanceRecord, apply_record, record_from_dataset
from minipacs.storage.filestore import FileStore

BATCH = 200


@dataclass
class ReindexReport:
    """How many files were indexed, and each file that was not with the reason."""

    indexed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def _reason(exc: BaseException) -> str:
    # One line per failed file: pydicom and database messages can span several lines.
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def read_record(store: FileStore, rel_path: str) -> InstanceRecord:
    """Read a stored file's header and turn it into an index record."""
    path = store.path(rel_path)
    stat = path.stat()
    ds = dcmread(path, stop_before_pixels=True)
    meta = ds.file_meta
    syntax = str(meta.get("TransferSyntaxUID", "") or "")
    if not syntax:
        raise ValueError("file meta has no TransferSyntaxUID")
    return record_from_dataset(
        ds,
        transfer_syntax_uid=syntax,
        rel_path=rel_path,
        size=stat.st_size,
        calling_ae=str(meta.get("SourceApplicationEntityTitle", "") or "").strip(),
        received_at=datetime.fromtimestamp(stat.st_mtime, UTC),
    )


def _commit(engine: Engine, batch: list[InstanceRecord], report: ReindexReport) -> None:
    try:
        with Session(engine) as session, session.begin():
            for record in batch:
                apply_record(session, record, "replace")
        report.indexed += len(batch)
        return
    except SQLAlchemyError:
        pass
    # One record broke the batch's transaction: replay it record by record to find it,
    # so that the good records are still indexed.
    for record in batch:
        try:
            with Session(engine) as session, session.begin():
                apply_record(session, record, "replace")
            report.indexed += 1
        except SQLAlchemyError as exc:
            report.failed.append((record.rel_path, _reason(exc)))


def reindex(
    store: FileStore,
    engine: Engine,
    progress: Callable[[int, int], None] | None = None,
) -> ReindexReport:
    """Index every file of the store (replacing existing rows); report unreadable files."""
    files = sorted(store.iter_files())
    report = ReindexReport()
    batch: list[InstanceRecord] = []
    for done, rel_path in enumerate(files, start=1):
        try:
            batch.append(read_record(store, rel_path))
        # Any file may be damaged in any way pydicom can trip over; each is reported
        # and skipped so one bad file does not stop the rebuild.
        except Exception as exc:
            report.failed.append((rel_path, _reason(exc)))
        if len(batch) >= BATCH:
            _commit(engine, batch, report)
            batch = []
        if progress is not None:
            progress(done, len(files))
    if batch:
        _commit(engine, batch, report)
    return report
