"""The asyncio side of one association: moves bytes, runs timers, routes DIMSE messages.

All protocol decisions live in the sans-I/O `Association`; a `Session` only reads the
socket, feeds it, writes what it returns, and routes complete messages: requests to the
registered services, responses to whoever awaits them (by Message ID Being Responded
To), C-CANCEL to the operation it names. One reader task per association, no threads.

Bytes that arrive while the reader task is idle are first handled at once, in the
connection's callback (`_receive_now`): responses, C-CANCEL and requests whose service
answers without awaiting (C-ECHO) need no task wake-up. Anything else is handed, in
order, to the reader task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from minipacs.net.association import (
    Aborted,
    AssociateAccepted,
    AssociateRejected,
    AssociateRequested,
    Association,
    AssociationEvent,
    Closed,
    MessageReceived,
    ReleaseConfirmed,
    ReleaseRequested,
)
from minipacs.net.commands import C_CANCEL_RQ, Command, command_name
from minipacs.net.connection import Connection
from minipacs.net.dimse import DimseMessage, FramedDataset
from minipacs.net.observer import Observer
from minipacs.net.operations import (
    PROCESSING_FAILURE,
    UNRECOGNIZED_OPERATION,
    Operation,
    Service,
)

log = logging.getLogger("minipacs.net")


@dataclass
class Timeouts:
    """Timers of one association, in seconds."""

    artim: float = 30.0
    idle: float = 300.0


class Session:
    """Runs one association over an asyncio stream pair until it ends."""

    def __init__(
        self,
        association: Association,
        connection: Connection,
        *,
        services: Mapping[int, Service],
        timeouts: Timeouts,
        spool_dir: Path,
        peer: str,
        on_associate: Callable[[Session, AssociateRequested], Awaitable[None]] | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.association = association
        self.connection = connection
        self.services = services
        self.timeouts = timeouts
        self.spool_dir = spool_dir
        self.peer = peer
        self.on_associate = on_associate
        self.observer = observer or Observer()
        self.bytes_received = 0
        self.bytes_sent = 0
        self.calling_ae = ""
        self.called_ae = ""
        self.outcome = "open"
        self.requests_served = 0
        self.established: asyncio.Future[AssociateAccepted | AssociateRejected | Aborted] = (
            asyncio.get_running_loop().create_future()
        )
        self.ended = asyncio.Event()
        self._operations: dict[int, Operation] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiters: dict[int, asyncio.Queue[DimseMessage | None]] = {}
        # Run as a response is routed, before its waiter wakes (see `when_answered`).
        self._on_answer: dict[int, Callable[[], None]] = {}
        # Held while a data set is streamed in pieces: no other message may slip between
        # its fragments (PS3.8 9.3.5.1: the PDVs of one message are sent in order, alone).
        self._streaming = asyncio.Lock()
        self._release_done: asyncio.Future[None] | None = None
        self._next_message_id = 0
        self._last_activity = asyncio.get_running_loop().time()
        self._watchdog: asyncio.TimerHandle | None = None
        self._watching_artim = False
        self._timed_out = False
        self._loop = asyncio.get_running_loop()
        connection.receive_now = self._receive_now

    # Writing.

    def flush(self) -> None:
        """Write whatever the protocol object has queued."""
        buffers = self.association.data_to_send()
        if not buffers:
            return
        transport = self.connection.transport
        if transport is None or transport.is_closing():
            return
        if len(buffers) <= 4:
            # One write of a small joined message beats writelines' per-buffer overhead.
            data = b"".join(buffers)
            self.bytes_sent += len(data)
            transport.write(data)
        else:
            self.bytes_sent += sum(map(len, buffers))
            transport.writelines(buffers)

    async def send(
        self,
        context_id: int,
        command: Command,
        dataset: bytes | memoryview | FramedDataset | None = None,
    ) -> None:
        """Send one DIMSE message and wait until the transport can take more."""
        if self._streaming.locked():
            async with self._streaming:
                self.association.send_message(context_id, command, dataset)
        else:
            self.association.send_message(context_id, command, dataset)
        self.flush()
        if self.connection.write_paused:
            await self.connection.drain()

    def send_now(self, context_id: int, command: Command, dataset: bytes | None = None) -> None:
        """Send one DIMSE message without waiting; only where no data set is being streamed."""
        self.association.send_message(context_id, command, dataset)
        self.flush()

    async def request_streamed(
        self,
        context_id: int,
        command: Command,
        pieces: AsyncIterator[tuple[bytes | memoryview, bool]],
    ) -> asyncio.Queue[DimseMessage | None]:
        """Send a request whose data set arrives in (bytes, is_last) pieces; see `request`."""
        queue = self.expect_response(int(command["MessageID"]))  # type: ignore[call-overload]
        async with self._streaming:
            self.association.send_message(context_id, command, None)
            async for data, last in pieces:
                self.association.send_dataset_fragments(context_id, data, last)
                await self.drain()
        return queue

    def next_message_id(self) -> int:
        """A Message ID unique on this association (PS3.7 9.3.1.1), wrapping at 16 bits."""
        self._next_message_id = self._next_message_id % 0xFFFF + 1
        return self._next_message_id

    async def request(
        self,
        context_id: int,
        command: Command,
        dataset: bytes | memoryview | FramedDataset | None = None,
    ) -> asyncio.Queue[DimseMessage | None]:
        """Send a request; return the queue its responses arrive on (None: association gone)."""
        queue = self.expect_response(int(command["MessageID"]))  # type: ignore[call-overload]
        await self.send(context_id, command, dataset)
        return queue

    def forget_request(self, message_id: int) -> None:
        """Stop routing responses of a request to its queue."""
        self._waiters.pop(message_id, None)

    def expect_response(self, message_id: int) -> asyncio.Queue[DimseMessage | None]:
        """The queue the responses to a request not sent yet will arrive on."""
        queue: asyncio.Queue[DimseMessage | None] = asyncio.Queue()
        self._waiters[message_id] = queue
        return queue

    def send_framed_now(self, pdus: tuple[bytes | memoryview, ...]) -> bool:
        """Write one framed message now; False (nothing sent) while another is streamed."""
        if self._streaming.locked():
            return False
        self.association.send_framed(pdus)
        self.flush()
        return True

    @property
    def write_backlog(self) -> int:
        """Bytes written but not yet taken by the kernel: await `drain` when not 0."""
        transport = self.connection.transport
        return 0 if transport is None else transport.get_write_buffer_size()

    async def drain(self) -> None:
        """Write what is queued, then wait until the transport can take more."""
        self.flush()
        await self.connection.drain()

    def when_answered(self, message_id: int, callback: Callable[[], None]) -> None:
        """Call `callback` as soon as the response to `message_id` arrives, in the reader.

        A sub-operation's next C-STORE-RQ goes out from here: the reader would else wake
        the retrieve task first, which costs a loop turn between the RSP and the next RQ.
        """
        self._on_answer[message_id] = callback

    def forget_answer(self, message_id: int) -> None:
        """Drop what `when_answered` registered for a message, if it has not run."""
        self._on_answer.pop(message_id, None)

    async def release(self, timeout: float) -> None:
        """Ask the peer to release the association and wait for its confirmation."""
        self._release_done = asyncio.get_running_loop().create_future()
        self.association.release_request()
        self.flush()
        try:
            async with asyncio.timeout(timeout):
                await self._release_done
        except TimeoutError:
            self.abort("release not confirmed in time")

    def abort(self, why: str) -> None:
        """Abort the association (A-ABORT, service user) and close soon after."""
        if self.outcome == "open":
            self.outcome = f"aborted: {why}"
        self.association.abort()
        self.flush()
        self.connection.close()

    # Reading.

    async def run(self) -> None:
        """Read and dispatch until the association ends, then clean up."""
        association = self.association
        loop = self._loop
        self._arm_watchdog()
        try:
            while not association.finished and not association.should_close:
                item = await self.connection.next_item()
                if self._timed_out:
                    await self._on_timeout()
                    break
                if isinstance(item, list):
                    # Parsed by the fast path, left to this task (bytes already counted).
                    events = item
                elif not item:
                    await self._handle(association.connection_lost())
                    break
                else:
                    self._note_bytes(item)
                    events = association.receive_data(item)
                await self._handle(events)
                pending = association.assembler.needs_spill
                if pending is not None:
                    await loop.run_in_executor(None, pending.spill, self.spool_dir)
                self.flush()
                if association.artim_running != self._watching_artim:
                    # ARTIM started or stopped: the timer now running counts from here.
                    self._last_activity = loop.time()
                    self._arm_watchdog()
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            await self._finish()

    def _note_bytes(self, data: bytes) -> None:
        if not self.association.artim_running:
            # PS3.8 9.1.5: bytes do not restart ARTIM, or a peer trickling a
            # byte a second would never send a whole A-ASSOCIATE-RQ nor time out.
            self._last_activity = self._loop.time()
        self.bytes_received += len(data)

    def _receive_now(self, data: bytes) -> bool:
        """Handle bytes inside the connection's callback; False: leave them to the task."""
        association = self.association
        # Only in data transfer, and never between the fragments of a streamed data set.
        if not association.established or self._streaming.locked():
            return False
        self._note_bytes(data)
        events = association.receive_data(data)
        for index, event in enumerate(events):
            if type(event) is not MessageReceived or not self._dispatch_now(event.message):
                self.connection.hand_on(events[index:])
                break
        else:
            if association.assembler.needs_spill is not None or association.should_close:
                # The task spills, or leaves its loop; an empty list just wakes it.
                self.connection.hand_on([])
        self.flush()
        return True

    def _dispatch_now(self, message: DimseMessage) -> bool:
        """Route or answer a message without awaiting; False when that takes the task."""
        command = message.command
        field = command["CommandField"]
        if field & 0x8000 or field == C_CANCEL_RQ:  # type: ignore[operator]
            self._on_message_now(message)
            return True
        service = self.services.get(field)  # type: ignore[call-overload]
        context = self.association.contexts[message.context_id]
        if (
            service is None
            or service.answer is None
            or message.dataset is not None
            or not context.we_are_scp
        ):
            return False
        operation = Operation(self, message, context)
        self.requests_served += 1
        try:
            service.answer(operation)
        except Exception as exc:
            log.exception(
                "service failed for %s from %s", command_name(operation.command), self.peer
            )
            if not operation.finished:
                operation.answer(PROCESSING_FAILURE, error_comment=f"processing failure: {exc}")
        return True

    def _arm_watchdog(self) -> None:
        # One timer per association, re-armed only when it fires or ARTIM starts/stops:
        # cheaper than a timeout around every read on the hot path.
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watching_artim = self.association.artim_running
        timeout = self.timeouts.artim if self._watching_artim else self.timeouts.idle
        self._watchdog = asyncio.get_running_loop().call_at(
            self._last_activity + timeout, self._check_timers
        )

    def _check_timers(self) -> None:
        self._watchdog = None
        loop = asyncio.get_running_loop()
        artim = self.association.artim_running
        timeout = self.timeouts.artim if artim else self.timeouts.idle
        # A long C-MOVE/C-GET keeps the peer silent while we work: that is not idleness.
        busy = bool(self._operations) and not artim
        if busy:
            self._last_activity = loop.time()
        if loop.time() - self._last_activity >= timeout:
            self._timed_out = True
            self.connection.feed_eof()
            return
        self._arm_watchdog()

    async def _on_timeout(self) -> None:
        association = self.association
        if association.artim_running:
            if self.outcome == "open":
                self.outcome = "artim timeout"
            await self._handle(association.artim_expired())
        else:
            self.abort(f"idle for {self.timeouts.idle:g} s")

    async def _finish(self) -> None:
        self.association.assembler.discard()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._on_answer.clear()
        for queue in self._waiters.values():
            queue.put_nowait(None)
        if not self.established.done():
            self.established.set_result(Aborted(False, 2, 0, self.outcome))
        if self._release_done is not None and not self._release_done.done():
            self._release_done.set_result(None)
        self.flush()
        self.connection.close()
        with contextlib.suppress(Exception):
            await self.connection.wait_closed()
        self.ended.set()

    async def _handle(self, events: list[AssociationEvent]) -> None:
        for event in events:
            if isinstance(event, MessageReceived):
                await self._on_message(event.message)
            elif isinstance(event, AssociateRequested):
                self.calling_ae = event.request.calling_ae_title.strip()
                self.called_ae = event.request.called_ae_title.strip()
                # Bytes after the RQ in the same read may already have aborted it (a
                # PDU in Sta3 is Evt-A-ABORT territory, PS3.8 Table 9-10): then there
                # is nothing left to answer. Found by tests/test_fuzz.py.
                if self.on_associate is not None and self.association.awaiting_response:
                    await self.on_associate(self, event)
            elif isinstance(event, AssociateAccepted | AssociateRejected):
                if isinstance(event, AssociateRejected):
                    self.outcome = "rejected"
                if not self.established.done():
                    self.established.set_result(event)
            elif isinstance(event, ReleaseRequested):
                self.association.release_response()
                self.outcome = "released"
            elif isinstance(event, ReleaseConfirmed):
                self.outcome = "released"
                if self._release_done is not None and not self._release_done.done():
                    self._release_done.set_result(None)
            elif isinstance(event, Aborted):
                self._on_aborted(event)
            elif isinstance(event, Closed) and self.outcome == "open":
                self.outcome = "closed"

    def _on_aborted(self, event: Aborted) -> None:
        if event.by_peer:
            self.outcome = f"aborted by peer (source {event.source}, reason {event.reason})"
        else:
            self.outcome = f"aborted: {event.detail}"
        if not self.established.done():
            self.established.set_result(event)
        for task in self._tasks:
            task.cancel()

    def _on_message_now(self, message: DimseMessage) -> None:
        """Route a response to its requester, or a C-CANCEL to its operation."""
        command = message.command
        responded_to = int(command.get("MessageIDBeingRespondedTo", -1))  # type: ignore[call-overload]
        if int(command["CommandField"]) == C_CANCEL_RQ:  # type: ignore[call-overload]
            # PS3.7 9.3.2.3: C-CANCEL names the operation by Message ID Being Responded To.
            target = self._operations.get(responded_to)
            if target is not None:
                target.cancelled.set()
            return
        queue = self._waiters.get(responded_to)
        if queue is None:
            log.warning(
                "unsolicited %s for message %s from %s",
                command_name(command),
                responded_to,
                self.peer,
            )
            return
        queue.put_nowait(message)
        callback = self._on_answer.pop(responded_to, None)
        if callback is not None:
            callback()

    async def _on_message(self, message: DimseMessage) -> None:
        command = message.command
        field = int(command["CommandField"])  # type: ignore[call-overload]
        if field & 0x8000 or field == C_CANCEL_RQ:
            self._on_message_now(message)
            return
        context = self.association.contexts[message.context_id]
        operation = Operation(self, message, context)
        service = self.services.get(field)
        self.requests_served += 1
        if service is None or not context.we_are_scp:
            await operation.respond(
                UNRECOGNIZED_OPERATION,
                error_comment=f"{command_name(command)} is not served on this context",
            )
            await self._discard(message)
            return
        if not service.concurrent:
            await self._serve(service, operation)
            return
        self._operations[operation.message_id] = operation
        task = asyncio.create_task(self._serve(service, operation))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, service: Service, operation: Operation) -> None:
        try:
            await service.handle(operation)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception(
                "service failed for %s from %s", command_name(operation.command), self.peer
            )
            if not operation.finished:
                await operation.respond(
                    PROCESSING_FAILURE, error_comment=f"processing failure: {exc}"
                )
        finally:
            if service.concurrent:
                self._operations.pop(operation.message_id, None)
            if operation.message.dataset is not None:
                await self._discard(operation.message)

    async def _discard(self, message: DimseMessage) -> None:
        dataset = message.dataset
        if dataset is not None and dataset.spool_path is not None:
            await asyncio.get_running_loop().run_in_executor(None, dataset.discard)
