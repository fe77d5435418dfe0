"""Group commit of index rows from one writer thread, awaitable from the event loop.

Concurrent C-STOREs each submit a record; the writer thread commits whatever has queued
(up to batch_max, waiting batch_wait_ms for company) in one transaction, then resolves
every waiting future. One fsync of the database then acknowledges many stores. A record
that fails is retried alone so that it cannot take the rest of its batch down with it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from minipacs.index.ingest import IngestOutcome, InstanceRecord, apply_record

log = logging.getLogger("minipacs.index")


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
        batch_wait_ms: float = 2.0,
    ) -> None:
        self.engine = engine
        self.duplicate_policy = duplicate_policy
        self.batch_max = batch_max
        self.batch_wait = batch_wait_ms / 1000
        self.commits = 0
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)

    def start(self) -> None:
        """Start the writer thread."""
        self._thread.start()

    async def submit(self, record: InstanceRecord) -> IngestOutcome:
        """Queue a record; return its outcome once its transaction has committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[IngestOutcome] = loop.create_future()
        self._queue.put(_Job(record, future, loop))
        return await future

    async def close(self) -> None:
        """Commit what is queued, then stop the thread."""
        self._queue.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def _next_batch(self) -> tuple[list[_Job], bool]:
        first = self._queue.get()
        if first is None:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.batch_wait
        while len(batch) < self.batch_max:
            remaining = deadline - time.monotonic()
            try:
                job = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
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
            if batch:
                self._commit(batch)

    def _commit(self, batch: list[_Job]) -> None:
        try:
            with Session(self.engine) as session, session.begin():
                outcomes = [
                    apply_record(session, job.record, self.duplicate_policy) for job in batch
                ]
            self.commits += 1
            for job, outcome in zip(batch, outcomes, strict=True):
                _resolve(job, outcome)
        except Exception:
            if len(batch) == 1:
                log.exception("index commit failed for %s", batch[0].record.sop_uid)
                _fail(batch[0], IndexUnavailable("index commit failed"))
                return
            for job in batch:
                self._commit_one(job)

    def _commit_one(self, job: _Job) -> None:
        try:
            with Session(self.engine) as session, session.begin():
                outcome = apply_record(session, job.record, self.duplicate_policy)
            self.commits += 1
            _resolve(job, outcome)
        except Exception as exc:
            log.exception("index commit failed for %s", job.record.sop_uid)
            _fail(job, IndexUnavailable(f"index commit failed: {exc}"))


class IndexUnavailable(Exception):
    """The index could not commit a record (database down, constraint, ...)."""


def _resolve(job: _Job, outcome: IngestOutcome) -> None:
    def set_result() -> None:
        if not job.future.done():
            job.future.set_result(outcome)

    job.loop.call_soon_threadsafe(set_result)


def _fail(job: _Job, error: Exception) -> None:
    def set_exception() -> None:
        if not job.future.done():
            job.future.set_exception(error)

    job.loop.call_soon_threadsafe(set_exception)
