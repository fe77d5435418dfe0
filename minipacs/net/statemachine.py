"""The DICOM Upper Layer association state machine of PS3.8 9.2, sans-I/O and table-driven.

Rules that govern this module:

1. It only decides. `StateMachine.fire` looks up the cell of PS3.8 Table 9-10 for
   (current state, event), enters the cell's next state and returns the cell's action.
   Doing the action (sending a PDU, issuing a primitive to the local user, starting or
   stopping the ARTIM timer, opening or closing the transport) is the caller's job;
   `ACTIONS` says what each action asks for. No sockets, no asyncio, no clocks.
2. `TRANSITIONS` holds exactly the non-empty cells of Table 9-10 (123 of 13 x 19). An
   empty cell is either a local programming error (a primitive issued at the wrong time)
   or an event that cannot occur in that state (a PDU before the transport is open), so
   `fire` raises `InvalidTransition` and leaves the state unchanged.
3. The state changes only through `fire`, and only to a member of `State`.
4. Two actions have a conditional next state (PS3.8 9.2.2):
   - AE-6 (Sta2, Evt6) is listed as going to Sta3. Its "A-ASSOCIATE-RQ not acceptable by
     the service-provider" branch (send A-ASSOCIATE-RJ, start ARTIM, Sta13) is taken by
     the caller firing Evt8 from Sta3, which is AE-8 to Sta13: the same PDU, timer and
     state, without a second code path.
   - AR-8 (Sta7, Evt12, release collision) is listed as going to Sta9; `fire` sends the
     association-acceptor to Sta10 instead, as AR-8 prescribes.
5. AA-3 issues A-ABORT indication when the received A-ABORT PDU's source is the
   service-user (0) and A-P-ABORT indication when it is the service-provider (2); only
   the caller has the PDU, so `ACTIONS[Action.AA_3]` names the A-ABORT case.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

__all__ = [
    "ACTIONS",
    "TRANSITIONS",
    "Action",
    "ActionSpec",
    "Event",
    "InvalidTransition",
    "State",
    "StateMachine",
]


class State(enum.IntEnum):
    """PS3.8 9.2.1 states (Tables 9-1 to 9-5)."""

    STA1 = 1  # Idle
    STA2 = 2  # Transport connection open (awaiting A-ASSOCIATE-RQ PDU)
    STA3 = 3  # Awaiting local A-ASSOCIATE response primitive (from local user)
    STA4 = 4  # Awaiting transport connection opening to complete (from transport service)
    STA5 = 5  # Awaiting A-ASSOCIATE-AC or A-ASSOCIATE-RJ PDU
    STA6 = 6  # Association established and ready for data transfer
    STA7 = 7  # Awaiting A-RELEASE-RP PDU
    STA8 = 8  # Awaiting local A-RELEASE response primitive (from local user)
    STA9 = 9  # Release collision requestor side; awaiting A-RELEASE response (local user)
    STA10 = 10  # Release collision acceptor side; awaiting A-RELEASE-RP PDU
    STA11 = 11  # Release collision requestor side; awaiting A-RELEASE-RP PDU
    STA12 = 12  # Release collision acceptor side; awaiting A-RELEASE response (local user)
    STA13 = 13  # Awaiting transport connection close indication (association gone)


class Event(enum.IntEnum):
    """PS3.8 Table 9-10 events, EVT1 to EVT19, each with a readable alias."""

    EVT1 = 1  # A-ASSOCIATE request (local user)
    EVT2 = 2  # Transport connect confirmation (local transport service)
    EVT3 = 3  # A-ASSOCIATE-AC PDU (received on transport connection)
    EVT4 = 4  # A-ASSOCIATE-RJ PDU (received on transport connection)
    EVT5 = 5  # Transport connection indication (local transport service)
    EVT6 = 6  # A-ASSOCIATE-RQ PDU (received on transport connection)
    EVT7 = 7  # A-ASSOCIATE response primitive (accept)
    EVT8 = 8  # A-ASSOCIATE response primitive (reject)
    EVT9 = 9  # P-DATA request primitive
    EVT10 = 10  # P-DATA-TF PDU
    EVT11 = 11  # A-RELEASE request primitive
    EVT12 = 12  # A-RELEASE-RQ PDU (received on open transport connection)
    EVT13 = 13  # A-RELEASE-RP PDU (received on transport connection)
    EVT14 = 14  # A-RELEASE response primitive
    EVT15 = 15  # A-ABORT request primitive
    EVT16 = 16  # A-ABORT PDU (received on open transport connection)
    EVT17 = 17  # Transport connection closed indication (local transport service)
    EVT18 = 18  # ARTIM timer expired (association reject/release timer)
    EVT19 = 19  # Unrecognized or invalid PDU received

    ASSOCIATE_REQUEST = 1
    TRANSPORT_CONNECT_CONFIRM = 2
    ASSOCIATE_AC_PDU = 3
    ASSOCIATE_RJ_PDU = 4
    TRANSPORT_CONNECTED_INDICATION = 5
    ASSOCIATE_RQ_PDU = 6
    ASSOCIATE_ACCEPT = 7
    ASSOCIATE_REJECT = 8
    P_DATA_REQUEST = 9
    P_DATA_TF_PDU = 10
    RELEASE_REQUEST = 11
    RELEASE_RQ_PDU = 12
    RELEASE_RP_PDU = 13
    RELEASE_RESPONSE = 14
    ABORT_REQUEST = 15
    ABORT_PDU = 16
    TRANSPORT_CLOSED = 17
    ARTIM_EXPIRED = 18
    INVALID_PDU = 19


class Action(enum.Enum):
    """PS3.8 9.2.2 actions (Tables 9-6 to 9-9), valued by their standard names."""

    AE_1 = "AE-1"
    AE_2 = "AE-2"
    AE_3 = "AE-3"
    AE_4 = "AE-4"
    AE_5 = "AE-5"
    AE_6 = "AE-6"
    AE_7 = "AE-7"
    AE_8 = "AE-8"
    DT_1 = "DT-1"
    DT_2 = "DT-2"
    AR_1 = "AR-1"
    AR_2 = "AR-2"
    AR_3 = "AR-3"
    AR_4 = "AR-4"
    AR_5 = "AR-5"
    AR_6 = "AR-6"
    AR_7 = "AR-7"
    AR_8 = "AR-8"
    AR_9 = "AR-9"
    AR_10 = "AR-10"
    AA_1 = "AA-1"
    AA_2 = "AA-2"
    AA_3 = "AA-3"
    AA_4 = "AA-4"
    AA_5 = "AA-5"
    AA_6 = "AA-6"
    AA_7 = "AA-7"
    AA_8 = "AA-8"

    # Members are singletons compared by identity, so identity hashing is consistent;
    # Enum's own __hash__ is Python code, run on every ACTIONS lookup (twice per message).
    __hash__ = object.__hash__


@dataclass(frozen=True)
class ActionSpec:
    """What an action asks the I/O layer to do; AA-3's indication depends on the PDU source."""

    sends: str | None = None
    abort_source: int | None = None
    indication: str | None = None
    artim: str | None = None
    close_transport: bool = False
    connect_transport: bool = False


