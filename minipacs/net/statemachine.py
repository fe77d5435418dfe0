"""The DICOM Upper Layer association state machine (PS3.8 9.2), sans-I/O and table-driven.

Rules that govern this module:
- It only decides. Given the current state and an event it names the action and the
  next state, exactly as PS3.8 Table 9-10 does; the caller performs the action (send a
  PDU, start a timer, close the transport). No sockets, no asyncio, no clocks.
- Every cell of Table 9-10 is in TRANSITIONS; a (state, event) pair the table leaves
  empty raises InvalidTransition and leaves the state unchanged.
- Two cells have a conditional next state. AE-6 (Sta2, Evt6) goes to Sta3 here; its
  "not acceptable" branch is taken by the caller firing Evt8 from Sta3 (AE-8, Sta13).
  AR-8 (Sta7, Evt12, release collision) goes to Sta9 for the association-requestor and
  to Sta10 for the acceptor (PS3.8 9.2.3).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final


class State(enum.IntEnum):
    """PS3.8 Table 9-1 states."""

    STA1 = 1  # Idle
    STA2 = 2  # Transport connection open, awaiting A-ASSOCIATE-RQ PDU
    STA3 = 3  # Awaiting local A-ASSOCIATE response primitive
    STA4 = 4  # Awaiting transport connection opening to complete
    STA5 = 5  # Awaiting A-ASSOCIATE-AC or -RJ PDU
    STA6 = 6  # Association established, ready for data transfer
    STA7 = 7  # Awaiting A-RELEASE-RP PDU
    STA8 = 8  # Awaiting local A-RELEASE response primitive
    STA9 = 9  # Release collision, requestor side: awaiting A-RELEASE response
    STA10 = 10  # Release collision, acceptor side: awaiting A-RELEASE-RP PDU
    STA11 = 11  # Release collision, requestor side: awaiting A-RELEASE-RP PDU
    STA12 = 12  # Release collision, acceptor side: awaiting A-RELEASE response
    STA13 = 13  # Awaiting transport connection close indication


class Event(enum.IntEnum):
    """PS3.8 Table 9-2 events, with readable aliases."""

    EVT1 = 1
    EVT2 = 2
    EVT3 = 3
    EVT4 = 4
    EVT5 = 5
    EVT6 = 6
    EVT7 = 7
    EVT8 = 8
    EVT9 = 9
    EVT10 = 10
    EVT11 = 11
    EVT12 = 12
    EVT13 = 13
    EVT14 = 14
    EVT15 = 15
    EVT16 = 16
    EVT17 = 17
    EVT18 = 18
    EVT19 = 19
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
    """PS3.8 Table 9-6 to 9-9 actions."""

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


@dataclass(frozen=True)
class ActionSpec:
    """What an action asks the I/O layer to do."""

    sends: str | None = None
    abort_source: int | None = None
    indication: str | None = None
    artim: str | None = None
    close_transport: bool = False
    connect_transport: bool = False


_ABORT_INDICATION: Final = "A-ABORT indication"
_P_ABORT_INDICATION: Final = "A-P-ABORT indication"

ACTIONS: Final[Mapping[Action, ActionSpec]] = {
    Action.AE_1: ActionSpec(connect_transport=True),
    Action.AE_2: ActionSpec(sends="A-ASSOCIATE-RQ"),
    Action.AE_3: ActionSpec(indication="A-ASSOCIATE confirmation (accept)"),
    Action.AE_4: ActionSpec(indication="A-ASSOCIATE confirmation (reject)", close_transport=True),
    Action.AE_5: ActionSpec(artim="start"),
    Action.AE_6: ActionSpec(indication="A-ASSOCIATE indication", artim="stop"),
    Action.AE_7: ActionSpec(sends="A-ASSOCIATE-AC"),
    Action.AE_8: ActionSpec(sends="A-ASSOCIATE-RJ", artim="start"),
    Action.DT_1: ActionSpec(sends="P-DATA-TF"),
    Action.DT_2: ActionSpec(indication="P-DATA indication"),
    Action.AR_1: ActionSpec(sends="A-RELEASE-RQ"),
    Action.AR_2: ActionSpec(indication="A-RELEASE indication"),
    Action.AR_3: ActionSpec(indication="A-RELEASE confirmation", close_transport=True),
    Action.AR_4: ActionSpec(sends="A-RELEASE-RP", artim="start"),
    Action.AR_5: ActionSpec(artim="stop"),
    Action.AR_6: ActionSpec(indication="P-DATA indication"),
    Action.AR_7: ActionSpec(sends="P-DATA-TF"),
    Action.AR_8: ActionSpec(indication="A-RELEASE indication"),
    Action.AR_9: ActionSpec(sends="A-RELEASE-RP"),
    Action.AR_10: ActionSpec(indication="A-RELEASE confirmation"),
    Action.AA_1: ActionSpec(sends="A-ABORT", abort_source=0, artim="restart"),
    Action.AA_2: ActionSpec(artim="stop", close_transport=True),
    # AA-3: A-ABORT indication if the PDU's source was the service user, else A-P-ABORT.
    Action.AA_3: ActionSpec(indication=_ABORT_INDICATION, close_transport=True),
    Action.AA_4: ActionSpec(indication=_P_ABORT_INDICATION),
    Action.AA_5: ActionSpec(artim="stop"),
    Action.AA_6: ActionSpec(),
    Action.AA_7: ActionSpec(sends="A-ABORT", abort_source=2),
    Action.AA_8: ActionSpec(
        sends="A-ABORT", abort_source=2, indication=_P_ABORT_INDICATION, artim="start"
    ),
}

S = State
A = Action

# Rows shared by most PDU events: (state -> action) where the table repeats itself.
_UNEXPECTED_PDU: Final = {
    S.STA2: (A.AA_1, S.STA13),
    S.STA3: (A.AA_8, S.STA13),
    S.STA5: (A.AA_8, S.STA13),
    **{state: (A.AA_8, S.STA13) for state in range(6, 13)},
    S.STA13: (A.AA_6, S.STA13),
}


def _row(base: Mapping[int, tuple[Action, State]], **cells: tuple[Action, State]) -> dict:
    row = {State(state): cell for state, cell in base.items()}
    row.update({State[name.upper()]: cell for name, cell in cells.items()})
    return row


# PS3.8 Table 9-10, one row per event: {state: (action, next state)}.
_TABLE: Final[Mapping[Event, Mapping[State, tuple[Action, State]]]] = {
    Event.EVT1: {S.STA1: (A.AE_1, S.STA4)},
    Event.EVT2: {S.STA4: (A.AE_2, S.STA5)},
    Event.EVT3: _row(_UNEXPECTED_PDU, sta5=(A.AE_3, S.STA6)),
    Event.EVT4: _row(_UNEXPECTED_PDU, sta5=(A.AE_4, S.STA1)),
    Event.EVT5: {S.STA1: (A.AE_5, S.STA2)},
    Event.EVT6: _row(_UNEXPECTED_PDU, sta2=(A.AE_6, S.STA3), sta13=(A.AA_7, S.STA13)),
    Event.EVT7: {S.STA3: (A.AE_7, S.STA6)},
    Event.EVT8: {S.STA3: (A.AE_8, S.STA13)},
    Event.EVT9: {S.STA6: (A.DT_1, S.STA6), S.STA8: (A.AR_7, S.STA8)},
    Event.EVT10: _row(_UNEXPECTED_PDU, sta6=(A.DT_2, S.STA6), sta7=(A.AR_6, S.STA7)),
    Event.EVT11: {S.STA6: (A.AR_1, S.STA7)},
    Event.EVT12: _row(_UNEXPECTED_PDU, sta6=(A.AR_2, S.STA8), sta7=(A.AR_8, S.STA9)),
    Event.EVT13: _row(
        _UNEXPECTED_PDU,
        sta7=(A.AR_3, S.STA1),
        sta10=(A.AR_10, S.STA12),
        sta11=(A.AR_3, S.STA1),
    ),
    Event.EVT14: {
        S.STA8: (A.AR_4, S.STA13),
        S.STA9: (A.AR_9, S.STA11),
        S.STA12: (A.AR_4, S.STA13),
    },
    Event.EVT15: {
        S.STA3: (A.AA_1, S.STA13),
        S.STA4: (A.AA_2, S.STA1),
        S.STA5: (A.AA_1, S.STA13),
        **{State(s): (A.AA_1, S.STA13) for s in range(6, 13)},
    },
    Event.EVT16: {
        S.STA2: (A.AA_2, S.STA1),
        S.STA3: (A.AA_3, S.STA1),
        S.STA5: (A.AA_3, S.STA1),
        **{State(s): (A.AA_3, S.STA1) for s in range(6, 13)},
        S.STA13: (A.AA_2, S.STA1),
    },
    Event.EVT17: {
        S.STA2: (A.AA_5, S.STA1),
        **{State(s): (A.AA_4, S.STA1) for s in range(3, 13)},
        S.STA13: (A.AR_5, S.STA1),
    },
    Event.EVT18: {S.STA2: (A.AA_2, S.STA1), S.STA13: (A.AA_2, S.STA1)},
    Event.EVT19: _row(_UNEXPECTED_PDU, sta13=(A.AA_7, S.STA13)),
}

TRANSITIONS: Final[Mapping[tuple[State, Event], tuple[Action, State]]] = {
    (state, event): cell for event, row in _TABLE.items() for state, cell in row.items()
}


class InvalidTransition(Exception):
    """An event that Table 9-10 does not allow in the current state."""


class StateMachine:
    """One association's PS3.8 state, moved only by `fire`."""

    def __init__(self, requestor: bool) -> None:
        self.requestor = requestor
        self.state = State.STA1

    def fire(self, event: Event) -> Action:
        """Apply an event: return the action to perform and enter the next state."""
        cell = TRANSITIONS.get((self.state, event))
        if cell is None:
            raise InvalidTransition(f"Evt{int(event)} is not valid in Sta{int(self.state)}")
        action, next_state = cell
        if action is Action.AR_8 and not self.requestor:
            next_state = State.STA10
        self.state = next_state
        return action
