"""Storage Service Class as SCP: C-STORE (PS3.4 Annex B, PS3.7 9.1.1).

A success status goes back only after the file is durable (temp file, fsync, rename,
directory fsync) and its index row is committed. Everything blocking runs in the
storage executor; the index commit is a group commit shared by concurrent stores.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from minipacs import dataset as dicom
from minipacs.index.ingest import (
    IngestError,
    IngestOutcome,
    InstanceRecord,
    instance_path_of,
    record_from_dataset,
)
from minipacs.index.records import INDEXED_TAGS
from minipacs.index.writer import IndexWriter
from minipacs.net.dimse import DataSet
from minipacs.net.operations import OUT_OF_RESOURCES, SUCCESS, Operation
from minipacs.storage.filestore import FileStore, OutOfSpace
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


@dataclass
class Written:
    """A file made durable, and the index record that describes it."""

    record: InstanceRecord
    rel_path: str
    # False when the write replaced a file already at rel_path (duplicate policy "replace").
    fresh: bool


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

    async def handle(self, operation: Operation) -> None:
        """Serve one C-STORE-RQ."""
        loop = asyncio.get_running_loop()
        try:
            written = await loop.run_in_executor(self.executor, self._write, operation)
        except StoreRefused as refused:
            await operation.respond(refused.status, error_comment=str(refused))
            return
        except OutOfSpace as exc:
            await operation.respond(OUT_OF_RESOURCES, error_comment=str(exc))
            return
        except OSError as exc:
            log.exception("store write failed")
            await operation.respond(OUT_OF_RESOURCES, error_comment=f"cannot write: {exc}")
            return
        except SQLAlchemyError as exc:
            # The duplicate check could not ask the index: nothing was written.
            log.warning("index unavailable before writing: %s", type(exc).__name__)
            await operation.respond(OUT_OF_RESOURCES, error_comment="index unavailable")
            return
        if written is None:
            await self._refuse_duplicate(operation)
            return
        try:
            outcome = await self.index.submit(written.record)
        except Exception as exc:
            if written.fresh:
                await loop.run_in_executor(self.executor, self.store.remove, written.rel_path)
            await operation.respond(OUT_OF_RESOURCES, error_comment=f"index unavailable: {exc}")
            return
        await self._settle(operation, written, outcome)

    async def _refuse_duplicate(self, operation: Operation) -> None:
        if self.duplicate_policy == "reject":
            await operation.respond(
                DUPLICATE_SOP_INSTANCE,
                error_comment="SOP Instance UID already stored (duplicate policy: reject)",
            )
        else:
            # keep-first: the archive already holds this instance; the sender is done.
            await operation.respond(SUCCESS)

    async def _settle(self, operation: Operation, written: Written, outcome: IngestOutcome) -> None:
        loop = asyncio.get_running_loop()
        if outcome.stale_path:
            await loop.run_in_executor(self.executor, self.store.remove, outcome.stale_path)
        if not outcome.stored:
            # The index already held the instance: it was indexed under another path (see
            # _already_stored), or a concurrent store of it won the race for the row.
            if written.fresh and written.rel_path != outcome.existing_path:
                await loop.run_in_executor(self.executor, self.store.remove, written.rel_path)
            await self._refuse_duplicate(operation)
            return
        await operation.respond(SUCCESS)

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

    def _write(self, operation: Operation) -> Written | None:
        """Validate, decode and durably write one instance (blocking: executor thread).

        Returns None when the instance is already stored and the policy keeps or rejects it.
        """
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
        ds = inspected.dataset
        if str(ds.get("SOPInstanceUID", "")).rstrip("\0 ") != sop_instance:
            raise StoreRefused(DATASET_DOES_NOT_MATCH, "SOP Instance UID differs from the command")
        if str(ds.get("SOPClassUID", "")).rstrip("\0 ") != sop_class:
            raise StoreRefused(DATASET_DOES_NOT_MATCH, "SOP Class UID differs from the command")
        calling_ae = operation.session.calling_ae
        try:
            record = record_from_dataset(
                ds,
                header=inspected.header,
                transfer_syntax_uid=context.transfer_syntax,
                rel_path="",
                size=0,
                calling_ae=calling_ae,
                received_at=datetime.now(UTC),
            )
            rel_path = instance_path(record.study_uid, record.series_uid, sop_instance)
        except (IngestError, InvalidUID) as exc:
            raise StoreRefused(DATASET_DOES_NOT_MATCH, str(exc)) from exc
        if self.duplicate_policy != "replace" and self._already_stored(rel_path, sop_instance):
            return None
        # "replace" writes over the file of an instance already acknowledged: if the index
        # then fails, that file must stay (it is a valid version of the instance the index
        # still lists), so only a file new at its path is removed again.
        fresh = self.duplicate_policy != "replace" or not self.store.exists(rel_path)
        self.store.ensure_free_space()
        meta = encode_file_meta(sop_class, sop_instance, context.transfer_syntax, calling_ae)
        stored = self.store.write_instance(rel_path, meta, source)
        record = dataclasses.replace(record, rel_path=stored.rel_path, size=stored.size)
        return Written(record, stored.rel_path, fresh)


def _source(dataset: DataSet) -> bytes | Path:
    if dataset.spool_path is not None:
        dataset.spill(dataset.spool_path.parent)
        return dataset.spool_path
    return dataset.getvalue()
