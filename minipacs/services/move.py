"""Query/Retrieve MOVE as SCP: C-MOVE (PS3.4 C.4.2, PS3.7 9.1.4).

The Move Destination must be an AE title of the configured `[destinations]` table: it
alone says where to connect, so no request can make us open a connection elsewhere; an
unknown one is refused at once with 0xA801. The sub-operations go over a new association
to the destination (PS3.4 C.4.2.3.1) that proposes, for each SOP class to send, each
stored transfer syntax and the uncompressed ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

from minipacs.index.keys import MOVE_MODELS
from minipacs.logs import log_event
from minipacs.net.client import AssociationRefused, ClientAssociation
from minipacs.net.operations import Operation
from minipacs.net.session import Timeouts
from minipacs.services.retrieve import MOVE_DESTINATION_UNKNOWN, RetrieveService
from minipacs.services.suboperations import Target, proposals

log = logging.getLogger("minipacs.move")


@dataclass
class _MoveTarget(Target):
    client: ClientAssociation | None = None


class MoveService(RetrieveService):
    """Answers C-MOVE-RQ on the Patient Root and Study Root MOVE models."""

    name = "C-MOVE"
    models = MOVE_MODELS

    _tls: ssl.SSLContext | None = None

    def _destination(self, operation: Operation) -> str:
        return str(operation.command.get("MoveDestination", "")).strip(" ")

    async def accepts(self, operation: Operation) -> bool:
        """Refuse a Move Destination that is not configured (0xA801, PS3.4 C.4.2.1.5)."""
        name = self._destination(operation)
        operation.log_fields["destination"] = name
        if name in self.options.destinations:
            return True
        await operation.respond(
            MOVE_DESTINATION_UNKNOWN, error_comment=f"move destination {name!r} is unknown"
        )
        return False

    async def open_target(
        self, operation: Operation, summary: Mapping[tuple[str, str], int]
    ) -> Target:
        """A new association to the move destination, or an unavailable target."""
        name = self._destination(operation)
        destination = self.options.destinations[name]
        options = self.options
        try:
            client = await ClientAssociation.connect(
                destination.host,
                destination.port,
                calling_ae=options.ae_title,
                called_ae=name,
                contexts=proposals(summary),
                # The idle timer stays the default: response_timeout bounds each wait.
                timeouts=Timeouts(artim=options.connect_timeout),
                connect_timeout=options.connect_timeout,
                ssl_context=self._ssl_context() if destination.tls else None,
            )
        except AssociationRefused as exc:
            log_event(
                log,
                "retrieve.destination_refused",
                level=logging.WARNING,
                destination=name,
                error=str(exc),
            )
            return Target(None, (), options.response_timeout, lost=f"{name}: {exc}")
        return _MoveTarget(
            client.session,
            list(client.contexts.values()),
            options.response_timeout,
            move_originator=(operation.session.calling_ae, operation.message_id),
            client=client,
        )

    async def close_target(self, target: Target) -> None:
        """Release the association to the destination (abort it if that takes too long)."""
        if not isinstance(target, _MoveTarget) or target.client is None:
            return
        client = target.client
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                await client.release(self.options.connect_timeout)
        except (TimeoutError, ConnectionError):
            with contextlib.suppress(Exception):
                await client.abort()

    def _ssl_context(self) -> ssl.SSLContext:
        # The configured context ([tls] CA and certificate), else the system's trust store;
        # host name checked either way (PS3.15 B.1).
        if self._tls is None:
            self._tls = self.options.tls_context or ssl.create_default_context()
        return self._tls
