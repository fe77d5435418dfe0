"""One DICOM association, sans-I/O: bytes and local primitives in, bytes and events out.

`Association` joins the PDU framer, the PS3.8 state machine and the DIMSE assembler.
The I/O layer (server.py, client.py) feeds it received bytes with `receive_data`, calls
its primitives (`accept`, `send_message`, `release_response`...), writes whatever
`data_to_send` returns, runs the ARTIM timer while `artim_running` is true, and closes the
transport when `should_close` is set. Every state change goes through the state machine,
so an event that Table 9-10 does not allow in the current state cannot happen silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from pynetdicom.pdu_primitives import A_ASSOCIATE

from minipacs.net import pdu
from minipacs.net.commands import Command, encode_command
from minipacs.net.dimse import (
    DimseMessage,
    FramedDataset,
    MessageAssembler,
    encode_fragments,
    fragment_size,
)
from minipacs.net.negotiation import AcceptedContext
from minipacs.net.statemachine import ACTIONS, Action, ActionSpec, Event, State, StateMachine

# Largest P-DATA-TF we send even to a peer that accepts any size (its Max Length 0).
MAX_SEND_PDU = 4 * 1024 * 1024


@dataclass(slots=True)
class AssociateRequested:
    """An A-ASSOCIATE-RQ arrived (A-ASSOCIATE indication); answer with accept or reject."""

    request: A_ASSOCIATE
    protocol_version: int
    raw: bytes


@dataclass(slots=True)
class AssociateAccepted:
    """Our A-ASSOCIATE-RQ was accepted (A-ASSOCIATE confirmation, accept)."""

    response: A_ASSOCIATE


@dataclass(slots=True)
class AssociateRejected:
    """Our A-ASSOCIATE-RQ was rejected, with PS3.8 Table 9-21 result/source/reason."""

    result: int
    source: int
    reason: int


@dataclass(slots=True)
class MessageReceived:
    """A complete DIMSE message arrived (P-DATA indication)."""

    message: DimseMessage


@dataclass(slots=True)
class ReleaseRequested:
    """The peer asked to release (A-RELEASE indication); answer with release_response."""


@dataclass(slots=True)
class ReleaseConfirmed:
    """The peer confirmed our release request (A-RELEASE confirmation)."""


@dataclass(slots=True)
class Aborted:
    """The association ended abnormally: A-ABORT from the peer, or A-P-ABORT."""

    by_peer: bool
    source: int
    reason: int
    detail: str = ""


@dataclass(slots=True)
class Closed:
    """The transport is (to be) closed after an orderly end; nothing more will happen."""


AssociationEvent = (
    AssociateRequested
    | AssociateAccepted
    | AssociateRejected
    | MessageReceived
    | ReleaseRequested
    | ReleaseConfirmed
    | Aborted
    | Closed
)

# Enum members looked up on the class cost ~70 ns each (through the metaclass), a module
# global ~5 ns: the per-message paths use these.
_STA1: Final = State.STA1
_STA6: Final = State.STA6
# States in which P-DATA-TF PDUs are received (Sta7: after our A-RELEASE-RQ, PS3.8 7.2.2).
_DATA_TRANSFER: Final = (State.STA6, State.STA7)
_EVT9: Final = Event.EVT9
_EVT10: Final = Event.EVT10

_PDU_EVENTS = {
    pdu.ASSOCIATE_RQ: Event.EVT6,
    pdu.ASSOCIATE_AC: Event.EVT3,
    pdu.ASSOCIATE_RJ: Event.EVT4,
    pdu.P_DATA_TF: Event.EVT10,
    pdu.RELEASE_RQ: Event.EVT12,
    pdu.RELEASE_RP: Event.EVT13,
    pdu.ABORT: Event.EVT16,
}


def _effects(spec: ActionSpec) -> tuple[int | None, bool, bool | None, bool]:
    """(A-ABORT source or None, sends its payload, ARTIM on/off/unchanged, closes)."""
    abort_source = (spec.abort_source or 0) if spec.sends == "A-ABORT" else None
    artim = {"start": True, "restart": True, "stop": False}.get(spec.artim or "")
    return abort_source, spec.sends is not None, artim, spec.close_transport


# ACTIONS as plain tuples: _fire runs twice per DIMSE message.
_EFFECTS: Final = {action: _effects(spec) for action, spec in ACTIONS.items()}


@dataclass
class Limits:
    """Per-association limits, from configuration."""

    max_pdu_length: int = 1024 * 1024
    max_associate_length: int = 1024 * 1024
    spool_threshold: int = 8 * 1024 * 1024
    max_dataset_size: int = 4 * 1024 * 1024 * 1024


class AssociationError(Exception):
    """A local primitive was called in a state that does not allow it."""


@dataclass
class _Outbox:
    buffers: list[bytes | memoryview] = field(default_factory=list)


class Association:
    """The sans-I/O protocol object of one association, acceptor or requestor side."""

    def __init__(self, requestor: bool, limits: Limits | None = None) -> None:
        self.requestor = requestor
        self.limits = limits or Limits()
        self.machine = StateMachine(requestor=requestor)
        self.reader = pdu.PduReader(self.limits.max_pdu_length, self.limits.max_associate_length)
        self.contexts: dict[int, AcceptedContext] = {}
        self.assembler = MessageAssembler(
            self.contexts, self.limits.spool_threshold, self.limits.max_dataset_size
        )
        self.peer_max_pdu = 0
        self.artim_running = False
        self.should_close = False
        self.error: str = ""
        self._out: list[bytes | memoryview] = []
        self._discard_input = False
        self._pending_request: tuple[bytes, ...] = ()

    @property
    def state(self) -> State:
        """The PS3.8 state."""
        return self.machine.state

    @property
    def awaiting_response(self) -> bool:
        """True in Sta3: an A-ASSOCIATE-RQ waits for accept() or reject()."""
        return self.machine.state == State.STA3

    @property
    def established(self) -> bool:
        """True in Sta6, when DIMSE messages may flow both ways."""
        return self.machine.state == _STA6

    @property
    def finished(self) -> bool:
        """True once back in Sta1: nothing more will happen on this association."""
        return self.machine.state == _STA1

    def data_to_send(self) -> list[bytes | memoryview]:
        """Take the buffers to write to the transport, in order."""
        out, self._out = self._out, []
        return out

    def _fire(
        self, event: Event, payload: tuple[bytes | memoryview, ...] = (), reason: int = 0
    ) -> Action:
        action = self.machine.fire(event)
        abort_source, sends, artim, close = _EFFECTS[action]
        if abort_source is not None:
            self._out.append(pdu.encode_abort(abort_source, reason))
        elif sends:
            self._out.extend(payload)
        if artim is not None:
            self.artim_running = artim
        if close:
            self.should_close = True
        if self.machine.state == _STA1:
            self.artim_running = False
            self.should_close = True
        return action

    def _local(self, event: Event, payload: tuple[bytes | memoryview, ...] = ()) -> Action:
        try:
            return self._fire(event, payload)
        except Exception as exc:  # InvalidTransition: a local primitive at the wrong time
            raise AssociationError(f"{event.name} not allowed in {self.state.name}") from exc

    # Transport events.

    def connection_made(self) -> None:
        """The transport is connected (Evt5 for an acceptor, Evt2 for a requestor)."""
        self._fire(Event.EVT2 if self.requestor else Event.EVT5, self._pending_request)

    def connection_lost(self) -> list[AssociationEvent]:
        """The transport closed (Evt17)."""
        if self.finished:
            return []
        self.assembler.discard()
        action = self._fire(Event.EVT17)
        if action is Action.AA_4:
            return [Aborted(False, pdu.ABORT_SOURCE_PROVIDER, 0, "connection closed by peer")]
        return [Closed()]

    def artim_expired(self) -> list[AssociationEvent]:
        """The ARTIM timer ran out (Evt18): close the transport."""
        self.assembler.discard()
        self._fire(Event.EVT18)
        return [Closed()]

    def receive_data(self, data: bytes) -> list[AssociationEvent]:
        """Consume bytes from the transport; return what they meant."""
        machine = self.machine
        if self._discard_input or machine.state == _STA1:
            return []
        reader = self.reader
        reader.feed(data)
        events: list[AssociationEvent] = []
        # `finished` spelled out: this loop runs twice per message.
        while not self._discard_input and machine.state != _STA1:
            try:
                item = reader.next_pdu()
                if item is None:
                    break
                events.extend(self._on_pdu(*item))
            except pdu.PduError as exc:
                events.extend(self._invalid_pdu(str(exc), exc.reason))
        return events

    def _invalid_pdu(self, detail: str, reason: int) -> list[AssociationEvent]:
        # Evt19: the rest of the stream cannot be framed any more, so it is dropped.
        self.error = detail
        self._discard_input = True
        self.assembler.discard()
        action = self._fire(Event.EVT19, reason=reason)
        if action is Action.AA_8 or action is Action.AA_1:
            return [Aborted(False, pdu.ABORT_SOURCE_PROVIDER, reason, detail)]
        return []

    def _on_pdu(self, pdu_type: int, raw: bytes) -> list[AssociationEvent]:
        event = _PDU_EVENTS[pdu_type]
        state = self.machine.state
        # P-DATA-TF first: it is all but a handful of the PDUs of an association.
        if event is _EVT10 and state in _DATA_TRANSFER:
            messages = self.assembler.feed(pdu.parse_pdata(raw))
            self._fire(event)
            if len(messages) == 1:
                # The usual P-DATA-TF: one whole message (a comprehension is a call).
                return [MessageReceived(messages[0])]
            return [MessageReceived(m) for m in messages]
        if event is Event.EVT6 and state == State.STA2:
            request = pdu.decode_associate_rq(raw)
            self._fire(event)
            return [AssociateRequested(request, int.from_bytes(raw[6:8], "big"), raw)]
        if event is Event.EVT3 and state == State.STA5:
            response = pdu.decode_associate_ac(raw)
            self._fire(event)
            return [AssociateAccepted(response)]
        action = self._fire(event, reason=pdu.ABORT_REASON_UNEXPECTED_PDU)
        if action is Action.AE_4:
            return [AssociateRejected(*pdu.decode_fixed(raw))]
        if action in (Action.AR_2, Action.AR_8):
            return [ReleaseRequested()]
        if action in (Action.AR_3, Action.AR_10):
            return [ReleaseConfirmed()]
        if action is Action.AA_3:
            _, source, reason = pdu.decode_fixed(raw)
            return [Aborted(True, source, reason, "A-ABORT from peer")]
        if action is Action.AA_8:
            self.assembler.discard()
            name = pdu.PDU_NAMES[pdu_type]
            self.error = f"unexpected {name} in {state.name}"
            return [Aborted(False, pdu.ABORT_SOURCE_PROVIDER, 2, self.error)]
        if action in (Action.AA_2, Action.AR_5, Action.AA_1):
            return [Closed()]
        return []

    # Local primitives, acceptor side.

    def accept(
        self, response: bytes, contexts: dict[int, AcceptedContext], peer_max_pdu: int
    ) -> None:
        """Send an encoded A-ASSOCIATE-AC (Evt7); enter data transfer with these contexts."""
        self.contexts.update(contexts)
        self.peer_max_pdu = peer_max_pdu
        self._local(Event.EVT7, (response,))

    def reject(self, result: int, source: int, reason: int) -> None:
        """Send A-ASSOCIATE-RJ (Evt8), PS3.8 Table 9-21 values."""
        self._local(Event.EVT8, (pdu.encode_reject(result, source, reason),))

    def release_response(self) -> None:
        """Answer the peer's A-RELEASE-RQ with A-RELEASE-RP (Evt14)."""
        self._local(Event.EVT14, (pdu.RELEASE_RP_PDU,))

    # Local primitives, requestor side.

    def request(self, request: A_ASSOCIATE) -> None:
        """Start a requestor association (Evt1); the RQ goes out on connection_made."""
        self._pending_request = (pdu.encode_associate_rq(request),)
        self._local(Event.EVT1)

    def set_accepted(self, contexts: dict[int, AcceptedContext], peer_max_pdu: int) -> None:
        """Record the contexts an A-ASSOCIATE-AC accepted (requestor side)."""
        self.contexts.update(contexts)
        self.peer_max_pdu = peer_max_pdu

    def release_request(self) -> None:
        """Send A-RELEASE-RQ (Evt11)."""
        self._local(Event.EVT11, (pdu.RELEASE_RQ_PDU,))

    # Either side.

    @property
    def max_fragment(self) -> int:
        """The largest PDV payload we send: the peer's maximum PDU length allows it."""
        return fragment_size(self.peer_max_pdu, MAX_SEND_PDU)

    def send_message(
        self,
        context_id: int,
        command: Command,
        dataset: bytes | memoryview | FramedDataset | None = None,
    ) -> None:
        """Queue a DIMSE message as P-DATA-TF PDUs (Evt9)."""
        if dataset is None:
            encoded = encode_command(command)
            if len(encoded) <= self.max_fragment:
                # A command alone in one PDV, the usual response (command sets are even).
                header = pdu.pdata_header(context_id, True, True, len(encoded))
                self._local(_EVT9, (header, encoded))
                return
        self.send_framed(self.frame_message(context_id, command, dataset))

    def frame_message(
        self,
        context_id: int,
        command: Command,
        dataset: bytes | memoryview | FramedDataset | None = None,
    ) -> tuple[bytes | memoryview, ...]:
        """The P-DATA-TF PDUs of a DIMSE message, to send later with `send_framed`."""
        fragments = self._fragments(context_id, encode_command(command), True)
        if isinstance(dataset, FramedDataset):
            if (dataset.context_id, dataset.max_fragment) != (context_id, self.max_fragment):
                raise AssociationError("data set framed for another context or PDU size")
            fragments.extend(dataset.pdus)
        elif dataset is not None:
            fragments.extend(self._fragments(context_id, dataset, False))
        return tuple(fragments)

    def send_framed(self, pdus: tuple[bytes | memoryview, ...]) -> None:
        """Queue the PDUs of one DIMSE message made by `frame_message` (Evt9)."""
        self._local(_EVT9, pdus)

    def send_dataset_fragments(self, context_id: int, data: bytes | memoryview, last: bool) -> None:
        """Queue one piece of a data set streamed from disk (command already sent)."""
        size = fragment_size(self.peer_max_pdu, MAX_SEND_PDU)
        fragments: list[bytes | memoryview] = []
        view = memoryview(data)
        for start in range(0, len(view), size):
            chunk = view[start : start + size]
            is_last = last and start + size >= len(view)
            fragments.append(pdu.pdata_header(context_id, False, is_last, len(chunk)))
            fragments.append(chunk)
        self._local(Event.EVT9, tuple(fragments))

    def _fragments(
        self, context_id: int, data: bytes | memoryview, command: bool
    ) -> list[bytes | memoryview]:
        size = fragment_size(self.peer_max_pdu, MAX_SEND_PDU)
        if len(data) <= size and not len(data) % 2:
            # One PDV, no padding: every command set and most small data sets.
            return [pdu.pdata_header(context_id, command, True, len(data)), data]
        return list(encode_fragments(context_id, data, command, size))

    def abort(self) -> None:
        """Send A-ABORT as the service user (Evt15)."""
        if self.state in (State.STA1, State.STA13):
            self.should_close = True
            return
        self.assembler.discard()
        self._local(Event.EVT15)
