"""The association state machine against PS3.8 9.2, cell by cell and path by path."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipacs.net.statemachine import (
    ACTIONS,
    TRANSITIONS,
    Action,
    ActionSpec,
    Event,
    InvalidTransition,
    State,
    StateMachine,
)

# PS3.8 Table 9-10 transcribed as the standard lays it out, independently of the module:
# one row per event, one column per state, "." for an empty cell.
#                Sta1  Sta2  Sta3  Sta4  Sta5  Sta6  Sta7  Sta8  Sta9  Sta10 Sta11 Sta12 Sta13
TABLE_9_10 = {
    1: "         AE-1  .     .     .     .     .     .     .     .     .     .     .     .",
    2: "         .     .     .     AE-2  .     .     .     .     .     .     .     .     .",
    3: "         .     AA-1  AA-8  .     AE-3  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6",
    4: "         .     AA-1  AA-8  .     AE-4  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6",
    5: "         AE-5  .     .     .     .     .     .     .     .     .     .     .     .",
    6: "         .     AE-6  AA-8  .     AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-7",
    7: "         .     .     AE-7  .     .     .     .     .     .     .     .     .     .",
    8: "         .     .     AE-8  .     .     .     .     .     .     .     .     .     .",
    9: "         .     .     .     .     .     DT-1  .     AR-7  .     .     .     .     .",
    10: "        .     AA-1  AA-8  .     AA-8  DT-2  AR-6  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6",
    11: "        .     .     .     .     .     AR-1  .     .     .     .     .     .     .",
    12: "        .     AA-1  AA-8  .     AA-8  AR-2  AR-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6",
    13: "        .     AA-1  AA-8  .     AA-8  AA-8  AR-3  AA-8  AA-8  AR-10 AR-3  AA-8  AA-6",
    14: "        .     .     .     .     .     .     .     AR-4  AR-9  .     .     AR-4  .",
    15: "        .     .     AA-1  AA-2  AA-1  AA-1  AA-1  AA-1  AA-1  AA-1  AA-1  AA-1  .",
    16: "        .     AA-2  AA-3  .     AA-3  AA-3  AA-3  AA-3  AA-3  AA-3  AA-3  AA-3  AA-2",
    17: "        .     AA-5  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AR-5",
    18: "        .     AA-2  .     .     .     .     .     .     .     .     .     .     AA-2",
    19: "        .     AA-1  AA-8  .     AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-7",
}

# Next state of each action, from its definition in PS3.8 Tables 9-6 to 9-9. AE-6 lists
# its "acceptable" branch; AR-8 is the association-requestor's, the acceptor's is Sta10.
NEXT_STATE = {
    "AE-1": 4, "AE-2": 5, "AE-3": 6, "AE-4": 1, "AE-5": 2, "AE-6": 3, "AE-7": 6, "AE-8": 13,
    "DT-1": 6, "DT-2": 6,
    "AR-1": 7, "AR-2": 8, "AR-3": 1, "AR-4": 13, "AR-5": 1, "AR-6": 7, "AR-7": 8, "AR-8": 9,
    "AR-9": 11, "AR-10": 12,
    "AA-1": 13, "AA-2": 1, "AA-3": 1, "AA-4": 1, "AA-5": 1, "AA-6": 13, "AA-7": 13, "AA-8": 13,
}  # fmt: skip


def _cells() -> dict[tuple[int, int], str]:
    cells = {}
    for event, row in TABLE_9_10.items():
        columns = row.split()
        assert len(columns) == 13, f"Evt{event} row has {len(columns)} columns"
        for state, action in enumerate(columns, start=1):
            if action != ".":
                cells[(state, event)] = action
    return cells


CELLS = _cells()
EMPTY = [(s, e) for s in range(1, 14) for e in range(1, 20) if (s, e) not in CELLS]


def _expected_next(state: int, event: int, requestor: bool) -> int:
    action = CELLS[(state, event)]
    if action == "AR-8" and not requestor:
        return 10
    return NEXT_STATE[action]


def _machine(state: int, requestor: bool = False) -> StateMachine:
    machine = StateMachine(requestor=requestor)
    machine.state = State(state)
    return machine


def _run(machine: StateMachine, *events: Event) -> list[str]:
    return [machine.fire(event).value for event in events]


# The enums.


def test_states_events_actions_are_the_standards() -> None:
    assert [int(s) for s in State] == list(range(1, 14))
    assert [s.name for s in State] == [f"STA{n}" for n in range(1, 14)]
    assert [int(e) for e in Event] == list(range(1, 20))
    assert [e.name for e in Event] == [f"EVT{n}" for n in range(1, 20)]
    assert {a.value for a in Action} == set(NEXT_STATE)
    assert all(a.name == a.value.replace("-", "_") for a in Action)


ALIASES = {
    "ASSOCIATE_REQUEST": 1,
    "TRANSPORT_CONNECT_CONFIRM": 2,
    "ASSOCIATE_AC_PDU": 3,
    "ASSOCIATE_RJ_PDU": 4,
    "TRANSPORT_CONNECTED_INDICATION": 5,
    "ASSOCIATE_RQ_PDU": 6,
    "ASSOCIATE_ACCEPT": 7,
    "ASSOCIATE_REJECT": 8,
    "P_DATA_REQUEST": 9,
    "P_DATA_TF_PDU": 10,
    "RELEASE_REQUEST": 11,
    "RELEASE_RQ_PDU": 12,
    "RELEASE_RP_PDU": 13,
    "RELEASE_RESPONSE": 14,
    "ABORT_REQUEST": 15,
    "ABORT_PDU": 16,
    "TRANSPORT_CLOSED": 17,
    "ARTIM_EXPIRED": 18,
    "INVALID_PDU": 19,
}


def test_every_event_has_a_readable_alias() -> None:
    aliases = {name for name in Event.__members__ if not name.startswith("EVT")}
    assert aliases == set(ALIASES)
    for name, number in ALIASES.items():
        assert Event[name] is Event(number)


# Table 9-10, every cell.


def test_table_has_exactly_the_standards_cells() -> None:
    assert len(CELLS) == 123
    assert {(int(s), int(e)) for s, e in TRANSITIONS} == set(CELLS)
    for (state, event), (action, _) in TRANSITIONS.items():
        assert isinstance(state, State) and isinstance(event, Event)
        assert action.value == CELLS[(int(state), int(event))]


@pytest.mark.parametrize("requestor", [True, False], ids=["requestor", "acceptor"])
@pytest.mark.parametrize(("state", "event"), sorted(CELLS), ids=lambda v: str(v))
def test_every_cell(state: int, event: int, requestor: bool) -> None:
    machine = _machine(state, requestor)
    assert machine.fire(Event(event)) is Action(CELLS[(state, event)])
    assert machine.state is State(_expected_next(state, event, requestor))


@pytest.mark.parametrize("requestor", [True, False], ids=["requestor", "acceptor"])
@pytest.mark.parametrize(("state", "event"), EMPTY, ids=lambda v: str(v))
def test_every_empty_cell_raises_and_keeps_the_state(
    state: int, event: int, requestor: bool
) -> None:
    machine = _machine(state, requestor)
    with pytest.raises(InvalidTransition) as info:
        machine.fire(Event(event))
    assert machine.state is State(state)
    assert (info.value.state, info.value.event) == (State(state), Event(event))
    assert f"Evt{event} " in str(info.value) and f"Sta{state} " in str(info.value)


def test_invalid_transition_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(InvalidTransition(State.STA1, Event.EVT3)))
    assert (error.state, error.event) == (State.STA1, Event.EVT3)


# What each action asks for, from its definition in PS3.8 Tables 9-6 to 9-9:
# (sends, abort source, indication, ARTIM, close transport, connect transport).
SPECS = {
    "AE-1": (None, None, None, None, False, True),
    "AE-2": ("A-ASSOCIATE-RQ", None, None, None, False, False),
    "AE-3": (None, None, "A-ASSOCIATE confirmation (accept)", None, False, False),
    "AE-4": (None, None, "A-ASSOCIATE confirmation (reject)", None, True, False),
    "AE-5": (None, None, None, "start", False, False),
    "AE-6": (None, None, "A-ASSOCIATE indication", "stop", False, False),
    "AE-7": ("A-ASSOCIATE-AC", None, None, None, False, False),
    "AE-8": ("A-ASSOCIATE-RJ", None, None, "start", False, False),
    "DT-1": ("P-DATA-TF", None, None, None, False, False),
    "DT-2": (None, None, "P-DATA indication", None, False, False),
    "AR-1": ("A-RELEASE-RQ", None, None, None, False, False),
    "AR-2": (None, None, "A-RELEASE indication", None, False, False),
    "AR-3": (None, None, "A-RELEASE confirmation", None, True, False),
    "AR-4": ("A-RELEASE-RP", None, None, "start", False, False),
    "AR-5": (None, None, None, "stop", False, False),
    "AR-6": (None, None, "P-DATA indication", None, False, False),
    "AR-7": ("P-DATA-TF", None, None, None, False, False),
    "AR-8": (None, None, "A-RELEASE indication", None, False, False),
    "AR-9": ("A-RELEASE-RP", None, None, None, False, False),
    "AR-10": (None, None, "A-RELEASE confirmation", None, False, False),
    "AA-1": ("A-ABORT", 0, None, "restart", False, False),
    "AA-2": (None, None, None, "stop", True, False),
    "AA-3": (None, None, "A-ABORT indication", None, True, False),
    "AA-4": (None, None, "A-P-ABORT indication", None, False, False),
    "AA-5": (None, None, None, "stop", False, False),
    "AA-6": (None, None, None, None, False, False),
    "AA-7": ("A-ABORT", 2, None, None, False, False),
    "AA-8": ("A-ABORT", 2, "A-P-ABORT indication", "start", False, False),
}


def test_every_action_has_a_spec() -> None:
    assert set(ACTIONS) == set(Action)
    assert all(isinstance(spec, ActionSpec) for spec in ACTIONS.values())


@pytest.mark.parametrize("name", sorted(SPECS))
def test_action_spec(name: str) -> None:
    spec = ACTIONS[Action(name)]
    got = (
        spec.sends,
        spec.abort_source,
        spec.indication,
        spec.artim,
        spec.close_transport,
        spec.connect_transport,
    )
    assert got == SPECS[name]


# Paths through the machine.


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
    assert machine.state is State.STA1


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
        Event.P_DATA_TF_PDU,
        Event.RELEASE_RP_PDU,
    )
    assert actions == ["AE-1", "AE-2", "AE-3", "DT-1", "DT-2", "AR-1", "AR-6", "AR-3"]
    assert machine.state is State.STA1


def test_acceptor_may_send_data_after_release_indication() -> None:
    # PS3.8 7.2.2: the release acceptor may still issue P-DATA requests (AR-7).
    machine = _machine(6)
    assert _run(machine, Event.RELEASE_RQ_PDU, Event.P_DATA_REQUEST) == ["AR-2", "AR-7"]
    assert machine.state is State.STA8


def test_association_rejected_by_the_peer() -> None:
    machine = StateMachine(requestor=True)
    actions = _run(
        machine, Event.ASSOCIATE_REQUEST, Event.TRANSPORT_CONNECT_CONFIRM, Event.ASSOCIATE_RJ_PDU
    )
    assert actions == ["AE-1", "AE-2", "AE-4"]
    assert machine.state is State.STA1


def test_ae6_not_acceptable_is_evt8_from_sta3() -> None:
    machine = StateMachine(requestor=False)
    _run(machine, Event.TRANSPORT_CONNECTED_INDICATION, Event.ASSOCIATE_RQ_PDU)
    assert machine.state is State.STA3
    assert _run(machine, Event.ASSOCIATE_REJECT) == ["AE-8"]
    assert machine.state is State.STA13
    assert (ACTIONS[Action.AE_8].sends, ACTIONS[Action.AE_8].artim) == ("A-ASSOCIATE-RJ", "start")


def test_ar8_next_state_depends_on_role() -> None:
    assert TRANSITIONS[(State.STA7, Event.EVT12)] == (Action.AR_8, State.STA9)
    requestor, acceptor = _machine(7, requestor=True), _machine(7, requestor=False)
    assert requestor.fire(Event.RELEASE_RQ_PDU) is acceptor.fire(Event.RELEASE_RQ_PDU)
    assert (requestor.state, acceptor.state) == (State.STA9, State.STA10)


def test_release_collision_requestor_side() -> None:
    machine = _machine(6, requestor=True)
    assert _run(machine, Event.RELEASE_REQUEST, Event.RELEASE_RQ_PDU) == ["AR-1", "AR-8"]
    assert machine.state is State.STA9
    assert _run(machine, Event.RELEASE_RESPONSE) == ["AR-9"]
    assert machine.state is State.STA11
    assert _run(machine, Event.RELEASE_RP_PDU) == ["AR-3"]
    assert machine.state is State.STA1


def test_release_collision_acceptor_side() -> None:
    machine = _machine(6, requestor=False)
    assert _run(machine, Event.RELEASE_REQUEST, Event.RELEASE_RQ_PDU) == ["AR-1", "AR-8"]
    assert machine.state is State.STA10
    assert _run(machine, Event.RELEASE_RP_PDU) == ["AR-10"]
    assert machine.state is State.STA12
    assert _run(machine, Event.RELEASE_RESPONSE, Event.TRANSPORT_CLOSED) == ["AR-4", "AR-5"]
    assert machine.state is State.STA1


def test_release_collision_out_of_order_is_an_abort() -> None:
    # The acceptor must wait for A-RELEASE-RP before answering (PS3.8 7.2.2, Sta10).
    with pytest.raises(InvalidTransition):
        _machine(10).fire(Event.RELEASE_RESPONSE)
    # A requestor that receives A-RELEASE-RP before it answered sees an unexpected PDU.
    machine = _machine(9, requestor=True)
    assert _run(machine, Event.RELEASE_RP_PDU) == ["AA-8"]


# PDUs that ActionSpec.sends puts on the wire, as the peer's events.
_ARRIVES_AS = {
    "A-ASSOCIATE-RQ": Event.ASSOCIATE_RQ_PDU,
    "A-ASSOCIATE-AC": Event.ASSOCIATE_AC_PDU,
    "A-ASSOCIATE-RJ": Event.ASSOCIATE_RJ_PDU,
    "P-DATA-TF": Event.P_DATA_TF_PDU,
    "A-RELEASE-RQ": Event.RELEASE_RQ_PDU,
    "A-RELEASE-RP": Event.RELEASE_RP_PDU,
    "A-ABORT": Event.ABORT_PDU,
}


class _Wire:
    """Two machines joined by an in-order transport, driven only by ActionSpec."""

    def __init__(self) -> None:
        self.requestor = StateMachine(requestor=True)
        self.acceptor = StateMachine(requestor=False)
        self.log: list[str] = []

    def fire(self, machine: StateMachine, event: Event) -> list[tuple[StateMachine, Event]]:
        """Fire a local event; return what the peer will see because of it."""
        action = machine.fire(event)
        side = "R" if machine is self.requestor else "A"
        self.log.append(f"{side}:{action.value}")
        peer = self.acceptor if machine is self.requestor else self.requestor
        spec = ACTIONS[action]
        out = []
        if spec.connect_transport:
            out += [(peer, Event.TRANSPORT_CONNECTED_INDICATION)]
            out += [(machine, Event.TRANSPORT_CONNECT_CONFIRM)]
        if spec.sends is not None:
            out.append((peer, _ARRIVES_AS[spec.sends]))
        if spec.close_transport:
            out.append((peer, Event.TRANSPORT_CLOSED))
        return out

    def deliver(self, pending: list[tuple[StateMachine, Event]]) -> None:
        """Deliver every pending event, and whatever those cause, in order."""
        while pending:
            machine, event = pending.pop(0)
            pending += self.fire(machine, event)


def test_two_peers_associate_exchange_data_and_release() -> None:
    wire = _Wire()
    wire.deliver(wire.fire(wire.requestor, Event.ASSOCIATE_REQUEST))
    assert wire.requestor.state is State.STA5 and wire.acceptor.state is State.STA3
    wire.deliver(wire.fire(wire.acceptor, Event.ASSOCIATE_ACCEPT))
    assert wire.requestor.state is wire.acceptor.state is State.STA6
    wire.deliver(wire.fire(wire.requestor, Event.P_DATA_REQUEST))
    wire.deliver(wire.fire(wire.acceptor, Event.P_DATA_REQUEST))
    wire.deliver(wire.fire(wire.requestor, Event.RELEASE_REQUEST))
    assert wire.acceptor.state is State.STA8
    wire.deliver(wire.fire(wire.acceptor, Event.RELEASE_RESPONSE))
    assert wire.requestor.state is wire.acceptor.state is State.STA1
    assert wire.log == [
        "R:AE-1", "A:AE-5", "R:AE-2", "A:AE-6", "A:AE-7", "R:AE-3",
        "R:DT-1", "A:DT-2", "A:DT-1", "R:DT-2",
        "R:AR-1", "A:AR-2", "A:AR-4", "R:AR-3", "A:AR-5",
    ]  # fmt: skip


def test_two_peers_release_collision() -> None:
    wire = _Wire()
    wire.requestor.state = wire.acceptor.state = State.STA6
    # Both A-RELEASE-RQ PDUs are in flight before either arrives.
    pending = wire.fire(wire.requestor, Event.RELEASE_REQUEST)
    pending += wire.fire(wire.acceptor, Event.RELEASE_REQUEST)
    wire.deliver(pending)
    assert (wire.requestor.state, wire.acceptor.state) == (State.STA9, State.STA10)
    # PS3.8 7.2.2: the association-requestor answers first, then the acceptor.
    wire.deliver(wire.fire(wire.requestor, Event.RELEASE_RESPONSE))
    assert (wire.requestor.state, wire.acceptor.state) == (State.STA11, State.STA12)
    wire.deliver(wire.fire(wire.acceptor, Event.RELEASE_RESPONSE))
    assert wire.requestor.state is wire.acceptor.state is State.STA1
    assert wire.log[-5:] == ["R:AR-9", "A:AR-10", "A:AR-4", "R:AR-3", "A:AR-5"]


def test_two_peers_abort() -> None:
    wire = _Wire()
    wire.requestor.state = wire.acceptor.state = State.STA6
    wire.deliver(wire.fire(wire.acceptor, Event.ABORT_REQUEST))
    # The aborting side waits in Sta13 for the peer (AA-3) to close the transport.
    assert wire.requestor.state is wire.acceptor.state is State.STA1
    assert wire.log == ["A:AA-1", "R:AA-3", "A:AR-5"]


# Aborts.


def test_local_abort_in_each_state() -> None:
    expected = {4: ("AA-2", 1), **{s: ("AA-1", 13) for s in (3, 5, 6, 7, 8, 9, 10, 11, 12)}}
    for state in range(1, 14):
        machine = _machine(state)
        if state not in expected:
            # Sta1, Sta2, Sta13: no association for a local user to abort.
            with pytest.raises(InvalidTransition):
                machine.fire(Event.ABORT_REQUEST)
            assert machine.state is State(state)
            continue
        action, target = expected[state]
        assert machine.fire(Event.ABORT_REQUEST).value == action
        assert machine.state is State(target)


def test_abort_pdu_from_the_peer() -> None:
    for state in (3, 5, 6, 7, 8, 9, 10, 11, 12):
        machine = _machine(state)
        assert _run(machine, Event.ABORT_PDU) == ["AA-3"]
        assert machine.state is State.STA1
    for state in (2, 13):
        machine = _machine(state)
        assert _run(machine, Event.ABORT_PDU) == ["AA-2"]
        assert machine.state is State.STA1
    assert ACTIONS[Action.AA_2].close_transport and ACTIONS[Action.AA_3].close_transport


def test_transport_closed_under_an_association_is_a_provider_abort() -> None:
    for state in range(3, 13):
        machine = _machine(state)
        assert _run(machine, Event.TRANSPORT_CLOSED) == ["AA-4"]
        assert machine.state is State.STA1
    assert ACTIONS[Action.AA_4].indication == "A-P-ABORT indication"


def test_transport_closed_before_or_after_an_association() -> None:
    machine = _machine(2)
    assert _run(machine, Event.TRANSPORT_CLOSED) == ["AA-5"]
    machine = _machine(13)
    assert _run(machine, Event.TRANSPORT_CLOSED) == ["AR-5"]
    assert machine.state is State.STA1


def test_sta13_ignores_late_pdus_but_aborts_new_requests() -> None:
    machine = _machine(13)
    late = [Event.ASSOCIATE_AC_PDU, Event.ASSOCIATE_RJ_PDU, Event.P_DATA_TF_PDU]
    late += [Event.RELEASE_RQ_PDU, Event.RELEASE_RP_PDU]
    assert _run(machine, *late) == ["AA-6"] * 5
    assert _run(machine, Event.ASSOCIATE_RQ_PDU, Event.INVALID_PDU) == ["AA-7", "AA-7"]
    assert machine.state is State.STA13


# ARTIM.


def test_artim_expiry_in_sta2_when_the_peer_stays_silent() -> None:
    machine = StateMachine(requestor=False)
    assert _run(machine, Event.TRANSPORT_CONNECTED_INDICATION) == ["AE-5"]
    assert ACTIONS[Action.AE_5].artim == "start"
    assert _run(machine, Event.ARTIM_EXPIRED) == ["AA-2"]
    assert machine.state is State.STA1


@pytest.mark.parametrize(
    ("start", "events", "armed_by"),
    [
        (3, [Event.ASSOCIATE_REJECT], "AE-8"),
        (8, [Event.RELEASE_RESPONSE], "AR-4"),
        (6, [Event.ABORT_REQUEST], "AA-1"),
        (6, [Event.INVALID_PDU], "AA-8"),
        (2, [Event.P_DATA_TF_PDU], "AA-1"),
    ],
)
def test_artim_expiry_in_sta13_when_the_peer_does_not_close(
    start: int, events: list[Event], armed_by: str
) -> None:
    machine = _machine(start)
    assert _run(machine, *events) == [armed_by]
    assert machine.state is State.STA13
    assert ACTIONS[Action(armed_by)].artim in ("start", "restart")
    assert _run(machine, Event.ARTIM_EXPIRED) == ["AA-2"]
    assert machine.state is State.STA1


@pytest.mark.parametrize("state", [s for s in range(1, 14) if s not in (2, 13)])
def test_artim_has_no_cell_elsewhere(state: int) -> None:
    machine = _machine(state)
    with pytest.raises(InvalidTransition):
        machine.fire(Event.ARTIM_EXPIRED)
    assert machine.state is State(state)


# Evt19 in each state.

INVALID_PDU = {
    1: None,  # no transport, nothing can be received
    2: ("AA-1", 13),
    3: ("AA-8", 13),
    4: None,  # transport not open yet
    **{s: ("AA-8", 13) for s in range(5, 13)},
    13: ("AA-7", 13),
}


@pytest.mark.parametrize("state", range(1, 14))
def test_invalid_pdu_in_each_state(state: int) -> None:
    machine = _machine(state)
    expected = INVALID_PDU[state]
    if expected is None:
        with pytest.raises(InvalidTransition):
            machine.fire(Event.INVALID_PDU)
        assert machine.state is State(state)
        return
    action = machine.fire(Event.INVALID_PDU)
    assert (action.value, int(machine.state)) == expected
    assert ACTIONS[action].sends == "A-ABORT"


# Property: any sequence of events, from any state, for either role.


@given(
    st.sampled_from(list(State)),
    st.booleans(),
    st.lists(st.sampled_from(list(Event)), max_size=60),
)
def test_random_event_sequences(start: State, requestor: bool, events: list[Event]) -> None:
    machine = StateMachine(requestor=requestor)
    machine.state = start
    for event in events:
        before = machine.state
        try:
            action = machine.fire(event)
        except InvalidTransition:
            assert machine.state is before
            assert (int(before), int(event)) not in CELLS
            continue
        assert isinstance(machine.state, State)
        assert machine.state in State
        assert action.value == CELLS[(int(before), int(event))]
        assert int(machine.state) == _expected_next(int(before), int(event), requestor)
