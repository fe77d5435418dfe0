"""The association requestor on asyncio: C-MOVE sub-operations, tests and benchmarks."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from pynetdicom.pdu_primitives import A_ASSOCIATE, UserIdentityNegotiation

from minipacs.net import negotiation as neg
from minipacs.net.association import (
    AssociateAccepted,
    AssociateRejected,
    Association,
    Limits,
)
from minipacs.net.commands import (
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    DATASET_PRESENT,
    NO_DATASET,
    PRIORITY_MEDIUM,
    Command,
)
from minipacs.net.connection import open_connection
from minipacs.net.dimse import DimseMessage
from minipacs.net.operations import Service, is_pending
from minipacs.net.session import Session, Timeouts

SEND_BUFFER = 4 * 1024 * 1024


class AssociationRefused(Exception):
    """The peer rejected or aborted our A-ASSOCIATE-RQ, or could not be reached."""

    def __init__(self, message: str, reject: tuple[int, int, int] | None = None) -> None:
        super().__init__(message)
        self.reject = reject


class AssociationLost(Exception):
    """The association ended before the awaited response arrived."""


class ClientAssociation:
    """An established association we requested."""

    def __init__(self, session: Session, task: asyncio.Task[None]) -> None:
        self.session = session
        self._task = task

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        calling_ae: str,
        called_ae: str,
        contexts: Sequence[tuple[str, Sequence[str]]],
        roles: Mapping[str, tuple[bool, bool]] | None = None,
        services: Mapping[int, Service] | None = None,
        limits: Limits | None = None,
        timeouts: Timeouts | None = None,
        spool_dir: Path | None = None,
        connect_timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        user_identity: UserIdentityNegotiation | None = None,
    ) -> ClientAssociation:
        """Open a connection (over TLS with ssl_context), negotiate, return the association."""
        limits = limits or Limits()
        timeouts = timeouts or Timeouts()
        role_map = dict(roles or {})
        proposed = neg.build_requested_contexts(contexts)
        request = A_ASSOCIATE()
        request.application_context_name = neg.APPLICATION_CONTEXT_NAME
        request.calling_ae_title = calling_ae
        request.called_ae_title = called_ae
        request.presentation_context_definition_list = proposed
        request.user_information = neg.user_information_request(limits.max_pdu_length, role_map)
        if user_identity is not None:
            # PS3.7 D.3.3.7.1: username, with a passcode or not, as the caller built it.
            request.user_information.append(user_identity)
        association = Association(requestor=True, limits=limits)
        association.request(request)
        try:
            async with asyncio.timeout(connect_timeout):
                connection = await open_connection(host, port, ssl=ssl_context)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            raise AssociationRefused(f"cannot connect to {host}:{port}: {exc}") from exc
        # asyncio and uvloop set TCP_NODELAY on TCP transports themselves (tests/test_server.py).
        sock = connection.get_extra_info("socket")
        if sock is not None:
            # Room for a whole CT-size instance in the kernel: one write per C-STORE instead
            # of a drain cycle per socket-buffer fill (+10-20% C-MOVE throughput at 512x512).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        session = Session(
            association,
            connection,
            services=services or {},
            timeouts=timeouts,
            spool_dir=spool_dir or Path("."),
            peer=f"{host}:{port}",
        )
        session.calling_ae, session.called_ae = calling_ae, called_ae
        association.connection_made()
        session.flush()
        task = asyncio.create_task(session.run())
        try:
            async with asyncio.timeout(timeouts.artim):
                outcome = await session.established
        except TimeoutError:
            session.abort("no A-ASSOCIATE response")
            raise AssociationRefused(f"{host}:{port} did not answer A-ASSOCIATE-RQ") from None
        if isinstance(outcome, AssociateRejected):
            await task
            raise AssociationRefused(
                f"association rejected by {called_ae}@{host}:{port} "
                f"(result {outcome.result}, source {outcome.source}, reason {outcome.reason})",
                (outcome.result, outcome.source, outcome.reason),
            )
        if not isinstance(outcome, AssociateAccepted):
            await task
            raise AssociationRefused(f"association aborted by {host}:{port}: {session.outcome}")
        response = outcome.response
        association.set_accepted(
            neg.accepted_as_requestor(
                proposed, response.presentation_context_definition_results_list, role_map
            ),
            neg.peer_max_pdu(response.user_information),
        )
        return cls(session, task)

    @property
    def contexts(self) -> dict[int, neg.AcceptedContext]:
        """The accepted presentation contexts by ID."""
        return self.session.association.contexts

    def context_for(self, abstract_syntax: str, transfer_syntax: str | None = None) -> int:
        """The ID of an accepted context for this abstract (and transfer) syntax."""
        for context in self.contexts.values():
            if context.abstract_syntax == abstract_syntax and (
                transfer_syntax is None or context.transfer_syntax == transfer_syntax
            ):
                return context.context_id
        raise LookupError(f"no accepted context for {abstract_syntax} {transfer_syntax or ''}")

    async def request(
        self,
        context_id: int,
        command: Command,
        dataset: bytes | None = None,
        message_id: int | None = None,
    ) -> AsyncIterator[DimseMessage]:
        """Send a request and yield its responses, the final (non-Pending) one last."""
        if message_id is None:
            message_id = self.session.next_message_id()
        command = {**command, "MessageID": message_id}
        queue = await self.session.request(context_id, command, dataset)
        try:
            while True:
                response = await queue.get()
                if response is None:
                    raise AssociationLost(f"association ended: {self.session.outcome}")
                yield response
                if not is_pending(int(response.command.get("Status", 0))):  # type: ignore[call-overload]
                    return
        finally:
            self.session.forget_request(message_id)

    async def _single(self, context_id: int, command: Command, dataset: bytes | None) -> Command:
        async for response in self.request(context_id, command, dataset):
            final = response
        return final.command

    async def echo(self) -> int:
        """Send C-ECHO-RQ; return its status."""
        context_id = self.context_for(neg.VERIFICATION)
        command: Command = {
            "CommandField": C_ECHO_RQ,
            "AffectedSOPClassUID": neg.VERIFICATION,
            "CommandDataSetType": NO_DATASET,
        }
        response = await self._single(context_id, command, None)
        return int(response["Status"])  # type: ignore[call-overload]

    async def store(
        self,
        context_id: int,
        sop_class_uid: str,
        sop_instance_uid: str,
        dataset: bytes,
        *,
        move_originator: tuple[str, int] | None = None,
    ) -> Command:
        """Send C-STORE-RQ with an encoded data set; return the response command set."""
        command: Command = {
            "CommandField": C_STORE_RQ,
            "AffectedSOPClassUID": sop_class_uid,
            "AffectedSOPInstanceUID": sop_instance_uid,
            "Priority": PRIORITY_MEDIUM,
            "CommandDataSetType": DATASET_PRESENT,
        }
        if move_originator is not None:
            command["MoveOriginatorApplicationEntityTitle"] = move_originator[0]
            command["MoveOriginatorMessageID"] = move_originator[1]
        return await self._single(context_id, command, dataset)

    async def cancel(self, context_id: int, message_id: int) -> None:
        """Send C-CANCEL-RQ for a C-FIND/C-MOVE/C-GET in progress (PS3.7 9.3.2.3)."""
        command: Command = {
            "CommandField": C_CANCEL_RQ,
            "MessageIDBeingRespondedTo": message_id,
            "CommandDataSetType": NO_DATASET,
        }
        await self.session.send(context_id, command)

    async def release(self, timeout: float = 30.0) -> None:
        """Release the association and wait for the connection to end."""
        if self.session.association.established:
            await self.session.release(timeout)
        await self._task

    async def abort(self) -> None:
        """Abort the association."""
        self.session.abort("aborted by local user")
        await self._task

    async def __aenter__(self) -> ClientAssociation:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.release()
        else:
            await self.abort()
