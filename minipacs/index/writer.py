"""Group commit of index rows from one writer thread, awaitable from the event loop.

Concurrent C-STOREs each submit a record; the writer thread commits whatever has queued
(up to batch_max; waiting batch_wait_ms for company, 0 by default: what queues while a
commit runs makes the next batch) in one transaction, then resolves each waiting future,
so one database fsync acknowledges many stores. A future resolves
only after the commit that made its record durable. If a batch fails, its records are
retried one transaction each, so one bad record fails only its own caller.

A record submitted with an unsynced token is listed in unsynced_files in its own
transaction (its file was still being flushed, see models.UnsyncedFile); settle(token)
drops the listing once the flush is done. Settling costs no commit of its own: the
deletes ride on a batch at most every SETTLE_EVERY seconds (one statement for many),
or go alone after SETTLE_IDLE seconds without a batch.

The usual batch (new instances) is committed at the DB-API level (index.fastpath); any
other goes through the ORM (ingest.apply_records).

A caller that knows it is alone (one association storing) may commit its record in its
own thread instead (commit_alone), when the queue is empty and no commit is running: a
lock marks whoever commits on the writer's connection.

Several processes writing one SQLite file (worker mode) take turns on a lock file
(db.share_writes) around each transaction, as every other writer of the index does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, insert, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from minipacs.index.db import write_engine, write_turn
from minipacs.index.fastpath import FastPath
from minipacs.index.ingest import (
    DUPLICATE_POLICIES,
    IngestOutcome,
    InstanceRecord,
    apply_records,
    drop_unsynced,
)
from minipacs.index.models import UnsyncedFile
from minipacs.storage.filestore import WRITER_ID

log = logging.getLogger("minipacs.index")

# A transaction that lost a deadlock, a serialisation conflict or its connection is tried
# again this many times, after these pauses (seconds), before its callers see an error.
_RETRY_PAUSES = (0.01, 0.05, 0.2)
# Core statements on the table: the ORM's bulk paths cost more than the statement itself.
_INSERT_UNSYNCED = insert(UnsyncedFile.__table__)
# Seconds settled tokens wait for a batch to ride on before they are committed alone.
SETTLE_IDLE = 1.0
# Seconds between batches that carry settled tokens, unless this many have gathered.
SETTLE_EVERY = 0.25
SETTLE_MAX = 512


class IndexUnavailable(Exception):
    """The index could not commit a record (database down, bad value, writer closed...)."""


@dataclass
class _Job:
    record: InstanceRecord
    future: Future[IngestOutcome]
    unsynced: str | None


class IndexWriter:
    """The single writer of index rows, with group commit."""

    def __init__(
        self,
        engine: Engine,
        duplicate_policy: str,
        batch_max: int = 64,
        batch_wait_ms: float = 0.0,
        durable_commits: bool = True,
    ) -> None:
        """Prepare the writer; nothing runs before start().

        durable_commits False (SQLite only): commits are not fsynced (synchronous=NORMAL on
        the writer's own connection); the caller makes them durable with a flush of the
        filesystem holding the database, after the commit and before any answer.
        An engine given db.share_writes takes turns with other processes' writers.
        """
        if duplicate_policy not in DUPLICATE_POLICIES:
            raise ValueError(f"duplicate policy must be one of {', '.join(DUPLICATE_POLICIES)}")
        self.engine = engine
        self.duplicate_policy = duplicate_policy
        self.batch_max = max(1, batch_max)
        self.batch_wait = batch_wait_ms / 1000
        self.durable_commits = durable_commits or engine.dialect.name != "sqlite"
        # Transactions committed; with concurrent submits far fewer than records.
        self.commits = 0
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._settled: list[str] = []
        self._connection: Connection | None = None
        self._fast: FastPath | None = None
        self._settled_at = 0.0
        self._settled_lock = threading.Lock()
        self._closed = False
        # Taken to close, and to enqueue: no job can land behind the stop mark unseen.
        self._close_lock = threading.Lock()
        # Held by whichever thread commits on the writer's connection (see commit_alone).
        self._busy = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)

    def start(self) -> None:
        """Start the writer thread."""
        self._thread.start()

    async def submit(self, record: InstanceRecord) -> IngestOutcome:
        """Queue a record; return its outcome once its transaction has committed."""
        return await asyncio.wrap_future(self.enqueue(record))

    def enqueue(self, record: InstanceRecord, unsynced: str | None = None) -> Future[IngestOutcome]:
        """Queue a record from any thread; the future resolves once it has committed.

        With an unsynced token, a stored record is listed as unsynced until settle(token).
        """
        future: Future[IngestOutcome] = Future()
        with self._close_lock:
            if self._closed:
                raise IndexUnavailable("index writer is closed")
            self._queue.put(_Job(record, future, unsynced))
        return future

    def commit_alone(
        self, record: InstanceRecord, unsynced: str | None = None
    ) -> Future[IngestOutcome]:
        """enqueue, but committed in the calling thread when nothing else is to commit.

        For a caller that knows no other store is in flight (one association storing):
        two thread hand-offs fewer on its critical path. With company it only enqueues,
        so concurrent stores still share a commit.
        """
        if self._closed or not self._queue.empty() or not self._busy.acquire(blocking=False):
            return self.enqueue(record, unsynced)
        try:
            if self._closed:
                # close() ran meanwhile: its writer may have let the connection go.
                return self.enqueue(record, unsynced)
            job = _Job(record, Future(), unsynced)
            self._commit([job])
        finally:
            self._busy.release()
        return job.future

    def settle(self, token: str) -> None:
        """Drop an unsynced listing: its file is durable now (committed later, in passing)."""
        with self._settled_lock:
            self._settled.append(token)

    async def close(self) -> None:
        """Commit what is queued, then stop the thread."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        if self._thread.is_alive():
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        # Left by a writer thread that never started: refused, not left waiting.
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                _settle(job, IndexUnavailable("index writer is closed"))

    def _next_batch(self) -> tuple[list[_Job], bool]:
        """Block for a first job, then gather more for up to batch_wait; (batch, stop)."""
        try:
            # Never without a timeout: settle() does not wake the writer, and tokens settled
            # after commits it took no part in (commit_alone) would wait for the next store.
            first = self._queue.get(timeout=SETTLE_IDLE)
        except queue.Empty:
            return [], False
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
                with self._busy:
                    self._commit_settled()
                continue
            try:
                with self._busy:
                    self._commit(batch)
            except Exception as exc:  # never let the thread die: callers would wait forever
                log.exception("index writer failed on a batch")
                for job in batch:
                    _settle(job, IndexUnavailable(f"index writer failed: {exc}"))
        with self._busy:
            self._commit_settled()
            self._drop_connection()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Session]:
        """A transaction on the writer's own connection, kept from one commit to the next.

        Checking a pooled connection out for each commit cost more than a small commit's
        statements (and a pre-ping round trip on PostgreSQL). A failed transaction drops
        the connection: the next one connects afresh, as after a database restart.
        """
        if self._connection is None:
            self._connection = self._connect()
        try:
            with Session(bind=self._connection) as session, session.begin():
                yield session
        except BaseException:
            self._drop_connection()
            raise

    def _fast_path(self) -> FastPath | None:
        """The DB-API path for the writer's connection (None: no connection to be had now)."""
        if self._fast is None:
            try:
                if self._connection is None:
                    self._connection = self._connect()
            except Exception as exc:  # the ORM path connects again and reports it
                log.debug("index writer cannot connect: %s", exc)
                return None
            self._fast = FastPath(self._connection, WRITER_ID)
        return self._fast

    def _connect(self) -> Connection:
        connection = write_engine(self.engine).connect()
        if not self.durable_commits:
            try:
                # In WAL mode NORMAL still commits atomically; only the WAL's fsync is left out.
                connection.connection.dbapi_connection.execute("PRAGMA synchronous=NORMAL")
                # Its own connection from now on: the pool's others keep synchronous=FULL.
                connection.detach()
            except BaseException:
                connection.invalidate()
                connection.close()
                raise
        return connection

    def _drop_connection(self) -> None:
        self._fast = None
        if self._connection is not None:
            connection, self._connection = self._connection, None
            try:
                connection.close()
            except Exception as exc:  # a broken connection may fail to close; it is gone
                log.debug("index writer connection closed with %s", type(exc).__name__)

    def _take_settled(self, riding: bool = False) -> list[str]:
        """The settled tokens to delete now; riding on a batch, only every SETTLE_EVERY."""
        now = time.monotonic()
        with self._settled_lock:
            if riding and len(self._settled) < SETTLE_MAX and now - self._settled_at < SETTLE_EVERY:
                return []
            taken, self._settled = self._settled, []
        self._settled_at = now
        return taken

    def _give_back_settled(self, tokens: list[str]) -> None:
        """A transaction carrying settled tokens rolled back: they go with a later one."""
        with self._settled_lock:
            self._settled.extend(tokens)

    def _commit_settled(self) -> None:
        """Commit the settled tokens alone (no batch came along to carry them)."""
        tokens = self._take_settled()
        if not tokens:
            return
        try:
            with write_turn(self.engine), self._writing() as session:
                drop_unsynced(session, tokens)
        except Exception as exc:
            # The listings stay; recovery finds their files whole and drops them.
            log.warning("settling %d unsynced listings failed: %s", len(tokens), exc)
            if not self._closed:
                self._give_back_settled(tokens)

    def _transaction(self, jobs: list[_Job]) -> list[IngestOutcome]:
        records = [job.record for job in jobs]
        fast = self._fast_path()
        # Taken once: every attempt below carries them, until one commits.
        settled = self._take_settled(riding=True)
        if fast is not None:
            with write_turn(self.engine):
                outcomes = fast.commit(records, [job.unsynced for job in jobs], settled)
            if outcomes is not None:
                self.commits += 1
                return outcomes
        attempt = 0
        while True:
            try:
                with write_turn(self.engine), self._writing() as session:
                    outcomes = apply_records(session, records, self.duplicate_policy)
                    outcomes = _list_unsynced(session, jobs, outcomes)
                    drop_unsynced(session, settled)
            except OperationalError as exc:
                # Transient (deadlock victim, lock timeout, lost connection): the whole
                # transaction rolled back, so running it again is safe.
                if attempt == len(_RETRY_PAUSES):
                    self._give_back_settled(settled)
                    raise
                log.info("index transaction of %d retried: %s", len(records), exc.orig)
                time.sleep(_RETRY_PAUSES[attempt])
                attempt += 1
                continue
            except BaseException:
                self._give_back_settled(settled)
                raise
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


