"""Storage Service Class as SCP: C-STORE (PS3.4 Annex B, PS3.7 9.1.1).

A success status goes back only after the file is durable (temp file, fsync, rename,
directory fsync) and its index row is committed. Everything blocking runs in the
storage executor; the index commit is a group commit shared by concurrent stores.

A new file (the usual case) is renamed into place first and flushed while the index
commits: the row is committed listed as unsynced (models.UnsyncedFile), the success goes
back once both are done, and the listing is dropped after. One disk flush is then on
the critical path instead of three (file, folder, index); a power loss in between
leaves a listed row that recovery checks against its file. Over an existing file
("replace") the file is flushed before the rename and before the commit, as it was.

When a SQLite index lives on the store's filesystem and the store flushes by syncfs, the
writer commits without fsync and the store's flush, after the commit, makes row and
file durable together: one flush per store instead of two that contend for the journal.
Commit and flush then run one after the other anyway, so a store with no other in flight
(one association) commits its row in its own thread (IndexWriter.commit_alone): two
thread hand-offs fewer, +4% with one association (bench.ab, 5 rounds).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import secrets
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from minipacs import dataset as dicom
from minipacs.index.db import write_session, write_turn
from minipacs.index.ingest import (
    IngestError,
    IngestOutcome,
    InstanceRecord,
    drop_unsynced,
    instance_path_of,
    record_from_dataset,
    withdraw,
)
from minipacs.index.records import INDEXED_TAGS
from minipacs.index.writer import IndexUnavailable, IndexWriter
from minipacs.net.dimse import DataSet
from minipacs.net.operations import OUT_OF_RESOURCES, SUCCESS, Operation
from minipacs.storage.filestore import FileStore, OutOfSpace, StagedFile
from minipacs.storage.layout import instance_path
from minipacs.storage.meta import encode_file_meta
from minipacs.storage.uids import InvalidUID, validate_uid

log = logging.getLogger("minipacs.store")

# C-STORE statuses, PS3.4 Table B.2-1.
DATASET_DOES_NOT_MATCH: Final = 0xA900
CANNOT_UNDERSTAND: Final = 0xC000
# PS3.7 C.5.x general status, used when the duplicate policy is "reject".
DUPLICATE_SOP_INSTANCE: Final = 0x0111


class StoreRefused(Exception):
    """A C-STORE that fails with a status and an Error Comment; nothing was written."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status


@dataclass(frozen=True)
class _Prepared:
    """A C-STORE-RQ checked and decoded: what its file and its index row will hold."""

    record: InstanceRecord
    rel_path: str
    meta: bytes
    source: bytes | Path


@dataclass
class Written:
    """A file in place (durable, or staged for its flush), and its index record."""

    record: InstanceRecord
    rel_path: str
    # False when the write replaced a file already at rel_path ("replace", or a file that
    # had turned up there): a failing index commit must then leave the file alone.
    fresh: bool
    # Set when the file is in place but still to be flushed (FileStore.sync_staged).
    staged: StagedFile | None = None


