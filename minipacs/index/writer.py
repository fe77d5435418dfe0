"""Group commit of index rows from one writer thread, awaitable from the event loop.

Concurrent C-STOREs each submit a record; the writer thread commits whatever has queued
(up to batch_max; waiting batch_wait_ms for company, 0 by default: what queues while a
commit runs makes the next batch) in one transaction, then resolves each waiting future,
so one database fsync acknowledges many stores. A future resolves
only after the commit that made its record durable. If a batch fails, its records are
retried one transaction each, so one bad record fails only its own caller.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from minipacs.index.db import write_session
from minipacs.index.ingest import DUPLICATE_POLICIES, IngestOutcome, InstanceRecord, apply_records

log = logging.getLogger("minipacs.index")

# A transaction that lost a deadlock, a serialisation conflict or its connection is tried
# again this many times, after these pauses (seconds), before its callers see an error.
_RETRY_PAUSES = (0.01, 0.05, 0.2)


class IndexUnavailable(Exception):
    """The index could not commit a record (database down, bad value, writer closed...)."""


@dataclass
class _Job:
    record: InstanceRecord
    future: asyncio.Future[IngestOutcome]
    loop: asyncio.AbstractEventLoop


class IndexWriter:
    """The single writer of index rows, with group commit."""

    def __init__(
        self,
        engine: Engine,
        duplicate_policy: str,
        batch_max: int = 64,
        batch_wait_ms: float = 0.0,
    ) -> None:
        """Prepare the writer; nothing runs before start()."""
        if duplicate_policy not in DUPLICATE_POLICIES:
            raise ValueError(f"duplicate policy must be one of {', '.join(DUPLICATE_POLICIES)}")
        self.engine = engine
        self.duplicate_policy = duplicate_policy
        self.batch_max = max(1, batch_max)
        self.batch_wait = batch_wait_ms / 1000
        # Transactions committed; with concurrent submits far fewer than records.
        self.commits = 0
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)

    def start(self) -> None:
        """Start the writer thread."""
        self._thread.start()

    async def submit(self, record: InstanceRecord) -> IngestOutcome:
        """Queue a record; return its outcome once its transaction has committed."""
        if self._closed:
            raise IndexUnavailable("index writer is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[IngestOutcome] = loop.create_future()
        self._queue.put(_Job(record, future, loop))
        return await future

    async def close(self) -> None:
        """Commit what is queued, then stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        if self._thread.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        # Submits that raced with close() arrive after the stop mark.
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                _settle(job, IndexUnavailable("index writer is closed"))

    def _next_batch(self) -> tuple[list[_Job], bool]:
        """Block for a first job, then gather more for up to batch_wait; (batch, stop)."""
        first = self._queue.get()
        if first is None:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.batch_wait
        while len(batch) < self.batch_max:
            remaining = deadline - time.monotonic()
            try:
                job = (
                    self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get(False)
                )
            except queue.Empty:
                break
            if job is None:
                return batch, True
            batch.append(job)
        return batch, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = self._next_batch()
            if not batch:
                continue
            try:
                self._commit(batch)
            except Exception as exc:  # never let the thread die: callers would wait forever
                log.exception("index writer failed on a batch")
                for job in batch:
                    _settle(job, IndexUnavailable(f"index writer failed: {exc}"))

    def _transaction(self, jobs: list[_Job]) -> list[IngestOutcome]:
        records = [job.record for job in jobs]
        attempt = 0
        while True:
            try:
                with write_session(self.engine) as session, session.begin():
                    outcomes = apply_records(session, records, self.duplicate_policy)
            except OperationalError as exc:
                # Transient (deadlock victim, lock timeout, lost connection): the whole
                # transaction rolled back, so running it again is safe.
                if attempt == len(_RETRY_PAUSES):
                    raise
                log.info("index transaction of %d retried: %s", len(records), exc.orig)
                time.sleep(_RETRY_PAUSES[attempt])
                attempt += 1
                continue
            self.commits += 1
            return outcomes

    def _commit(self, batch: list[_Job]) -> None:
        try:
            outcomes = self._transaction(batch)
        except Exception as exc:
            if len(batch) == 1:
                log.exception("index commit failed for %s", batch[0].record.sop_uid)
                _settle(batch[0], _unavailable(exc))
                return
            log.warning("batch of %d failed (%s); committing one by one", len(batch), exc)
            for job in batch:
                self._commit([job])
            return
        for job, outcome in zip(batch, outcomes, strict=True):
            _settle(job, outcome)


def _unavailable(cause: Exception) -> IndexUnavailable:
    error = IndexUnavailable(f"index commit failed: {cause}")
    error.__cause__ = cause
    return error


def _settle(job: _Job, result: IngestOutcome | Exception) -> None:
    """Resolve a caller's future from the writer thread, on the caller's loop."""

    def settle() -> None:
        """Runs on the caller's loop: futures are not thread-safe."""
        if job.future.done():  # the caller was cancelled
            return
        if isinstance(result, Exception):
            job.future.set_exception(result)
        else:
            job.future.set_result(result)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:
        # The caller's loop is closed: nobody is waiting any more.
        log.debug("outcome for %s dropped: event loop closed", job.record.sop_uid)
