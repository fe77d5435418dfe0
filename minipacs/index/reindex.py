"""Rebuild the index from the files in the store (after losing or restoring the database)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import Engine, delete

from minipacs.dataset import read_part10
from minipacs.index.db import write_session
from minipacs.index.ingest import InstanceRecord, apply_records, record_from_dataset
from minipacs.index.models import Instance, Patient, Series, Study, UnsyncedFile
from minipacs.index.records import INDEXED_TAGS
from minipacs.storage.filestore import FileStore


@dataclass
class ReindexReport:
    """What a reindex found: files seen, rows written, and the files it had to skip."""

    files: int = 0
    indexed: int = 0
    # Files holding a SOP Instance UID that a newer file also holds: left on disk, not indexed.
    superseded: list[str] = field(default_factory=list)
    # (relative path, reason) of files that could not be read or indexed.
    failed: list[tuple[str, str]] = field(default_factory=list)


def read_record(
    store: FileStore, rel_path: str, stat: os.stat_result | None = None
) -> InstanceRecord:
    """The index record of one stored file, from its File Meta and header."""
    path = store.path(rel_path)
    stat = stat or path.stat()
    meta, inspected = read_part10(path, INDEXED_TAGS)
    return record_from_dataset(
        inspected,
        transfer_syntax_uid=str(meta.TransferSyntaxUID),
        rel_path=rel_path,
        size=stat.st_size,
        calling_ae=str(meta.get("SourceApplicationEntityTitle", "") or ""),
        received_at=datetime.fromtimestamp(stat.st_mtime, UTC),
    )


def _commit(engine: Engine, items: list[tuple[str, InstanceRecord]], report: ReindexReport) -> None:
    """Index a batch in one transaction; if that fails, each file in its own."""
    try:
        with write_session(engine) as session, session.begin():
            outcomes = apply_records(session, [record for _, record in items], "replace")
    except Exception as exc:
        if len(items) == 1:
            report.failed.append((items[0][0], f"cannot be indexed: {exc}"))
            return
        for item in items:
            _commit(engine, [item], report)
        return
    for outcome in outcomes:
        if outcome.stale_path:
            # A newer file took over a row this reindex wrote: the row count is unchanged.
            report.superseded.append(outcome.stale_path)
        else:
            report.indexed += 1


def reindex(
    store: FileStore,
    engine: Engine,
    progress: Callable[[int, int], None] | None = None,
    *,
    clear: bool = True,
    batch_size: int = 200,
) -> ReindexReport:
    """Index every file in the store (the index is emptied first unless clear=False).

    Files are taken oldest first under the "replace" policy, so when two files hold one
    SOP Instance UID the newer wins, as it did when it was received. Unreadable files are
    reported, never fatal. progress(done, total) is called after each batch.
    """
    report = ReindexReport()
    found: list[tuple[float, str, os.stat_result]] = []
    for rel_path in store.iter_files():
        try:
            stat = store.path(rel_path).stat()
        except OSError as exc:
            report.failed.append((rel_path, f"cannot be read: {exc}"))
            continue
        found.append((stat.st_mtime, rel_path, stat))
    found.sort(key=lambda item: item[:2])
    total = report.files = len(found) + len(report.failed)
    if clear:
        with write_session(engine) as session, session.begin():
            # Unsynced listings name rows of the index being rebuilt from the files.
            for model in (UnsyncedFile, Instance, Series, Study, Patient):
                session.execute(delete(model))
    done = len(report.failed)
    for start in range(0, len(found), batch_size):
        items: list[tuple[str, InstanceRecord]] = []
        for _, rel_path, stat in found[start : start + batch_size]:
            try:
                items.append((rel_path, read_record(store, rel_path, stat)))
            except Exception as exc:  # any unreadable file is reported, never fatal
                report.failed.append((rel_path, f"cannot be read: {exc}"))
        if items:
            _commit(engine, items, report)
        done += len(found[start : start + batch_size])
        if progress is not None:
            progress(done, total)
    return report
