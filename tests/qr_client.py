"""Query/Retrieve test clients on our asyncio requestor: identifiers, stores, cancels."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from minipacs import dataset as dicom
from minipacs.net.client import ClientAssociation
from minipacs.net.commands import Command


async def connect(
    port: int, calling_ae: str, contexts: Sequence[tuple[str, Sequence[str]]], **options: Any
) -> ClientAssociation:
    """An association with the daemon on 127.0.0.1:port (options go to connect)."""
    return await ClientAssociation.connect(
        "127.0.0.1", port, calling_ae=calling_ae, called_ae="MINIPACS", contexts=contexts, **options
    )


def identifier(level: str, **keys: object) -> Dataset:
    """An identifier: QueryRetrieveLevel and the given keys ("" asks for a value back)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


async def request_and_cancel(
    assoc: ClientAssociation, model: str, command: Command, ds: Dataset, at_once: bool = False
) -> list[Command]:
    """Send a C-FIND/C-MOVE/C-GET and C-CANCEL it after the first response (or right after
    the request, `at_once`: PS3.7 9.3.2.3 allows it at any time); every response."""
    context_id = assoc.context_for(model)
    message_id = assoc.session.next_message_id()
    command = {"AffectedSOPClassUID": model, "Priority": 0, "CommandDataSetType": 1, **command}
    raw = dicom.encode(ds, ExplicitVRLittleEndian)
    stream = assoc.request(context_id, command, raw, message_id)
    first = asyncio.ensure_future(anext(stream))
    if at_once:
        # One turn of the loop: the request is written before its first response is awaited.
        await asyncio.sleep(0)
        await assoc.cancel(context_id, message_id)
    responses = [(await first).command]
    if not at_once:
        await assoc.cancel(context_id, message_id)
    async for response in stream:
        responses.append(response.command)
    return responses


async def store_encoded(
    port: int,
    calling_ae: str,
    instances: Sequence[tuple[str, str, str, bytes]],
    timeout: float = 300.0,
) -> list[int]:
    """Store (SOP class, SOP instance, transfer syntax, data set) over one association."""
    contexts = sorted({(sop_class, syntax) for sop_class, _, syntax, _ in instances})
    async with asyncio.timeout(timeout):
        assoc = await connect(
            port, calling_ae, [(sop_class, [syntax]) for sop_class, syntax in contexts]
        )
        statuses = []
        async with assoc:
            for sop_class, sop_uid, syntax, data in instances:
                context_id = assoc.context_for(sop_class, syntax)
                response = await assoc.store(context_id, sop_class, sop_uid, data)
                statuses.append(int(response["Status"]))  # type: ignore[call-overload]
        return statuses