_USER: Final = 0  # A-ABORT source: DICOM UL service-user (PS3.8 Table 9-26)
_PROVIDER: Final = 2  # A-ABORT source: DICOM UL service-provider (PS3.8 Table 9-26)

ACTIONS: Final[Mapping[Action, ActionSpec]] = {
    Action.AE_1: ActionSpec(connect_transport=True),
    Action.AE_2: ActionSpec(sends="A-ASSOCIATE-RQ"),
    Action.AE_3: ActionSpec(indication="A-ASSOCIATE confirmation (accept)"),
    Action.AE_4: ActionSpec(indication="A-ASSOCIATE confirmation (reject)", close_transport=True),
    # Accepting the TCP connection is the transport's "response primitive"; only ARTIM is ours.
    Action.AE_5: ActionSpec(artim="start"),
    Action.AE_6: ActionSpec(indication="A-ASSOCIATE indication", artim="stop"),
    Action.AE_7: ActionSpec(sends="A-ASSOCIATE-AC"),
    Action.AE_8: ActionSpec(sends="A-ASSOCIATE-RJ", artim="start"),
    Action.DT_1: ActionSpec(sends="P-DATA-TF"),
    Action.DT_2: ActionSpec(indication="P-DATA indication"),
    Action.AR_1: ActionSpec(sends="A-RELEASE-RQ"),
    Action.AR_2: ActionSpec(indication="A-RELEASE indication"),
    Action.AR_3: ActionSpec(indication="A-RELEASE confirmation", close_transport=True),
    # The acceptor of the release waits (ARTIM) for the requestor to close (PS3.8 9.1.4).
    Action.AR_4: ActionSpec(sends="A-RELEASE-RP", artim="start"),
    Action.AR_5: ActionSpec(artim="stop"),
    Action.AR_6: ActionSpec(indication="P-DATA indication"),
    Action.AR_7: ActionSpec(sends="P-DATA-TF"),
    Action.AR_8: ActionSpec(indication="A-RELEASE indication"),
    Action.AR_9: ActionSpec(sends="A-RELEASE-RP"),
    Action.AR_10: ActionSpec(indication="A-RELEASE confirmation"),
    # "Start (or restart if already started)": in Sta2 ARTIM is already running from AE-5.
    Action.AA_1: ActionSpec(sends="A-ABORT", abort_source=_USER, artim="restart"),
    Action.AA_2: ActionSpec(artim="stop", close_transport=True),
    # Rule 5 of the module docstring: A-P-ABORT indication if the PDU's source is 2.
    Action.AA_3: ActionSpec(indication="A-ABORT indication", close_transport=True),
    Action.AA_4: ActionSpec(indication="A-P-ABORT indication"),
    Action.AA_5: ActionSpec(artim="stop"),
    Action.AA_6: ActionSpec(),
    Action.AA_7: ActionSpec(sends="A-ABORT", abort_source=_PROVIDER),
    Action.AA_8: ActionSpec(
        sends="A-ABORT", abort_source=_PROVIDER, indication="A-P-ABORT indication", artim="start"
    ),
}

