"""C-STORE sub-operations of a C-MOVE or C-GET: their counts, their peer, sending them.

Each instance goes on a context the peer accepted for its SOP class: in its stored
transfer syntax when accepted (the file's bytes as they are), else in an uncompressed one
(decompressed and re-encoded in an executor), else it fails. Instances are read
ahead (and framed) in batches while the peer answers, so the disk and the network
overlap, and the next C-STORE-RQ leaves from the session's reader the moment the current
one's C-STORE-RSP arrives (`Sender.chain`): the peer waits for no Python in between.
Every wait on the peer is time-bound, and a peer that goes away (`Target.lost`) fails
what is left.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from minipacs import dataset as dicom
from minipacs.index.retrieve import StoredInstance
from minipacs.logs import log_event
from minipacs.net.association import AssociationError
from minipacs.net.commands import C_STORE_RQ, DATASET_PRESENT, PRIORITY_MEDIUM, Command
from minipacs.net.dimse import DimseMessage, FramedDataset, frame_dataset
from minipacs.net.negotiation import AcceptedContext
from minipacs.net.operations import CANCEL, SUCCESS
from minipacs.net.session import Session
from minipacs.storage.filestore import FileStore
from minipacs.storage.reader import DatasetReader
from minipacs.transcode import TranscodeError, transcode

log = logging.getLogger("minipacs.retrieve")

# Final statuses of C-MOVE and C-GET, PS3.4 Tables C.4-2 and C.4-3.
UNABLE_TO_PERFORM: Final = 0xA702
SOME_FAILED: Final = 0xB000
# Uncompressed syntaxes every storage SCP accepts; Implicit VR LE is the default (PS3.5 10.1).
UNCOMPRESSED: Final = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS: Final = 128  # PS3.8 9.3.2.2: odd context IDs 1-255
# Instances read in one executor trip, and the file bytes that end a batch sooner: two
# batches (the one being sent, the next one) are in memory at once.
READ_AHEAD: Final = 32
FIRST_BATCH: Final = 4
READ_AHEAD_BYTES: Final = 4 * 1024 * 1024
# The Failed SOP Instance UID List (0008,0058) holds the first failed UIDs that fit in one
# UI value of Explicit VR (16-bit length, PS3.5 7.1.2): a huge failed retrieve would else
# answer with a giant element, or one Explicit VR cannot encode. The count has them all.
FAILED_UIDS_MAX_BYTES: Final = 0xFFFE

Pieces = AsyncGenerator[tuple[bytes | memoryview, bool]]
# What reading one file gave: its data set framed whole, or a reader and its first chunk.
Loaded = FramedDataset | tuple[DatasetReader, tuple[bytes | memoryview, bool]]


@dataclass
class Counts:
    """Sub-operation counts of one retrieve (PS3.7 9.3.3.2, 9.3.4.2)."""

    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    _failed_uid_bytes: int = 0

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
            # Each value takes its separator (or, the last one, its even padding) with it.
            size = len(sop_uid) + 1
            if self._failed_uid_bytes + size <= FAILED_UIDS_MAX_BYTES:
                self.failed_uids.append(sop_uid)
                self._failed_uid_bytes += size

    def fields(self, final: bool, cancelled: bool = False) -> dict[str, int]:
        """Command fields; Remaining only in Pending and Cancel responses (PS3.7 C.4.2.1.4)."""
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


@dataclass
class Target:
    """Where sub-operations go: a session, the contexts we may send on, a move originator."""

    session: Session | None
    contexts: Sequence[AcceptedContext]
    timeout: float
    move_originator: tuple[str, int] | None = None
    # Why no more sub-operations can be sent (None: they can), for the logs.
    lost: str | None = None
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


@dataclass
class Prepared:
    """An instance ready to go: its context, and its data set read ahead or to re-encode."""

    context_id: int
    # The whole data set when its first read took it all (most instances), else pieces.
    whole: FramedDataset | None = None
    pieces: Pieces | None = None
    reader: DatasetReader | None = None
    # Re-encoded only when its turn comes, one at a time: decompressed, an instance can be
    # far larger than its file, so it is not read ahead with its batch.
    transcode_to: tuple[Path, str] | None = None

    async def close(self) -> None:
        """Release the file, whether or not the pieces were sent."""
        if self.pieces is not None:
            await self.pieces.aclose()
        if self.reader is not None:
            self.reader.close()


@dataclass(frozen=True)
class InFlight:
    """A C-STORE-RQ sent: where its response arrives, and by when it must."""

    message_id: int
    queue: asyncio.Queue[DimseMessage | None]
    deadline: float


@dataclass
class Chained:
    """A C-STORE-RQ framed to go when the one before is answered (`Sender.chain`)."""

    message_id: int
    queue: asyncio.Queue[DimseMessage | None]
    # The request whose response sends it.
    after_id: int
    # Set once the reader sent it.
    flight: InFlight | None = None


def proposals(summary: Mapping[tuple[str, str], int]) -> list[tuple[str, list[str]]]:
    """Contexts to propose for the instances of a summary: stored syntax, then uncompressed."""
    contexts: list[tuple[str, list[str]]] = []
    for sop_class in sorted({sop_class for sop_class, _ in summary}):
        stored = sorted({s for c, s in summary if c == sop_class and s not in UNCOMPRESSED})
        contexts.extend((sop_class, [syntax]) for syntax in stored)
        contexts.append((sop_class, list(UNCOMPRESSED)))
    # Past 128 the instances of the classes left out fail for want of a context.
    return contexts[:MAX_CONTEXTS]


class Sender:
    """Reads instances from the store and sends them as C-STORE-RQs to a target."""

    def __init__(self, store: FileStore, executor: Executor) -> None:
        self.store = store
        self.executor = executor

    async def prefetched(
        self, target: Target, instances: AsyncIterator[StoredInstance]
    ) -> AsyncGenerator[tuple[StoredInstance, Prepared | None]]:
        """Each instance with what `prepare` made of it, the next batch read in advance."""
        batches = aiter(_batches(instances))
        ready: deque[tuple[StoredInstance, Prepared | None]] = deque()
        ahead: asyncio.Future[list[tuple[StoredInstance, Prepared | None]]] | None = None
        first = await anext(batches, None)
        if first is not None:
            ahead = asyncio.ensure_future(self.prepare(target, first))
        try:
            while ahead is not None:
                ready.extend(await ahead)
                ahead = None
                following = await anext(batches, None)
                if following is not None:
                    ahead = asyncio.ensure_future(self.prepare(target, following))
                while ready:
                    yield ready.popleft()
        finally:
            if ahead is not None:
                ready.extend(await ahead)
            for _, prepared in ready:
                if prepared is not None:
                    await prepared.close()

    async def prepare(
        self, target: Target, batch: list[StoredInstance]
    ) -> list[tuple[StoredInstance, Prepared | None]]:
        """Choose contexts and read the batch's first pieces in one executor trip."""
        # One trip per batch, not per instance: on a busy machine each trip (a thread
        # wake-up and a loop wake-up) costs more than reading a small file.
        if target.lost is not None:
            return [(instance, None) for instance in batch]
        work = []
        for instance in batch:
            chosen = target.context_for(instance)
            if chosen is None:
                log_event(
                    log,
                    "retrieve.no_context",
                    level=logging.WARNING,
                    sop_instance=instance.sop_uid,
                    sop_class=instance.sop_class_uid,
                    transfer_syntax=instance.transfer_syntax,
                )
            work.append((instance, chosen))
        loop = asyncio.get_running_loop()
        assert target.session is not None  # a target without a session is lost
        max_fragment = target.session.association.max_fragment
        loaded = await loop.run_in_executor(self.executor, self._load, work, max_fragment)
        prepared: list[tuple[StoredInstance, Prepared | None]] = []
        for (instance, chosen), loaded_one in zip(work, loaded, strict=True):
            if chosen is None:
                prepared.append((instance, None))
            elif chosen[1] != instance.transfer_syntax:
                path = self.store.path(instance.rel_path)
                prepared.append((instance, Prepared(chosen[0], transcode_to=(path, chosen[1]))))
            elif loaded_one is None:
                prepared.append((instance, None))
            elif isinstance(loaded_one, FramedDataset):
                prepared.append((instance, Prepared(chosen[0], whole=loaded_one)))
            else:
                reader, first = loaded_one
                pieces = _chunks(loop, self.executor, reader, first)
                prepared.append((instance, Prepared(chosen[0], pieces=pieces, reader=reader)))
        return prepared

    def _load(
        self, work: list[tuple[StoredInstance, tuple[int, str] | None]], max_fragment: int
    ) -> list[Loaded | None]:
        """Open each file sent as stored and read its first chunk (blocking).

        A data set read whole is framed here too: off the loop, where cutting a CT-size
        one into 16 KiB PDUs would delay the next C-STORE-RQ after each C-STORE-RSP.
        """
        loaded: list[Loaded | None] = []
        for instance, chosen in work:
            if chosen is None or chosen[1] != instance.transfer_syntax:
                loaded.append(None)
                continue
            try:
                reader, (data, last) = DatasetReader.open(self.store.path(instance.rel_path))
            except (OSError, dicom.DataSetError) as exc:
                _unreadable(instance, exc)
                loaded.append(None)
                continue
            if last:
                loaded.append(frame_dataset(chosen[0], data, max_fragment))
            else:
                loaded.append((reader, (data, last)))
        return loaded

    async def start(
        self, target: Target, instance: StoredInstance, prepared: Prepared
    ) -> InFlight | None:
        """Send an instance's C-STORE-RQ; None (and `target.lost`) if it cannot go."""
        session = target.session
        if session is None or target.lost is not None:
            # Read ahead before the peer went: it cannot be sent now.
            await prepared.close()
            return None
        data: FramedDataset | bytes | None = prepared.whole
        if prepared.transcode_to is not None:
            loop = asyncio.get_running_loop()
            try:
                data = await loop.run_in_executor(self.executor, transcode, *prepared.transcode_to)
            except TranscodeError as exc:
                _unreadable(instance, exc)
                return None
        message_id = session.next_message_id()
        command = _store_command(target, instance, message_id)
        try:
            async with asyncio.timeout(target.timeout) as bound:
                if data is not None:
                    # In one piece: one write, none of the streaming's per-piece machinery
                    # on the path between a C-STORE-RSP and the next C-STORE-RQ.
                    queue = await session.request(prepared.context_id, command, data)
                else:
                    assert prepared.pieces is not None
                    progressing = _progressing(prepared.pieces, bound, target.timeout)
                    queue = await session.request_streamed(
                        prepared.context_id, command, progressing
                    )
        except (TimeoutError, OSError, AssociationError) as exc:
            # OSError: a file that cannot be read after its first piece cuts the message
            # short, so the association cannot carry another one.
            session.forget_request(message_id)
            self._lose(target, f"cannot send {instance.sop_uid}: {exc or 'timed out'}")
            return None
        finally:
            await prepared.close()
        return InFlight(message_id, queue, asyncio.get_running_loop().time() + target.timeout)

    def chain(
        self,
        target: Target,
        instance: StoredInstance,
        prepared: Prepared,
        after: InFlight,
        cancelled: asyncio.Event,
    ) -> Chained | None:
        """Have an instance read whole sent the moment `after` is answered, not later.

        Only one C-STORE-RQ is outstanding at a time (no Asynchronous Operations Window
        is negotiated, PS3.7 D.3.3.3): the next one is framed while the peer handles the
        current one and leaves from the reader as its C-STORE-RSP arrives, unless the
        retrieve was cancelled or the target lost by then. None: send it with `start`.
        """
        session = target.session
        if session is None or target.lost is not None or prepared.whole is None:
            return None
        message_id = session.next_message_id()
        command = _store_command(target, instance, message_id)
        try:
            pdus = session.association.frame_message(prepared.context_id, command, prepared.whole)
        except AssociationError:
            return None
        chained = Chained(message_id, session.expect_response(message_id), after.message_id)
        loop = asyncio.get_running_loop()

        def send() -> None:
            if cancelled.is_set() or target.lost is not None:
                return
            try:
                sent = session.send_framed_now(pdus)
            except AssociationError:
                return
            if sent:
                chained.flight = InFlight(message_id, chained.queue, loop.time() + target.timeout)

        session.when_answered(after.message_id, send)
        return chained

    async def chained_flight(self, target: Target, chained: Chained) -> InFlight | None:
        """The chained request once it is written, or None if it was not sent (see `chain`)."""
        assert target.session is not None
        session = target.session
        # Still there when the response before never came.
        session.forget_answer(chained.after_id)
        flight = chained.flight
        if flight is None:
            session.forget_request(chained.message_id)
            return None
        if session.write_backlog:
            try:
                async with asyncio.timeout(target.timeout):
                    await session.drain()
            except TimeoutError:
                session.forget_request(chained.message_id)
                self._lose(target, f"cannot send a C-STORE-RQ within {target.timeout:g} s")
                return None
        return flight

    async def finish(self, target: Target, flight: InFlight) -> int | None:
        """Wait for a C-STORE-RSP: its status; None (and `target.lost`) if none came."""
        assert target.session is not None
        response = None
        try:
            async with asyncio.timeout_at(flight.deadline):
                response = await flight.queue.get()
        except TimeoutError:
            self._lose(target, f"no C-STORE-RSP within {target.timeout:g} s")
            return None
        finally:
            target.session.forget_request(flight.message_id)
        if response is None:
            self._lose(target, f"association ended: {target.session.outcome}")
            return None
        return int(response.command.get("Status", 0xC000))  # type: ignore[call-overload]

    def _lose(self, target: Target, why: str) -> None:
        target.lost = target.lost or why
        # What is left of the retrieve fails; the operation's own event counts it.
        log_event(log, "retrieve.peer_lost", level=logging.WARNING, error=target.lost)


