"""Database engines: SQLite (WAL, synchronous FULL) by default, PostgreSQL via psycopg 3.

The index writer may relax its own SQLite connection to synchronous NORMAL when the
store's flush covers the database file (IndexWriter.durable_commits).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from minipacs.lockfile import LockFile

# Execution option that makes a SQLite transaction take the write lock when it begins.
_IMMEDIATE = "minipacs_immediate"
# Where write_engine keeps an engine's write engine.
_WRITE_ENGINE = "_minipacs_write_engine"
# Where share_writes keeps the write lock of an engine shared by several processes.
_WRITE_LOCK = "_minipacs_write_lock"


def normalise_url(url: str) -> str:
    """Pick our drivers: `postgresql://` (or `postgres://`) means psycopg 3."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def is_sqlite(url: str) -> bool:
    """True for an embedded SQLite index."""
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (None: not SQLite, or in memory)."""
    if not is_sqlite(url):
        return None
    database = make_url(normalise_url(url)).database
    return Path(database) if database and database != ":memory:" else None


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite's own transaction handling is off: _sqlite_begin emits BEGIN itself.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL lets readers (C-FIND) run beside the writer; FULL fsyncs the WAL at every commit,
    # so a commit is durable before C-STORE success goes back; busy_timeout makes a second
    # writer (reindex, another process) wait for the lock instead of failing.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    # LIKE is case-sensitive on PostgreSQL; make SQLite agree (PS3.4 C.2.2.2.4: matching is
    # case-sensitive except for PN, which uses the normalised columns). It also lets a plain
    # index serve LIKE 'prefix%'.
    cursor.execute("PRAGMA case_sensitive_like=ON")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    # A deferred transaction that reads and then writes fails at once with SQLITE_BUSY when
    # another writer committed in between (busy_timeout cannot help); writers take the lock
    # up front instead. Readers stay deferred so they never wait for the writer.
    immediate = connection.get_execution_options().get(_IMMEDIATE, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_engine(url: str, pool_size: int = 5) -> Engine:
    """Create the engine for an index URL, creating a SQLite file's folder if needed."""
    url = normalise_url(url)
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(
        url,
        pool_size=pool_size,
        pool_pre_ping=True,
        connect_args={"application_name": "minipacs"},
    )


def write_engine(engine: Engine) -> Engine:
    """The engine for index writes (on SQLite its transactions take the write lock first)."""
    # Made once per engine: building an option engine copies its event dispatch, which
    # cost more than a small transaction's statements.
    cached: Engine | None = engine.__dict__.get(_WRITE_ENGINE)
    if cached is None:
        cached = engine.__dict__[_WRITE_ENGINE] = engine.execution_options(**{_IMMEDIATE: True})
    return cached


# One per database file and process, whatever the number of engines on it.
_WRITE_LOCKS: dict[Path, LockFile] = {}
_WRITE_LOCKS_GUARD = threading.Lock()


def share_writes(engine: Engine) -> None:
    """Make this SQLite index's writers take turns with other processes' (worker mode).

    SQLite's own busy handler polls with sleeps of up to 100 ms, which two writers at
    full speed would hit on many commits; a lock file next to the database (flock)
    wakes the next in line at once. Nothing changes for PostgreSQL.
    """
    database = make_url(engine.url).database
    if engine.dialect.name == "sqlite" and database and database != ":memory:":
        path = Path(database + ".writelock")
        with _WRITE_LOCKS_GUARD:
            lock = _WRITE_LOCKS.get(path)
            if lock is None:
                lock = _WRITE_LOCKS[path] = LockFile(path)
        engine.__dict__[_WRITE_LOCK] = lock


def write_lock_path(engine: Engine) -> Path | None:
    """The lock file share_writes gave the engine, or None."""
    lock: LockFile | None = engine.__dict__.get(_WRITE_LOCK)
    return None if lock is None else lock.path


@contextlib.contextmanager
def write_turn(engine: Engine) -> Iterator[None]:
    """Hold the engine's write lock (share_writes) around a transaction; else nothing."""
    lock: LockFile | None = engine.__dict__.get(_WRITE_LOCK)
    if lock is None:
        yield
        return
    with lock.held():
        yield


def write_session(engine: Engine) -> Session:
    """A session for index writes (on SQLite its transactions take the write lock first)."""
    return Session(write_engine(engine))


def read_engine(engine: Engine) -> Engine:
    """The engine for C-FIND reads: on PostgreSQL in autocommit, without BEGIN/ROLLBACK.

    A query page is one SELECT (two with headers); a transaction around it costs two
    round trips more, ~0.3 ms of a ~0.9 ms page. SQLite keeps its own transaction
    handling (_sqlite_begin): switching pysqlite's isolation level back and forth on
    pooled connections would disturb the writers that share the pool.
    """
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="AUTOCOMMIT")
    return engine
