"""What every Query/Retrieve request (C-FIND, C-MOVE, C-GET) checks before its identifier.

The context names the information model (PS3.4 C.6.1.1, C.6.2.1); the request's SOP class
must be that of its context; an identifier that cannot be decoded or that the model
refuses fails with the statuses the FIND, MOVE and GET tables share (PS3.4 Tables C.4-1,
C.4-2, C.4-3).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from minipacs import dataset as dicom
from minipacs.index.keys import InformationModel
from minipacs.index.query import QueryError
from minipacs.net.operations import SOP_CLASS_NOT_SUPPORTED, Operation

IDENTIFIER_DOES_NOT_MATCH: Final = 0xA900
UNABLE_TO_PROCESS: Final = 0xC000


async def model_of(
    operation: Operation, models: Mapping[str, InformationModel], service: str
) -> InformationModel | None:
    """The information model a request's context serves; None once a failure was sent."""
    context = operation.context
    model = models.get(context.abstract_syntax)
    if model is None:
        await operation.respond(
            SOP_CLASS_NOT_SUPPORTED,
            error_comment=f"{context.abstract_syntax} is not a {service} model we serve",
        )
        return None
    sop_class = str(operation.command.get("AffectedSOPClassUID", ""))
    if sop_class != context.abstract_syntax:
        await operation.respond(
            IDENTIFIER_DOES_NOT_MATCH,
            error_comment=f"SOP Class {sop_class} sent on a {model.name} {service} context",
        )
        return None
    return model


async def refuse_identifier(operation: Operation, exc: dicom.DataSetError | QueryError) -> None:
    """Answer an identifier that cannot be decoded (0xC000) or that the model refuses (0xA900)."""
    if isinstance(exc, dicom.DataSetError):
        await operation.respond(UNABLE_TO_PROCESS, error_comment=f"identifier: {exc}")
        return
    fields = {"OffendingElement": [exc.tag]} if exc.tag is not None else {}
    await operation.respond(IDENTIFIER_DOES_NOT_MATCH, error_comment=str(exc), **fields)
