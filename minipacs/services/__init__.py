"""DIMSE service handlers, one module per service, and the table that maps them."""

from __future__ import annotations

from minipacs.net.commands import C_ECHO_RQ, C_FIND_RQ, C_STORE_RQ
from minipacs.net.operations import Service
from minipacs.services.echo import handle_echo
from minipacs.services.find import FindService
from minipacs.services.store import StoreService


def build_services(
    store: StoreService | None = None, find: FindService | None = None
) -> dict[int, Service]:
    """The Command Field -> Service table the server dispatches requests with."""
    services = {C_ECHO_RQ: Service(handle_echo)}
    if store is not None:
        services[C_STORE_RQ] = Service(store.handle)
    if find is not None:
        # Concurrent: the reader must see C-CANCEL while responses stream.
        services[C_FIND_RQ] = Service(find.handle, concurrent=True)
    return services
