"""Query/Retrieve FIND as SCP: C-FIND (PS3.4 C.4.1, PS3.7 9.1.2).

The identifier is checked (PS3.4 C.4.1.3.1.1 hierarchical search), then the index is
read one page at a time in an executor: each page's responses are built and encoded
there too, so the event loop only sends them. One Pending response per matching entity,
then Success; C-CANCEL ends the stream with Cancel (0xFE00) before the next response.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Final

from pydicom import Dataset
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from minipacs import dataset as dicom
from minipacs.index.keys import FIND_MODELS, InformationModel
from minipacs.index.query import FindQuery, QueryError, plan_find
from minipacs.net.operations import (
    CANCEL,
    OUT_OF_RESOURCES,
    PENDING,
    PENDING_WARNING,
    SUCCESS,
    Operation,
)
from minipacs.services.find_responses import encode_response
from minipacs.services.qr import model_of, refuse_identifier
from minipacs.storage.filestore import FileStore

log = logging.getLogger("minipacs.find")

# C-FIND status, PS3.4 Table C.4-1 (Cxxx: unable to process).
INDEX_UNAVAILABLE: Final = 0xC001


@dataclass(frozen=True)
class FindOptions:
    """How C-FIND answers: our AE title, PN case folding, result cap, page size."""

    ae_title: str
    pn_case_insensitive: bool = True
    # 0: no cap. Past it the query ends with 0xA700 after the first max_results matches.
    max_results: int = 0
    page_size: int = 200


@dataclass
class _Page:
    responses: list[bytes]
    following: int | None


class FindService:
    """Answers C-FIND-RQ on the Patient Root and Study Root FIND models."""

    def __init__(
        self, engine: Engine, store: FileStore, executor: Executor, options: FindOptions
    ) -> None:
        self.engine = engine
        self.store = store
        self.executor = executor
        self.options = options

    async def handle(self, operation: Operation) -> None:
        """Serve one C-FIND-RQ, streaming Pending responses."""
        model = await model_of(operation, FIND_MODELS, "C-FIND")
        if model is None:
            return
        loop = asyncio.get_running_loop()
        try:
            # One executor trip checks the identifier and reads the first page.
            query, page = await loop.run_in_executor(self.executor, self._start, operation, model)
        except (dicom.DataSetError, QueryError) as exc:
            await refuse_identifier(operation, exc)
            return
        except SQLAlchemyError:
            await self._index_failed(operation)
            return
        await self._stream(operation, query, page)

    def _start(self, operation: Operation, model: InformationModel) -> tuple[FindQuery, _Page]:
        message = operation.message
        if message.dataset is None:
            raise QueryError("C-FIND-RQ without an identifier")
        syntax = operation.context.transfer_syntax
        identifier = dicom.inspect(message.dataset.getvalue(), syntax, dicom.ALL_TAGS)
        plan = plan_find(model, identifier.dataset, self.options.pn_case_insensitive)
        query = FindQuery(plan, self.engine, self._file_header, self.options.page_size)
        return query, self._page(query, 0, syntax)

    async def _index_failed(self, operation: Operation) -> None:
        log.exception("C-FIND query failed")
        await operation.respond(INDEX_UNAVAILABLE, error_comment="index unavailable")

    async def _stream(self, operation: Operation, query: FindQuery, page: _Page) -> None:
        loop = asyncio.get_running_loop()
        syntax = operation.context.transfer_syntax
        pending = PENDING_WARNING if query.plan.unsupported else PENDING
        cap = self.options.max_results
        sent = 0
        operation.log_fields.update(query_level=query.plan.level, matches=0)
        while True:
            for response in page.responses:
                if operation.cancelled.is_set():
                    await operation.respond(CANCEL)
                    return
                if cap and sent >= cap:
                    await operation.respond(
                        OUT_OF_RESOURCES,
                        error_comment=f"more than {cap} matches: narrow the query",
                    )
                    return
                await operation.respond(pending, response)
                sent += 1
                operation.log_fields["matches"] = sent
            if page.following is None:
                break
            # Let the reader see a C-CANCEL between pages even when the socket never blocks.
            await asyncio.sleep(0)
            if operation.cancelled.is_set():
                await operation.respond(CANCEL)
                return
            try:
                page = await loop.run_in_executor(
                    self.executor, self._page, query, page.following, syntax
                )
            except SQLAlchemyError:
                await self._index_failed(operation)
                return
        await operation.respond(SUCCESS)

    def _page(self, query: FindQuery, after: int, syntax: str) -> _Page:
        matches, following = query.page(after)
        ae_title = self.options.ae_title
        responses = [encode_response(query.plan, match, ae_title, syntax) for match in matches]
        return _Page(responses, following)

    def _file_header(self, rel_path: str) -> Dataset:
        """The header of an instance whose header the index did not keep (read from disk)."""
        _meta, inspected = dicom.read_part10(self.store.path(rel_path), dicom.ALL_TAGS)
        return inspected.dataset
