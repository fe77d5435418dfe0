"""DIMSE operations as the services see them: a request, a way to answer, a cancel flag.

The net layer knows no service logic; it hands each request to a `Service` registered
for its Command Field, wrapped in an `Operation` that builds well-formed responses
(PS3.7 9.3) and logs one event per operation with its final status and duration.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from minipacs.logs import log_event
from minipacs.net.commands import (
    DATASET_PRESENT,
    NO_DATASET,
    Command,
    command_name,
)
from minipacs.net.dimse import DimseMessage
from minipacs.net.negotiation import AcceptedContext

if TYPE_CHECKING:
    from minipacs.net.session import Session

log = logging.getLogger("minipacs.dimse")

# Status codes shared by every service, PS3.7 Annex C.
SUCCESS: Final = 0x0000
CANCEL: Final = 0xFE00
PENDING: Final = 0xFF00
PENDING_WARNING: Final = 0xFF01
UNRECOGNIZED_OPERATION: Final = 0x0211
SOP_CLASS_NOT_SUPPORTED: Final = 0x0122
PROCESSING_FAILURE: Final = 0x0110
OUT_OF_RESOURCES: Final = 0xA700


def is_pending(status: int) -> bool:
    """True for Pending statuses, after which more responses follow (PS3.7 C.4)."""
    return status in (PENDING, PENDING_WARNING)


@dataclass(frozen=True)
class Service:
    """A handler for one Command Field; `concurrent` ones run beside the reader task."""

    handle: Callable[[Operation], Awaitable[None]]
    # C-FIND/MOVE/GET must see C-CANCEL and sub-operation responses while they run.
    concurrent: bool = False
    # The same answer given without awaiting (Operation.answer), for requests without a
    # data set: the session then serves them inside the connection's callback (C-ECHO).
    answer: Callable[[Operation], None] | None = None


class Operation:
    """One DIMSE request being served, with the means to answer it."""

    __slots__ = (
        "_cancelled",
        "_log_fields",
        "context",
        "finished",
        "message",
        "session",
        "started",
    )

    def __init__(self, session: Session, message: DimseMessage, context: AcceptedContext) -> None:
        self.session = session
        self.message = message
        self.context = context
        self.started = time.perf_counter()
        self.finished = False
        # Made when first asked for: most operations (every C-ECHO) add no field.
        self._log_fields: dict[str, object] | None = None
        self._cancelled: asyncio.Event | None = None

    @property
    def log_fields(self) -> dict[str, object]:
        """Service-specific fields of the operation's log event (e.g. a query's match count)."""
        if self._log_fields is None:
            self._log_fields = {}
        return self._log_fields

    @property
    def cancelled(self) -> asyncio.Event:
        """Set when the peer sent C-CANCEL for this operation (PS3.7 9.3.2.3)."""
        if self._cancelled is None:
            self._cancelled = asyncio.Event()
        return self._cancelled

    @property
    def command(self) -> Command:
        """The request's command set."""
        return self.message.command

    @property
    def message_id(self) -> int:
        """The request's Message ID."""
        return int(self.command.get("MessageID", 0))  # type: ignore[call-overload]

    async def respond(
        self,
        status: int,
        dataset: bytes | None = None,
        *,
        error_comment: str | None = None,
        **fields: object,
    ) -> None:
        """Send a response to this request; a non-Pending status ends the operation."""
        response = self._response(status, dataset, error_comment, fields)
        await self.session.send(self.message.context_id, response, dataset)
        self._sent(status, error_comment)

    def answer(self, status: int, error_comment: str | None = None) -> None:
        """Send a final response without a data set, not waiting for the transport.

        For services answering inside the connection's callback (see Session.send_now).
        """
        response = self._response(status, None, error_comment, {})
        self.session.send_now(self.message.context_id, response)
        self._sent(status, error_comment)

    def _sent(self, status: int, error_comment: str | None) -> None:
        """A response went out: a final one ends (and logs) the operation."""
        if not is_pending(status):
            self.finished = True
            self._log(status, error_comment)

    def _response(
        self,
        status: int,
        dataset: bytes | None,
        error_comment: str | None,
        fields: dict[str, object],
    ) -> Command:
        message = self.message
        request = message.command
        field_value = int(request["CommandField"]) | 0x8000  # type: ignore[call-overload]
        response: Command = {
            "CommandField": field_value,
            "MessageIDBeingRespondedTo": int(request.get("MessageID", 0)),  # type: ignore[call-overload]
            "AffectedSOPClassUID": request.get("AffectedSOPClassUID")
            or request.get("RequestedSOPClassUID")
            or self.context.abstract_syntax,
            "CommandDataSetType": DATASET_PRESENT if dataset is not None else NO_DATASET,
            "Status": status,
        }
        if "AffectedSOPInstanceUID" in request and field_value == 0x8001:
            response["AffectedSOPInstanceUID"] = request["AffectedSOPInstanceUID"]
        if error_comment:
            # PS3.7 C.4: Error Comment is LO, at most 64 characters.
            response["ErrorComment"] = error_comment[:64]
        if fields:
            response.update(fields)
        return response

    def _log(self, status: int, error_comment: str | None) -> None:
        seconds = time.perf_counter() - self.started
        session = self.session
        name = command_name(self.message.command)
        session.observer.operation(name, status, seconds)
        level = logging.INFO if status in (SUCCESS, CANCEL) else logging.WARNING
        if not log.isEnabledFor(level):
            return
        log_event(
            log,
            "dimse.operation",
            level=level,
            operation=name,
            message_id=self.message_id,
            calling_ae=session.calling_ae,
            peer=session.peer,
            sop_class=self.command.get("AffectedSOPClassUID"),
            sop_instance=self.command.get("AffectedSOPInstanceUID"),
            status=f"0x{status:04X}",
            error=error_comment,
            duration_ms=round(seconds * 1000, 3),
            **(self._log_fields or {}),
        )