def _list_unsynced(
    session: Session, jobs: list[_Job], outcomes: list[IngestOutcome]
) -> list[IngestOutcome]:
    """List the stored records of jobs that came with an unsynced token; their outcomes.

    A job whose token is listed already was committed by an earlier attempt whose answer
    was lost with its connection (PostgreSQL): the row found is its own, so it is stored,
    not a duplicate ("reject" would refuse an instance the index holds).
    """
    # A row at another path is not the job's, listing or not (another node's "replace").
    maybe_ours = [
        job.unsynced
        for job, outcome in zip(jobs, outcomes, strict=True)
        if job.unsynced is not None
        and not outcome.stored
        and outcome.existing_path == job.record.rel_path
    ]
    landed: set[str] = set()
    if maybe_ours:
        landed = set(
            session.scalars(select(UnsyncedFile.token).where(UnsyncedFile.token.in_(maybe_ours)))
        )
    if landed:
        log.info("%d index rows found committed by an attempt whose answer was lost", len(landed))
        outcomes = [
            IngestOutcome(job.record.sop_uid, stored=True) if job.unsynced in landed else outcome
            for job, outcome in zip(jobs, outcomes, strict=True)
        ]
    rows = [
        {
            "token": job.unsynced,
            "rel_path": job.record.rel_path,
            "sop_uid": job.record.sop_uid,
            "writer": WRITER_ID,
        }
        for job, outcome in zip(jobs, outcomes, strict=True)
        if job.unsynced is not None and outcome.stored and job.unsynced not in landed
    ]
    if rows:
        session.connection().execute(_INSERT_UNSYNCED, rows)
    return outcomes


def _unavailable(cause: Exception) -> IndexUnavailable:
    error = IndexUnavailable(f"index commit failed: {cause}")
    error.__cause__ = cause
    return error


def _settle(job: _Job, result: IngestOutcome | Exception) -> None:
    """Resolve a caller's future (thread-safe; a cancelled caller is no longer waiting)."""
    if not job.future.set_running_or_notify_cancel():
        return
    if isinstance(result, Exception):
        job.future.set_exception(result)
    else:
        job.future.set_result(result)
