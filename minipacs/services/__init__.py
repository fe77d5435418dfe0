"""DIMSE service handlers, one module per service, and the table that maps them."""

from __future__ import annotations

from minipacs.net.commands import C_ECHO_RQ, C_FIND_RQ, C_GET_RQ, C_MOVE_RQ, C_STORE_RQ
from minipacs.net.operations import Service
from minipacs.services.echo import answer_echo, handle_echo
from minipacs.services.find import FindService
from minipacs.services.get import GetService
from minipacs.services.move import MoveService
from minipacs.services.store import StoreService


def build_services(
    store: StoreService | None = None,
    find: FindService | None = None,
    move: MoveService | None = None,
    get: GetService | None = None,
) -> dict[int, Service]:
    """The Command Field -> Service table the server dispatches requests with."""
    services = {C_ECHO_RQ: Service(handle_echo, answer=answer_echo)}
    if store is not None:
        services[C_STORE_RQ] = Service(store.handle)
    # Concurrent: the reader must see C-CANCEL (and C-GET's C-STORE-RSPs) while they run.
    if find is not None:
        services[C_FIND_RQ] = Service(find.handle, concurrent=True)
    if move is not None:
        services[C_MOVE_RQ] = Service(move.handle, concurrent=True)
    if get is not None:
        services[C_GET_RQ] = Service(get.handle, concurrent=True)
    return services
