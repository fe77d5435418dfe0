"""The association state machine against PS3.8 Table 9-10, cell by cell."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipacs.net.statemachine import (
    ACTIONS,
    TRANSITIONS,
    Action,
    Event,
    InvalidTransition,
    State,
    StateMachine,
)

# Table 9-10 written out row by row (event: "state:action>next ..."), independently of
# the module's own compact encoding.
TABLE_9_10 = {
    1: "1:AE-1>4",
    2: "4:AE-2>5",
    3: "2:AA-1>13 3:AA-8>13 5:AE-3>6 6:AA-8>13 7:AA-8>13 8:AA-8>13 9:AA-8>13 10:AA-8>13 "
    "11:AA-8>13 12:AA-8>13 13:AA-6>13",
    4: "2:AA-1>13 3:AA-8>13 5:AE-4>1 6:AA-8>13 7:AA-8>13 8:AA-8>13 9:AA-8>13 10:AA-8>13 "
    "11:AA-8>13 12:AA-8>13 13:AA-6>13",
    5: "1:AE-5>2",
    6: "2:AE-6>3 3:AA-8>13 5:AA-8>13 6:AA-8>13 7:AA-8>13 8:AA-8>13 9:AA-8>13 10:AA-8>13 "
    "11:AA-8>13 12:AA-8>13 13:AA-7>13",
    7: "3:AE-7>6",
    8: "3:AE-8>13",
    9: "6:DT-1>6 8:AR-7>8",
    10: "2:AA-1>13 3:AA-8>13 5:AA-8>13 6:DT-2>6 7:AR-6>7 8:AA-8>13 9:AA-8>13 10:AA-8>13 "
    "11:AA-8>13 12:AA-8>13 13:AA-6>13",
    11: "6:AR-1>7",
    12: "2:AA-1>13 3:AA-8>13 5:AA-8>13 6:AR-2>8 7:AR-8>9 8:AA-8>13 9:AA-8>13 10:AA-8>13 "
    "11:AA-8>13 12:AA-8>13 13:AA-6>13",
    13: "2:AA-1>13 3:AA-8>13 5:AA-8>13 6:AA-8>13 7:AR-3>1 8:AA-8>13 9:AA-8>13 10:AR-10>12 "
    "11:AR-3>1 12:AA-8>13 13:AA-6>13",
    14: "8:AR-4>13 9:AR-9>11 12:AR-4>13",
    15: "3:AA-1>13 4:AA-2>1 5:AA-1>13 6:AA-1>13 7:AA-1>13 8:AA-1>13 9:AA-1>13 10:AA-1>13 "
    "11:AA-1>13 12:AA-1>13",
    16: "2:AA-2>1 3:AA-3>1 5:AA-3>1 6:AA-3>1 7:AA-3>1 8:AA-3>1 9:AA-3>1 10:AA-3>1 11:AA-3>1 "
    "12:AA-3>1 13:AA-2>1",
    17: "2:AA-5>1 3:AA-4>1 4:AA-4>1 5:AA-4>1 6:AA-4>1 7:AA-4>1 8:AA-4>1 9:AA-4>1 10:AA-4>1 "
    "11:AA-4>1 12:AA-4>1 13:AR-5>1",
    18: "2:AA-2>1 13:AA-2>1",
    19: "2:AA-1>13 3:AA-8>13 5:AA-8>13 6:AA-8>13 7:AA-8>13 8:AA-8>13 9:AA-8>13 10:AA-8>13 "
    "11:AA-8>13 12:AA-8>13 13:AA-7>13",
}


def _cells() -> list[tuple[int, int, str, int]]:
    cells = []
    for event, row in TABLE_9_10.items():
        for cell in row.split():
            state, rest = cell.split(":")
            action, target = rest.split(">")
            cells.append((int(state), event, action, int(target)))
    return cells


CELLS = _cells()
DEFINED = {(state, event) for state, event, _, _ in CELLS}


def test_table_has_exactly_the_standard_cells() -> None:
    assert {(int(s), int(e)) for s, e in TRANSITIONS} == DEFINED
    assert len(TRANSITIONS) == 123


@pytest.mark.parametrize(("state", "event", "action", "target"), CELLS)
def test_every_cell(state: int, event: int, action: str, target: int) -> None:
    machine = StateMachine(requestor=True)
    machine.state = State(state)
    assert machine.fire(Event(event)).value == action
    assert machine.state == State(target)


@pytest.mark.parametrize(
    ("state", "event"),
    [(s, e) for s in range(1, 14) for e in range(1, 20) if (s, e) not in DEFINED],
)
def test_empty_cells_raise_and_keep_the_state(state: int, event: int) -> None:
    machine = StateMachine(requestor=False)
    machine.state = State(state)
    with pytest.raises(InvalidTransition):
        machine.fire(Event(event))
    assert machine.state == State(state)


def _run(machine: StateMachine, *events: Event) -> list[str]:
    return [machine.fire(event).value for event in events]


def test_acceptor_happy_path() -> None:
    machine = StateMachine(requestor=False)
    actions = _run(
        machine,
        Event.TRANSPORT_CONNECTED_INDICATION,
        Event.ASSOCIATE_RQ_PDU,
        Event.ASSOCIATE_ACCEPT,
        Event.P_DATA_TF_PDU,
        Event.P_DATA_REQUEST,
        Event.RELEASE_RQ_PDU,
        Event.RELEASE_RESPONSE,
        Event.TRANSPORT_CLOSED,
    )
    assert actions == ["AE-5", "AE-6", "AE-7", "DT-2", "DT-1", "AR-2", "AR-4", "AR-5"]
    assert machine.state == State.STA1


def test_requestor_happy_path() -> None:
    machine = StateMachine(requestor=True)
    actions = _run(
        machine,
        Event.ASSOCIATE_REQUEST,
        Event.TRANSPORT_CONNECT_CONFIRM,
        Event.ASSOCIATE_AC_PDU,
        Event.P_DATA_REQUEST,
        Event.P_DATA_TF_PDU,
        Event.RELEASE_REQUEST,
        Event.RELEASE_RP_PDU,
    )
    assert actions == ["AE-1", "AE-2", "AE-3", "DT-1", "DT-2", "AR-1", "AR-3"]
    assert machine.state == State.STA1


def test_release_collision_requestor_side() -> None:
    machine = StateMachine(requestor=True)
    machine.state = State.STA6
    assert _run(machine, Event.RELEASE_REQUEST, Event.RELEASE_RQ_PDU) == ["AR-1", "AR-8"]
    assert machine.state == State.STA9
    assert _run(machine, Event.RELEASE_RESPONSE, Event.RELEASE_RP_PDU) == ["AR-9", "AR-3"]
    assert machine.state == State.STA1


def test_release_collision_acceptor_side() -> None:
    machine = StateMachine(requestor=False)
    machine.state = State.STA6
    assert _run(machine, Event.RELEASE_REQUEST, Event.RELEASE_RQ_PDU) == ["AR-1", "AR-8"]
    assert machine.state == State.STA10
    assert _run(machine, Event.RELEASE_RP_PDU, Event.RELEASE_RESPONSE) == ["AR-10", "AR-4"]
    assert machine.state == State.STA13


def test_reject_then_artim_expiry() -> None:
    machine = StateMachine(requestor=False)
    _run(machine, Event.TRANSPORT_CONNECTED_INDICATION, Event.ASSOCIATE_RQ_PDU)
    assert _run(machine, Event.ASSOCIATE_REJECT) == ["AE-8"]
    assert ACTIONS[Action.AE_8].artim == "start"
    assert _run(machine, Event.ARTIM_EXPIRED) == ["AA-2"]
    assert machine.state == State.STA1
    assert ACTIONS[Action.AA_2].close_transport


def test_silent_peer_artim_in_sta2() -> None:
    machine = StateMachine(requestor=False)
    _run(machine, Event.TRANSPORT_CONNECTED_INDICATION)
    assert ACTIONS[Action.AE_5].artim == "start"
    assert _run(machine, Event.ARTIM_EXPIRED) == ["AA-2"]


@pytest.mark.parametrize("state", [2, 3, 5, 6, 7, 8, 9, 10, 11, 12])
def test_invalid_pdu_aborts(state: int) -> None:
    machine = StateMachine(requestor=False)
    machine.state = State(state)
    action = machine.fire(Event.INVALID_PDU)
    assert ACTIONS[action].sends == "A-ABORT"
    assert machine.state == State.STA13


def test_abort_paths() -> None:
    machine = StateMachine(requestor=False)
    machine.state = State.STA6
    assert _run(machine, Event.ABORT_PDU) == ["AA-3"]
    assert machine.state == State.STA1
    machine.state = State.STA6
    assert _run(machine, Event.ABORT_REQUEST) == ["AA-1"]
    assert ACTIONS[Action.AA_1].abort_source == 0
    assert ACTIONS[Action.AA_8].abort_source == 2
    assert machine.state == State.STA13


@given(st.lists(st.integers(min_value=1, max_value=19), max_size=60), st.booleans())
def test_random_event_sequences(events: list[int], requestor: bool) -> None:
    machine = StateMachine(requestor=requestor)
    for number in events:
        before = machine.state
        try:
            action = machine.fire(Event(number))
        except InvalidTransition:
            assert machine.state == before
            continue
        assert action in ACTIONS
        assert isinstance(machine.state, State)