async def _batches(instances: AsyncIterator[StoredInstance]) -> AsyncIterator[list[StoredInstance]]:
    """Instances grouped to be read together: at most READ_AHEAD of them or READ_AHEAD_BYTES.

    The first batch is short, so that the first sub-operation starts soon.
    """
    batch: list[StoredInstance] = []
    size = 0
    limit = FIRST_BATCH
    async for instance in instances:
        batch.append(instance)
        size += instance.size
        if len(batch) >= limit or size >= READ_AHEAD_BYTES:
            yield batch
            batch, size, limit = [], 0, READ_AHEAD
    if batch:
        yield batch


def _store_command(target: Target, instance: StoredInstance, message_id: int) -> Command:
    command: Command = {
        "CommandField": C_STORE_RQ,
        "MessageID": message_id,
        "AffectedSOPClassUID": instance.sop_class_uid,
        "AffectedSOPInstanceUID": instance.sop_uid,
        "Priority": PRIORITY_MEDIUM,
        "CommandDataSetType": DATASET_PRESENT,
    }
    if target.move_originator is not None:
        # PS3.7 9.1.1.1: a C-MOVE sub-operation names the AE and message it serves.
        ae_title, move_id = target.move_originator
        command["MoveOriginatorApplicationEntityTitle"] = ae_title
        command["MoveOriginatorMessageID"] = move_id
    return command


def _unreadable(instance: StoredInstance, exc: Exception) -> None:
    log_event(
        log,
        "retrieve.unreadable",
        level=logging.WARNING,
        sop_instance=instance.sop_uid,
        error=str(exc),
    )


async def _progressing(pieces: Pieces, bound: asyncio.Timeout, timeout: float) -> Pieces:
    """The pieces, each pushing the time bound back: a peer that keeps reading has time."""
    loop = asyncio.get_running_loop()
    async for piece in pieces:
        bound.reschedule(loop.time() + timeout)
        yield piece


async def _chunks(
    loop: asyncio.AbstractEventLoop,
    executor: Executor,
    reader: DatasetReader,
    first: tuple[bytes | memoryview, bool],
) -> Pieces:
    piece = first
    yield piece
    while not piece[1]:
        piece = await loop.run_in_executor(executor, reader.read)
        yield piece
