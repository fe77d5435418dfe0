"""DIMSE service handlers, one module per service, and the table that maps them."""

from __future__ import annotations

from minipacs.net.commands import C_ECHO_RQ
from minipacs.net.operations import Service
from minipacs.services.echo import handle_echo


def build_services() -> dict[int, Service]:
    """The Command Field -> Service table the server dispatches requests with."""
    return {C_ECHO_RQ: Service(handle_echo)}