_Cell = tuple[Action, State]
_Row = dict[State, _Cell]

# Sta3 and Sta5 to Sta12: a transport is open and the local user takes part in an
# association or its negotiation. Sta4 is absent: no transport yet, so no PDU can arrive.
_ENGAGED: Final = (State.STA3, *(State(n) for n in range(5, 13)))


def _pdu_row(sta13: Action, **expected: _Cell) -> _Row:
    """A row for a received PDU: unexpected everywhere except the named states."""
    # Before an association is negotiated (Sta2) the provider aborts without telling a
    # user (AA-1); once a user is involved it is told too (AA-8); in Sta13 the
    # association is already gone (AA-6 ignores, AA-7 aborts again).
    row: _Row = {State.STA2: (Action.AA_1, State.STA13)}
    row.update({state: (Action.AA_8, State.STA13) for state in _ENGAGED})
    row[State.STA13] = (sta13, State.STA13)
    row.update({State[name.upper()]: cell for name, cell in expected.items()})
    return row


# PS3.8 Table 9-10, one row per event: {state: (action, next state)}. Next states are
# those of Tables 9-6 to 9-9; AR-8's acceptor branch is in StateMachine.fire.
_TABLE: Final[Mapping[Event, _Row]] = {
    Event.EVT1: {State.STA1: (Action.AE_1, State.STA4)},
    Event.EVT2: {State.STA4: (Action.AE_2, State.STA5)},
    Event.EVT3: _pdu_row(Action.AA_6, sta5=(Action.AE_3, State.STA6)),
    Event.EVT4: _pdu_row(Action.AA_6, sta5=(Action.AE_4, State.STA1)),
    Event.EVT5: {State.STA1: (Action.AE_5, State.STA2)},
    # A second A-ASSOCIATE-RQ after the association ended is answered with A-ABORT (AA-7).
    Event.EVT6: _pdu_row(Action.AA_7, sta2=(Action.AE_6, State.STA3)),
    Event.EVT7: {State.STA3: (Action.AE_7, State.STA6)},
    Event.EVT8: {State.STA3: (Action.AE_8, State.STA13)},
    # After receiving A-RELEASE-RQ the acceptor may still send data (Sta8), PS3.8 7.2.2.
    Event.EVT9: {State.STA6: (Action.DT_1, State.STA6), State.STA8: (Action.AR_7, State.STA8)},
    # After sending A-RELEASE-RQ the requestor must still accept data (Sta7), PS3.8 7.2.2.
    Event.EVT10: _pdu_row(
        Action.AA_6, sta6=(Action.DT_2, State.STA6), sta7=(Action.AR_6, State.STA7)
    ),
    Event.EVT11: {State.STA6: (Action.AR_1, State.STA7)},
    Event.EVT12: _pdu_row(
        Action.AA_6, sta6=(Action.AR_2, State.STA8), sta7=(Action.AR_8, State.STA9)
    ),
    Event.EVT13: _pdu_row(
        Action.AA_6,
        sta7=(Action.AR_3, State.STA1),
        sta10=(Action.AR_10, State.STA12),
        sta11=(Action.AR_3, State.STA1),
    ),
    Event.EVT14: {
        State.STA8: (Action.AR_4, State.STA13),
        State.STA9: (Action.AR_9, State.STA11),
        State.STA12: (Action.AR_4, State.STA13),
    },
    # Sta4 has no transport to send an A-ABORT PDU on, so the attempt is just dropped.
    Event.EVT15: {
        State.STA4: (Action.AA_2, State.STA1),
        **{state: (Action.AA_1, State.STA13) for state in _ENGAGED},
    },
    # Sta2 and Sta13 have no user to tell: just close.
    Event.EVT16: {
        State.STA2: (Action.AA_2, State.STA1),
        **{state: (Action.AA_3, State.STA1) for state in _ENGAGED},
        State.STA13: (Action.AA_2, State.STA1),
    },
    # Sta4 is included: a failed connect is reported as A-P-ABORT.
    Event.EVT17: {
        State.STA2: (Action.AA_5, State.STA1),
        **{State(n): (Action.AA_4, State.STA1) for n in range(3, 13)},
        State.STA13: (Action.AR_5, State.STA1),
    },
    # ARTIM runs only while waiting for A-ASSOCIATE-RQ (Sta2) or for the close (Sta13).
    Event.EVT18: {State.STA2: (Action.AA_2, State.STA1), State.STA13: (Action.AA_2, State.STA1)},
    Event.EVT19: _pdu_row(Action.AA_7),
}

