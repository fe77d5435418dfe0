"""What C-MOVE and C-GET share: the identifier check, the index pages, the responses.

A retrieve (PS3.4 C.4.2.3, C.4.3.3) checks its identifier and counts the matching
instances (one executor trip), opens a `Target` (C-MOVE: a new association to the move
destination; C-GET: the requestor's own association), then sends each instance with a
C-STORE sub-operation (services/suboperations.py), in instance order, page by page, the
next page read while the current one is sent. Pending responses report
Remaining/Completed/Failed/Warning after the first sub-operation, then at most every
`pending_interval` seconds (PS3.4 C.4.2.3.1 and C.4.3.3.1 make them optional: one per
sub-operation costs the requestor and us a message each, which on small instances is
most of the work); the final status is Success, Warning 0xB000
or Failure 0xA702 (all failed) with the Failed SOP Instance UID List (0008,0058), or
Cancel 0xFE00 when the requestor sent C-CANCEL.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Final

from pydicom import Dataset
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from minipacs import dataset as dicom
from minipacs.config import Destination
from minipacs.index.keys import InformationModel
from minipacs.index.query import QueryError
from minipacs.index.retrieve import RetrieveQuery, StoredInstance, plan_retrieve
from minipacs.net.operations import PENDING, SUCCESS, Operation
from minipacs.services.qr import model_of, refuse_identifier
from minipacs.services.suboperations import Counts, InFlight, Sender, Target
from minipacs.storage.filestore import FileStore

log = logging.getLogger("minipacs.retrieve")

Page = tuple[Sequence[StoredInstance], int | None]

# C-MOVE and C-GET failures before any sub-operation, PS3.4 Tables C.4-2 and C.4-3.
UNABLE_TO_COUNT: Final = 0xA701
MOVE_DESTINATION_UNKNOWN: Final = 0xA801


@dataclass(frozen=True)
class RetrieveOptions:
    """How retrieves run: our AE title, move destinations, time bounds, page size."""

    ae_title: str
    # C-MOVE destinations: the only places sub-operations may go (config [destinations]).
    destinations: Mapping[str, Destination] = field(default_factory=dict)
    connect_timeout: float = 10.0
    # For destinations with tls = true: [tls] CA bundle and client certificate (app).
    tls_context: ssl.SSLContext | None = None
    # Longest wait for one C-STORE-RSP; past it the peer counts as gone.
    response_timeout: float = 60.0
    page_size: int = 100
    # Least seconds between two Pending responses; 0: one after every sub-operation.
    pending_interval: float = 0.1


@dataclass
class PendingPacer:
    """When the next Pending response is due: sub-operations ended and the interval passed."""

    interval: float
    reported: int = 0
    next_at: float = float("-inf")

    def due(self, done: int, now: float) -> bool:
        """True (and the report recorded) when a Pending response should go out now."""
        if done <= self.reported or now < self.next_at:
            return False
        self.reported = done
        self.next_at = now + self.interval
        return True


class RetrieveService:
    """The part of C-MOVE and C-GET SCPs that does not depend on where instances go."""

    # The command's name for logs, and the SOP class UID -> model table it serves.
    name = "retrieve"
    models: Mapping[str, InformationModel] = {}

    def __init__(
        self,
        engine: Engine,
        store: FileStore,
        query_executor: Executor,
        file_executor: Executor,
        options: RetrieveOptions,
    ) -> None:
        self.engine = engine
        self.query_executor = query_executor
        self.options = options
        self.sender = Sender(store, file_executor)

    async def handle(self, operation: Operation) -> None:
        """Serve one C-MOVE-RQ or C-GET-RQ, streaming Pending responses."""
        model = await model_of(operation, self.models, self.name)
        if model is None:
            return
        if not await self.accepts(operation):
            return
        loop = asyncio.get_running_loop()
        try:
            query, summary = await loop.run_in_executor(
                self.query_executor, self._start, operation, model
            )
        except (dicom.DataSetError, QueryError) as exc:
            await refuse_identifier(operation, exc)
            return
        except SQLAlchemyError:
            log.exception("%s query failed", self.name)
            await operation.respond(UNABLE_TO_COUNT, error_comment="index unavailable")
            return
        counts = Counts(sum(summary.values()))
        operation.log_fields.update(query_level=query.plan.level, matches=counts.remaining)
        if not counts.remaining:
            await self._finish(operation, counts, False, None)
            return
        # The first page is read while the target opens.
        first_page = loop.run_in_executor(self.query_executor, query.page, 0)
        target = await self.open_target(operation, summary)
        try:
            cancelled = await self._run(operation, self._pages(query, first_page), target, counts)
        finally:
            await self.close_target(target)
        await self._finish(operation, counts, cancelled, target)

    async def accepts(self, operation: Operation) -> bool:
        """Check the request before the index is read; False once a failure was sent."""
        return True

    async def open_target(
        self, operation: Operation, summary: Mapping[tuple[str, str], int]
    ) -> Target:
        """Where the sub-operations of this retrieve go."""
        raise NotImplementedError

    async def close_target(self, target: Target) -> None:
        """Release what open_target opened."""

    def _start(
        self, operation: Operation, model: InformationModel
    ) -> tuple[RetrieveQuery, dict[tuple[str, str], int]]:
        message = operation.message
        if message.dataset is None:
            raise QueryError(f"{self.name} request without an identifier")
        syntax = operation.context.transfer_syntax
        identifier = dicom.inspect(message.dataset.getvalue(), syntax, dicom.ALL_TAGS)
        plan = plan_retrieve(model, identifier.dataset)
        query = RetrieveQuery(plan, self.engine, self.options.page_size)
        return query, query.summary()

    async def _pages(
        self, query: RetrieveQuery, following: asyncio.Future[Page]
    ) -> AsyncIterator[StoredInstance]:
        """The instances page by page, each page queried while the one before is sent."""
        loop = asyncio.get_running_loop()
        while True:
            page, after = await following
            if after is not None:
                following = loop.run_in_executor(self.query_executor, query.page, after)
            for instance in page:
                yield instance
            if after is None:
                return

    async def _run(
        self,
        operation: Operation,
        instances: AsyncIterator[StoredInstance],
        target: Target,
        counts: Counts,
    ) -> bool:
        """Send every instance; return True when C-CANCEL stopped the retrieve."""
        pacer = PendingPacer(self.options.pending_interval)
        items = self.sender.prefetched(target, instances)
        try:
            current = await anext(items, None)
            # The current instance's C-STORE-RQ when the reader already sent it (chained).
            sent: InFlight | None = None
            while current is not None:
                instance, prepared = current
                if sent is None and operation.cancelled.is_set():
                    if prepared is not None:
                        await prepared.close()
                    return True
                flight = sent
                if flight is None and prepared is not None:
                    flight = await self.sender.start(target, instance, prepared)
                # While the peer handles this one: the Pending response of the one before,
                # and the next instance framed to leave as soon as this one is answered.
                await self._report(operation, target, counts, pacer)
                following = await anext(items, None)
                chained = None
                if flight is not None and following is not None and following[1] is not None:
                    chained = self.sender.chain(
                        target, following[0], following[1], flight, operation.cancelled
                    )
                status = await self.sender.finish(target, flight) if flight else None
                sent = await self.sender.chained_flight(target, chained) if chained else None
                counts.record(status, instance.sop_uid)
                current = following
            await self._report(operation, target, counts, pacer)
        except SQLAlchemyError:
            # The index went away mid-retrieve: what was not sent counts as failed.
            log.exception("%s page query failed", self.name)
            counts.failed += counts.remaining
            counts.remaining = 0
        finally:
            await items.aclose()
        return False

    async def _report(
        self, operation: Operation, target: Target, counts: Counts, pacer: PendingPacer
    ) -> None:
        """Send a Pending response when the pacer says one is due (PS3.4 C.4.2.3.1)."""
        if target.lost is not None:
            return
        done = counts.completed + counts.failed + counts.warning
        if pacer.due(done, asyncio.get_running_loop().time()):
            await operation.respond(PENDING, **counts.fields(final=False))

    async def _finish(
        self, operation: Operation, counts: Counts, cancelled: bool, target: Target | None
    ) -> None:
        status = counts.final_status(cancelled)
        operation.log_fields.update(
            completed=counts.completed, failed=counts.failed, warning=counts.warning
        )
        if target is not None and target.lost:
            operation.log_fields["error"] = target.lost
        identifier = None
        if status != SUCCESS:
            # PS3.4 C.4.2.1.4.2: Cancel, Warning and Failure carry the failed UIDs.
            ds = Dataset()
            ds.FailedSOPInstanceUIDList = counts.failed_uids
            loop = asyncio.get_running_loop()
            identifier = await loop.run_in_executor(
                self.query_executor, dicom.encode, ds, operation.context.transfer_syntax
            )
        await operation.respond(
            status, identifier, **counts.fields(final=True, cancelled=cancelled)
        )
