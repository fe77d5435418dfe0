"""What C-MOVE and C-GET share: the identifier check, the sub-operations and their counts.

A retrieve (PS3.4 C.4.2.3, C.4.3.3) checks its identifier and counts the matching
instances (one executor trip), opens a `Target` (C-MOVE: a new association to the move
destination; C-GET: the requestor's own association), then sends each instance with a
C-STORE sub-operation, in instance order, page by page. After each one a Pending
response reports Remaining/Completed/Failed/Warning; the final status is Success,
Warning 0xB000 or Failure 0xA702 (all failed) with the Failed SOP Instance UID List
(0008,0058), or Cancel 0xFE00 when the requestor sent C-CANCEL. Files are read and, when
the peer accepts none of an instance's transfer syntaxes, decompressed in an executor;
every wait on the peer is time-bound, and a peer that goes away fails what is left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Final

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from minipacs import dataset as dicom
from minipacs.index.keys import InformationModel
from minipacs.index.query import QueryError
from minipacs.index.retrieve import RetrievePlan, RetrieveQuery, StoredInstance, plan_retrieve
from minipacs.net.commands import C_STORE_RQ, DATASET_PRESENT, PRIORITY_MEDIUM, Command
from minipacs.net.negotiation import AcceptedContext
from minipacs.net.operations import (
    CANCEL,
    PENDING,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
    Operation,
)
from minipacs.net.session import Session
from minipacs.storage.filestore import FileStore
from minipacs.storage.reader import DatasetReader
from minipacs.transcode import TranscodeError, transcode

log = logging.getLogger("minipacs.retrieve")

# C-MOVE and C-GET statuses, PS3.4 Tables C.4-2 and C.4-3.
UNABLE_TO_COUNT: Final = 0xA701
UNABLE_TO_PERFORM: Final = 0xA702
MOVE_DESTINATION_UNKNOWN: Final = 0xA801
IDENTIFIER_DOES_NOT_MATCH: Final = 0xA900
UNABLE_TO_PROCESS: Final = 0xC000
SOME_FAILED: Final = 0xB000
# Uncompressed syntaxes every storage SCP accepts; Implicit VR LE is the default (PS3.5 10.1).
UNCOMPRESSED: Final = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS: Final = 128  # PS3.8 9.3.2.2: odd context IDs 1-255


@dataclass(frozen=True)
class RetrieveOptions:
    """How retrieves run: our AE title, time bounds on the peer, page size."""

    ae_title: str
    connect_timeout: float = 10.0
    # Longest wait for one C-STORE-RSP; past it the peer counts as gone.
    response_timeout: float = 60.0
    page_size: int = 100


@dataclass
class Counts:
    """Sub-operation counts of one retrieve (PS3.7 9.3.3.2, 9.3.4.2)."""

    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)

    def record(self, status: int | None, sop_uid: str) -> None:
        """Count one sub-operation by its C-STORE status (None: it could not be sent)."""
        self.remaining = max(0, self.remaining - 1)
        if status == SUCCESS:
            self.completed += 1
        elif status is not None and (status & 0xF000 == 0xB000 or status == 0x0001):
            # PS3.4 B.2.3: Bxxx (coercion, elements discarded, data set mismatch) are warnings.
            self.warning += 1
        else:
            self.failed += 1
            self.failed_uids.append(sop_uid)

    def fields(self, final: bool, cancelled: bool = False) -> dict[str, int]:
        """Command fields; Remaining goes only in Pending and Cancel responses (PS3.7 C.4.2.1.4)."""
        fields = {
            "NumberOfCompletedSuboperations": self.completed,
            "NumberOfFailedSuboperations": self.failed,
            "NumberOfWarningSuboperations": self.warning,
        }
        if not final or cancelled:
            fields["NumberOfRemainingSuboperations"] = self.remaining
        return fields

    def final_status(self, cancelled: bool) -> int:
        """The final status these counts call for (PS3.4 C.4.2.1.5, C.4.3.1.4)."""
        if cancelled:
            return CANCEL
        if not self.failed and not self.warning:
            return SUCCESS
        if not self.completed and not self.warning:
            return UNABLE_TO_PERFORM
        return SOME_FAILED


class TargetLost(Exception):
    """The peer receiving the sub-operations went away or stopped answering."""


@dataclass
class Target:
    """Where sub-operations go: a session, the contexts we may send on, a move originator."""

    session: Session | None
    contexts: Sequence[AcceptedContext]
    timeout: float
    move_originator: tuple[str, int] | None = None
    # Why sub-operations cannot be sent at all (None: they can), for the logs.
    unavailable: str | None = None
    _by_syntax: dict[tuple[str, str], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for context in self.contexts:
            if context.we_are_scu:
                key = (context.abstract_syntax, context.transfer_syntax)
                self._by_syntax.setdefault(key, context.context_id)

    def context_for(self, instance: StoredInstance) -> tuple[int, str] | None:
        """A context for an instance: its own syntax first, else an uncompressed one."""
        for syntax in (instance.transfer_syntax, *UNCOMPRESSED):
            context_id = self._by_syntax.get((instance.sop_class_uid, syntax))
            if context_id is not None:
                return context_id, syntax
        return None


def proposals(summary: Mapping[tuple[str, str], int]) -> list[tuple[str, list[str]]]:
    """Contexts to propose for the instances of a summary: stored syntax, then uncompressed."""
    contexts: list[tuple[str, list[str]]] = []
    for sop_class in sorted({sop_class for sop_class, _ in summary}):
        stored = sorted({s for c, s in summary if c == sop_class and s not in UNCOMPRESSED})
        contexts.extend((sop_class, [syntax]) for syntax in stored)
        contexts.append((sop_class, list(UNCOMPRESSED)))
    # Past 128 the instances of the classes left out fail for want of a context.
    return contexts[:MAX_CONTEXTS]


class RetrieveService:
    """The part of C-MOVE and C-GET SCPs that does not depend on where instances go."""

    # The command's name for logs, and the SOP class UID -> model table it serves.
    name = "retrieve"
    models: Mapping[str, InformationModel] = {}

    def __init__(
        self,
        engine: Engine,
        store: FileStore,
        query_executor: Executor,
        file_executor: Executor,
        options: RetrieveOptions,
    ) -> None:
        self.engine = engine
        self.store = store
        self.query_executor = query_executor
        self.file_executor = file_executor
        self.options = options

    async def handle(self, operation: Operation) -> None:
        """Serve one C-MOVE-RQ or C-GET-RQ, streaming Pending responses."""
        context = operation.context
        model = self.models.get(context.abstract_syntax)
        if model is None:
            await operation.respond(
                SOP_CLASS_NOT_SUPPORTED,
                error_comment=f"{context.abstract_syntax} is not a {self.name} model we serve",
            )
            return
        sop_class = str(operation.command.get("AffectedSOPClassUID", ""))
        if sop_class != context.abstract_syntax:
            await operation.respond(
                IDENTIFIER_DOES_NOT_MATCH,
                error_comment=f"SOP Class {sop_class} sent on a {model.name} {self.name} context",
            )
            return
        if not await self.accepts(operation):
            return
        loop = asyncio.get_running_loop()
        try:
            query, summary = await loop.run_in_executor(
                self.query_executor, self._start, operation, model
            )
        except dicom.DataSetError as exc:
            await operation.respond(UNABLE_TO_PROCESS, error_comment=f"identifier: {exc}")
            return
        except QueryError as exc:
            fields = {"OffendingElement": [exc.tag]} if exc.tag is not None else {}
            await operation.respond(IDENTIFIER_DOES_NOT_MATCH, error_comment=str(exc), **fields)
            return
        except SQLAlchemyError:
            log.exception("%s query failed", self.name)
            await operation.respond(UNABLE_TO_COUNT, error_comment="index unavailable")
            return
        counts = Counts(sum(summary.values()))
        operation.log_fields.update(query_level=query.plan.level, matches=counts.remaining)
        target = await self.open_target(operation, summary) if counts.remaining else None
        try:
            cancelled = await self._run(operation, query, target, counts)
        finally:
            if target is not None:
                await self.close_target(target)
        await self._finish(operation, counts, cancelled, target)

    async def accepts(self, operation: Operation) -> bool:
        """Check the request before the index is read; False once a failure was sent."""
        return True

    async def open_target(
        self, operation: Operation, summary: Mapping[tuple[str, str], int]
    ) -> Target:
        """Where the sub-operations of this retrieve go."""
        raise NotImplementedError

    async def close_target(self, target: Target) -> None:
        """Release what open_target opened."""

    def _start(
        self, operation: Operation, model: InformationModel
    ) -> tuple[RetrieveQuery, dict[tuple[str, str], int]]:
        message = operation.message
        if message.dataset is None:
            raise QueryError(f"{self.name} request without an identifier")
        identifier = dicom.inspect(message.dataset.getvalue(), operation.context.transfer_syntax)
        plan: RetrievePlan = plan_retrieve(model, identifier.dataset)
        query = RetrieveQuery(plan, self.engine, self.options.page_size)
        return query, query.summary()

    async def _pages(self, query: RetrieveQuery) -> AsyncIterator[StoredInstance]:
        loop = asyncio.get_running_loop()
        after: int | None = 0
        while after is not None:
            page, after = await loop.run_in_executor(self.query_executor, query.page, after)
            for instance in page:
                yield instance

    async def _run(
        self, operation: Operation, query: RetrieveQuery, target: Target | None, counts: Counts
    ) -> bool:
        """Send every instance; return True when C-CANCEL stopped the retrieve."""
        if target is None:
            return False
        lost = target.unavailable
        try:
            async for instance in self._pages(query):
                if operation.cancelled.is_set():
                    return True
                if lost is not None:
                    counts.record(None, instance.sop_uid)
                    continue
                try:
                    status = await self._suboperation(target, instance)
                except TargetLost as exc:
                    lost = str(exc)
                    log.warning("%s: %s; what is left fails", self.name, lost)
                    status = None
                counts.record(status, instance.sop_uid)
                await operation.respond(PENDING, **counts.fields(final=False))
        except SQLAlchemyError:
            # The index went away mid-retrieve: what was not sent counts as failed.
            log.exception("%s page query failed", self.name)
            counts.failed += counts.remaining
            counts.remaining = 0
        if lost is not None:
            operation.log_fields["error"] = lost
        return False

    async def _suboperation(self, target: Target, instance: StoredInstance) -> int | None:
        """One C-STORE sub-operation; its status, None when it could not be sent."""
        assert target.session is not None
        chosen = target.context_for(instance)
        if chosen is None:
            log.warning(
                "%s: no accepted context for %s in %s or uncompressed: %s fails",
                self.name,
                instance.sop_class_uid,
                instance.transfer_syntax,
                instance.sop_uid,
            )
            return None
        context_id, syntax = chosen
        try:
            pieces = await self._pieces(instance, syntax)
        except (OSError, dicom.DataSetError, TranscodeError) as exc:
            log.warning("%s: cannot read %s: %s", self.name, instance.sop_uid, exc)
            return None
        session = target.session
        command: Command = {
            "CommandField": C_STORE_RQ,
            "MessageID": session.next_message_id(),
            "AffectedSOPClassUID": instance.sop_class_uid,
            "AffectedSOPInstanceUID": instance.sop_uid,
            "Priority": PRIORITY_MEDIUM,
            "CommandDataSetType": DATASET_PRESENT,
        }
        if target.move_originator is not None:
            # PS3.7 9.1.1.1: a C-MOVE sub-operation names the AE and message it serves.
            ae_title, message_id = target.move_originator
            command["MoveOriginatorApplicationEntityTitle"] = ae_title
            command["MoveOriginatorMessageID"] = message_id
        message_id = int(command["MessageID"])  # type: ignore[call-overload]
        try:
            async with asyncio.timeout(target.timeout):
                queue = await session.request_streamed(context_id, command, pieces)
                response = await queue.get()
        except TimeoutError:
            raise TargetLost(f"no C-STORE-RSP within {target.timeout:g} s") from None
        except OSError as exc:
            raise TargetLost(f"cannot read or send {instance.sop_uid}: {exc}") from exc
        finally:
            session.forget_request(message_id)
            await pieces.aclose()
        if response is None:
            raise TargetLost(f"association ended: {session.outcome}")
        return int(response.command.get("Status", UNABLE_TO_PROCESS))  # type: ignore[call-overload]

    async def _pieces(
        self, instance: StoredInstance, syntax: str
    ) -> AsyncGenerator[tuple[bytes, bool]]:
        """The instance's data set in `syntax` as (bytes, is_last) pieces, read in the executor."""
        loop = asyncio.get_running_loop()
        path = self.store.path(instance.rel_path)
        if syntax != instance.transfer_syntax:
            data = await loop.run_in_executor(self.file_executor, transcode, path, syntax)
            return _single(data)
        reader = await loop.run_in_executor(self.file_executor, DatasetReader, path)
        try:
            first = await loop.run_in_executor(self.file_executor, reader.read)
        except BaseException:
            reader.close()
            raise
        return _chunks(loop, self.file_executor, reader, first)

    async def _finish(
        self, operation: Operation, counts: Counts, cancelled: bool, target: Target | None
    ) -> None:
        status = counts.final_status(cancelled)
        operation.log_fields.update(
            completed=counts.completed, failed=counts.failed, warning=counts.warning
        )
        if target is not None and target.unavailable:
            operation.log_fields["error"] = target.unavailable
        identifier = None
        if status != SUCCESS:
            # PS3.4 C.4.2.1.4.2: Cancel, Warning and Failure carry the failed UIDs.
            ds = Dataset()
            ds.FailedSOPInstanceUIDList = counts.failed_uids
            loop = asyncio.get_running_loop()
            identifier = await loop.run_in_executor(
                self.query_executor, dicom.encode, ds, operation.context.transfer_syntax
            )
        await operation.respond(
            status, identifier, **counts.fields(final=True, cancelled=cancelled)
        )


async def _single(data: bytes) -> AsyncGenerator[tuple[bytes, bool]]:
    yield data, True


async def _chunks(
    loop: asyncio.AbstractEventLoop,
    executor: Executor,
    reader: DatasetReader,
    first: tuple[bytes, bool],
) -> AsyncGenerator[tuple[bytes, bool]]:
    try:
        piece = first
        yield piece
        while not piece[1]:
            piece = await loop.run_in_executor(executor, reader.read)
            yield piece
    finally:
        reader.close()