class StoreService:
    """Receives C-STORE requests into the file store and the index."""

    def __init__(
        self,
        store: FileStore,
        index: IndexWriter,
        engine: Engine,
        executor: Executor,
        duplicate_policy: str,
    ) -> None:
        self.store = store
        self.index = index
        self.engine = engine
        self.executor = executor
        self.duplicate_policy = duplicate_policy
        # Stores in flight, counted on the event loop: a lone one commits its row itself
        # (IndexWriter.commit_alone). Store threads only read it; a stale read only
        # picks the other, equally correct, path.
        self._in_flight = 0

    async def handle(self, operation: Operation) -> None:
        """Serve one C-STORE-RQ: one executor trip stores it, then the response goes back."""
        loop = asyncio.get_running_loop()
        self._in_flight += 1
        try:
            status, comment = await loop.run_in_executor(self.executor, self._store, operation)
        finally:
            self._in_flight -= 1
        await operation.respond(status, error_comment=comment)

    def _store(self, operation: Operation) -> tuple[int, str | None]:
        """Write, flush and index one instance (blocking); return (status, Error Comment)."""
        try:
            prepared = self._prepare(operation)
        except StoreRefused as refused:
            return refused.status, str(refused)
        except OSError as exc:  # a spooled data set that cannot be read back
            log.exception("store read failed")
            return OUT_OF_RESOURCES, f"cannot read the data set: {exc}"
        with self.store.claim(prepared.rel_path):
            return self._store_claimed(prepared)

    def _store_claimed(self, prepared: _Prepared) -> tuple[int, str | None]:
        """_store once no other thread of ours stores the same path."""
        # Before any lookup or commit: a flush failing from here on may have lost them.
        mark = self.store.flush_mark()
        try:
            written = self._write(prepared)
        except OutOfSpace as exc:
            return OUT_OF_RESOURCES, str(exc)
        except OSError as exc:
            log.exception("store write failed")
            return OUT_OF_RESOURCES, f"cannot write: {exc}"
        except SQLAlchemyError as exc:
            # The duplicate check could not ask the index: nothing was written.
            log.warning("index unavailable before writing: %s", type(exc).__name__)
            return OUT_OF_RESOURCES, "index unavailable"
        if written is None:
            # The row found may be another store's, committed but not yet flushed.
            flush_error = None if self.index.durable_commits else self._flush(None, mark)
            if flush_error is not None:
                return OUT_OF_RESOURCES, f"cannot write: {flush_error}"
            return self._duplicate()
        token = _unsynced_token() if written.staged is not None else None
        committing: Future[IngestOutcome] | IndexUnavailable
        try:
            # A lone store commits its row itself, unless its file flushes meanwhile.
            submit = self.index.commit_alone if self._alone() else self.index.enqueue
            committing = submit(written.record, unsynced=token)
        except IndexUnavailable as exc:
            committing = exc
        # The file flushes while the writer thread commits its row, unless that flush is
        # also what makes the commit durable (IndexWriter.durable_commits): then after it.
        flush_first = self.index.durable_commits
        flush_error = self._flush(written, mark) if flush_first else None
        try:
            if isinstance(committing, IndexUnavailable):
                raise committing
            outcome = committing.result()
        except Exception as exc:
            if not flush_first:
                self._flush(written, mark)  # releases a staged file
            if written.fresh:
                self.store.remove(written.rel_path)
            return OUT_OF_RESOURCES, f"index unavailable: {exc}"
        if not flush_first:
            # Also for a duplicate: the row it found may be another store's, not yet flushed.
            flush_error = self._flush(written, mark)
        if flush_error is not None:
            log.error("store flush failed for %s: %s", written.record.sop_uid, flush_error)
            if outcome.stored and token is not None:
                self._withdraw(written, token)
            elif written.staged is not None or _unindexed(written, outcome):
                self.store.remove(written.rel_path)
            # Otherwise the file was flushed before its commit: row and file agree. A
            # replaced file stays too: if the commit is lost, the old row names it again.
            return OUT_OF_RESOURCES, f"cannot write: {flush_error}"
        if outcome.stale_path:
            self.store.remove(outcome.stale_path)
        if not outcome.stored:
            # The index already held the instance: it was indexed under another path (see
            # _already_stored), or a concurrent store of it won the race for the row.
            if _unindexed(written, outcome):
                self.store.remove(written.rel_path)
            return self._duplicate()
        if token is not None:
            self.index.settle(token)
        return SUCCESS, None

    def _alone(self) -> bool:
        """Whether this store is the only one in flight and commits before its flush."""
        return self._in_flight == 1 and not self.index.durable_commits

    def _flush(self, written: Written | None, mark: int | None) -> OSError | None:
        """Make a staged file durable, and the index's unflushed commits; the error if any.

        `mark` (FileStore.flush_mark) was taken before this store's lookup and commit.
        """
        try:
            if written is not None and written.staged is not None:
                self.store.sync_staged(written.staged)
            elif not self.index.durable_commits:
                self.store.flush_all(since=mark)
        except OSError as exc:
            return exc
        return None

    def _withdraw(self, written: Written, token: str) -> None:
        """Undo a committed row whose file could not be flushed, then remove the file.

        If the index cannot be reached either, the row stays listed as unsynced and the
        file stays: recovery at the next start settles it one way or the other.
        """
        try:
            with write_turn(self.engine), write_session(self.engine) as session, session.begin():
                withdraw(session, written.record.sop_uid, written.rel_path)
                drop_unsynced(session, [token])
        except SQLAlchemyError as exc:
            log.error("cannot withdraw %s: %s", written.record.sop_uid, exc)
            return
        self.store.remove(written.rel_path)

    def _duplicate(self) -> tuple[int, str | None]:
        if self.duplicate_policy == "reject":
            return (
                DUPLICATE_SOP_INSTANCE,
                "SOP Instance UID already stored (duplicate policy: reject)",
            )
        # keep-first: the archive already holds this instance; the sender is done.
        return SUCCESS, None

    def _already_stored(self, rel_path: str, sop_uid: str) -> bool:
        """Whether the index holds an instance; asks it only when a file is at rel_path.

        A new instance, the usual case, has no file at its path yet, so one stat() saves a
        query per store. One indexed under another path (re-sent under another study or
        series) is written, then refused by the index's own duplicate check (_settle).
        """
        if not self.store.exists(rel_path):
            return False
        with Session(self.engine) as session:
            return instance_path_of(session, sop_uid) is not None

    def _prepare(self, operation: Operation) -> _Prepared:
        """Validate and decode one C-STORE-RQ's data set (blocking: executor thread)."""
        command = operation.command
        context = operation.context
        dataset = operation.message.dataset
        if dataset is None:
            raise StoreRefused(CANNOT_UNDERSTAND, "C-STORE-RQ without a data set")
        sop_class = str(command.get("AffectedSOPClassUID", ""))
        if sop_class != context.abstract_syntax:
            raise StoreRefused(
                DATASET_DOES_NOT_MATCH,
                f"SOP Class {sop_class} sent on a {context.abstract_syntax} context",
            )
        try:
            sop_instance = validate_uid(str(command.get("AffectedSOPInstanceUID", "")))
        except InvalidUID as exc:
            raise StoreRefused(CANNOT_UNDERSTAND, f"Affected SOP Instance UID: {exc}") from exc
        source = _source(dataset)
        try:
            inspected = dicom.inspect(source, context.transfer_syntax, INDEXED_TAGS)
        except dicom.DataSetError as exc:
            raise StoreRefused(CANNOT_UNDERSTAND, str(exc)) from exc
        calling_ae = operation.session.calling_ae
        try:
            record = record_from_dataset(
                inspected,
                transfer_syntax_uid=context.transfer_syntax,
                rel_path="",
                size=0,
                calling_ae=calling_ae,
                received_at=datetime.now(UTC),
            )
        except IngestError as exc:
            raise StoreRefused(DATASET_DOES_NOT_MATCH, str(exc)) from exc
        if record.sop_uid != sop_instance:
            raise StoreRefused(DATASET_DOES_NOT_MATCH, "SOP Instance UID differs from the command")
        if record.sop_class_uid != sop_class:
            raise StoreRefused(DATASET_DOES_NOT_MATCH, "SOP Class UID differs from the command")
        try:
            rel_path = instance_path(record.study_uid, record.series_uid, sop_instance)
        except InvalidUID as exc:
            raise StoreRefused(DATASET_DOES_NOT_MATCH, str(exc)) from exc
        meta = encode_file_meta(sop_class, sop_instance, context.transfer_syntax, calling_ae)
        return _Prepared(record, rel_path, meta, source)

    def _write(self, prepared: _Prepared) -> Written | None:
        """Durably write (or stage) a prepared instance under the duplicate policy.

        Returns None when the instance is already stored and the policy keeps or rejects it.
        """
        rel_path = prepared.rel_path
        if self.duplicate_policy != "replace" and self._already_stored(
            rel_path, prepared.record.sop_uid
        ):
            # The file may be another node's, indexed but still being flushed: the
            # duplicate's answer must not precede its durability either.
            self.store.make_durable(rel_path)
            return None
        # "replace" writes over the file of an instance already acknowledged: if the index
        # then fails, that file must stay (it is a valid version of the instance the index
        # still lists), so only a file new at its path is removed again.
        fresh = self.duplicate_policy != "replace" or not self.store.exists(rel_path)
        self.store.ensure_free_space()
        if self.duplicate_policy == "replace":
            # The row committed for this store may replace an acknowledged one: it must
            # not name a file a power loss could still take away.
            stored = self.store.write_instance(rel_path, prepared.meta, prepared.source)
            record = dataclasses.replace(prepared.record, rel_path=rel_path, size=stored.size)
            return Written(record, rel_path, fresh)
        # A lone store commits its row before its flush (durable_commits False), and the
        # device writes its data meanwhile: one association of small instances 1.120x
        # (bench.ab, 7 rounds, 0.92-1.23), CT-size 1.040x (0.92-1.22). With company, the
        # group flush writes many files in one pass, and starting each one's writeback
        # cost more CPU than it saved: 8 associations of small instances, 0.927x (4
        # rounds, 0.81-0.98).
        placed = self.store.stage_instance(
            rel_path, prepared.meta, prepared.source, early_writeback=self._alone()
        )
        record = dataclasses.replace(prepared.record, rel_path=rel_path, size=placed.size)
        if isinstance(placed, StagedFile):
            return Written(record, rel_path, fresh, placed)
        # Flushed, then put in place: over a file that had turned up there (an orphan, or
        # another node's), or without hard links.
        return Written(record, rel_path, fresh=not placed.replaced)


def _unindexed(written: Written, outcome: IngestOutcome) -> bool:
    """Whether a file just written is one the index does not point at (a duplicate's)."""
    return not outcome.stored and written.fresh and written.rel_path != outcome.existing_path


# Unsynced listing tokens: unique across nodes by a random prefix, then counted, since a
# getrandom(2) per store is a GIL hand-off more for every store thread.
_TOKEN_PREFIX = secrets.token_hex(10)
_TOKEN_COUNT = itertools.count()


def _unsynced_token() -> str:
    """A new 32-character token for an unsynced listing."""
    return f"{_TOKEN_PREFIX}{next(_TOKEN_COUNT):012x}"


def _source(dataset: DataSet) -> bytes | Path:
    if dataset.spool_path is not None:
        dataset.spill(dataset.spool_path.parent)
        return dataset.spool_path
    return dataset.getvalue()
