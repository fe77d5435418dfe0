"""Checks made before a DIMSE request reaches its service: authorization, data set size.

Each registered `Service` is wrapped, so the services themselves know nothing of access
rules; a refused request is answered here and logged and counted like any other
operation (Operation.respond), plus an `access.refused` event naming the rule.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from minipacs.logs import log_event
from minipacs.net.access import SERVICE_NAMES, AccessPolicy
from minipacs.net.commands import C_ECHO_RQ
from minipacs.net.operations import OUT_OF_RESOURCES, Operation, Service

log = logging.getLogger("minipacs.access")

# PS3.7 C.5.x (Annex C general statuses): Refused: Not Authorized.
NOT_AUTHORIZED: Final = 0x0124


def log_refusal(logger: logging.Logger, event: str, peer: str, **fields: object) -> None:
    """Log one refusal (association, connection or service) as a WARNING event."""
    log_event(logger, event, level=logging.WARNING, peer=peer, **fields)


@dataclass(frozen=True, slots=True)
class _Guard:
    service: Service
    name: str
    policy: AccessPolicy
    max_dataset_size: int

    async def handle(self, operation: Operation) -> None:
        session = operation.session
        if not self.policy.allows(session.calling_ae, self.name):
            log_refusal(
                log,
                "access.refused",
                session.peer,
                calling_ae=session.calling_ae,
                service=self.name,
            )
            await operation.respond(
                NOT_AUTHORIZED, error_comment=f"{session.calling_ae} may not {self.name}"
            )
            return
        dataset = operation.message.dataset
        if dataset is not None and dataset.oversized:
            # The bytes past the cap were dropped as they came (MessageAssembler).
            await operation.respond(
                OUT_OF_RESOURCES,
                error_comment=f"data set over {self.max_dataset_size} bytes, not accepted",
            )
            return
        await self.service.handle(operation)


def guard_services(
    services: Mapping[int, Service], policy: AccessPolicy, max_dataset_size: int
) -> dict[int, Service]:
    """The services table with access and size checks in front of each service."""
    guarded = {}
    for field, service in services.items():
        # C-ECHO carries no data set: with nobody restricted it needs no check at all,
        # and its hot path keeps one coroutine less.
        if field == C_ECHO_RQ and policy.open_to_all:
            guarded[field] = service
            continue
        name = SERVICE_NAMES.get(field, f"0x{field:04X}")
        guard = _Guard(service, name, policy, max_dataset_size)
        guarded[field] = Service(guard.handle, service.concurrent)
    return guarded