TRANSITIONS: Final[Mapping[tuple[State, Event], _Cell]] = {
    (state, event): cell for event, row in _TABLE.items() for state, cell in row.items()
}


class InvalidTransition(Exception):
    """An event whose Table 9-10 cell is empty in the current state."""

    def __init__(self, state: State, event: Event) -> None:
        super().__init__(state, event)
        self.state = state
        self.event = event

    def __str__(self) -> str:
        """Name the empty cell the way the standard does."""
        return f"Evt{int(self.event)} is not valid in Sta{int(self.state)} (PS3.8 Table 9-10)"


# Class attribute lookups of Enum members go through the metaclass (~70 ns each); fire
# runs twice per DIMSE message.
_AR_8: Final = Action.AR_8


class StateMachine:
    """One association's PS3.8 9.2 state; only `fire` moves it."""

    state: State
    requestor: bool

    def __init__(self, requestor: bool) -> None:
        self.requestor = requestor
        self.state = State.STA1

    def fire(self, event: Event) -> Action:
        """Apply an event: enter the next state and return the action the caller must do."""
        cell = TRANSITIONS.get((self.state, event))
        if cell is None:
            raise InvalidTransition(self.state, event)
        action, next_state = cell
        # AR-8 (PS3.8 Table 9-8): the association-acceptor's side of a collision is Sta10.
        if action is _AR_8 and not self.requestor:
            next_state = State.STA10
        self.state = next_state
        return action
