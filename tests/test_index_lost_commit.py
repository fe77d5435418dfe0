"""A PostgreSQL commit whose answer is lost with its connection: the row is the store's own.

A proxy between the index writer and PostgreSQL passes the first COMMIT on, lets the
server carry it out, then cuts both connections before the answer reaches the writer.
The writer tries again on a new connection and finds the instance indexed: it must know
that row for the one it just committed (its unsynced listing is there), not refuse it as
a duplicate under "reject".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from minipacs.index.db import make_engine
from minipacs.index.models import Instance, UnsyncedFile
from minipacs.index.writer import IndexWriter
from tests.fixtures_db import _create_database
from tests.pgserver import PostgresServer
from tests.test_index import _record

# Seconds the proxy leaves the server to carry out the COMMIT before it cuts the line.
_COMMIT_GRACE = 0.5


class CommitCutter:
    """A TCP proxy to PostgreSQL that loses the answer to the first COMMIT it passes on."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = threading.Event()
        self.cut = threading.Event()
        self._threads: list[threading.Thread] = []
        self._start(self._accept)

    def _start(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
            server.settimeout(None)
            muted = threading.Event()
            self._start(self._to_server, client, server, muted)
            self._start(self._to_client, server, client, muted)

    def _to_server(
        self, client: socket.socket, server: socket.socket, muted: threading.Event
    ) -> None:
        while chunk := _recv(client):
            cutting = self.armed.is_set() and b"COMMIT" in chunk.upper()
            if cutting:
                self.armed.clear()
                muted.set()
            server.sendall(chunk)
            if cutting:
                time.sleep(_COMMIT_GRACE)
                # Before the cut: the writer's retry cannot finish ahead of it.
                self.cut.set()
                for sock in (client, server):
                    _close(sock)
                return
        _close(server)

    def _to_client(
        self, server: socket.socket, client: socket.socket, muted: threading.Event
    ) -> None:
        while chunk := _recv(server):
            if muted.is_set():
                continue
            try:
                client.sendall(chunk)
            except OSError:
                break
        _close(client)

    def close(self) -> None:
        """Stop accepting; connections still open end with their peers."""
        _close(self.listener)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@pytest.fixture
def cut_engine(
    postgres: PostgresServer, postgres_template: str
) -> Iterator[tuple[Engine, CommitCutter]]:
    """An engine on a fresh PostgreSQL database reached through a CommitCutter.

    PostgreSQL only: SQLite has no connection to lose a commit's answer with.
    """
    cutter = CommitCutter(postgres.port)
    url = make_url(_create_database(postgres, postgres_template)).set(port=cutter.port)
    engine = make_engine(url.render_as_string(hide_password=False))
    yield engine, cutter
    engine.dispose()
    cutter.close()


@pytest.mark.parametrize("path", ["new series (made in the lookup's transaction)", "known series"])
def test_a_commit_whose_answer_was_lost_is_stored_not_a_duplicate(
    cut_engine: tuple[Engine, CommitCutter], path: str
) -> None:
    engine, cutter = cut_engine
    first = _record()
    second = dataclasses.replace(first, sop_uid=first.sop_uid + ".2", rel_path="x/second.dcm")
    token = "f" * 32

    async def run() -> tuple[bool, bool]:
        writer = IndexWriter(engine, "reject")
        writer.start()
        try:
            if path.startswith("known"):
                assert (await writer.submit(first)).stored
                record = second
            else:
                record = first
            cutter.armed.set()
            future = writer.enqueue(record, unsynced=token)
            outcome = await asyncio.wait_for(asyncio.wrap_future(future), 30)
            assert cutter.cut.is_set(), "the proxy never cut a COMMIT"
            with Session(engine) as session:
                listed = session.scalar(select(func.count()).where(UnsyncedFile.token == token))
            writer.settle(token)
            return outcome.stored and not outcome.rejected, listed == 1
        finally:
            await writer.close()

    stored, listed = asyncio.run(run())
    assert stored, "the writer's own committed row was answered as a duplicate"
    assert listed, "the listing committed with the row must stay until settled"
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == (
            2 if path.startswith("known") else 1
        )
        # Settled at close: nothing left for recovery to find.
        assert session.scalar(select(func.count()).select_from(UnsyncedFile)) == 0


def test_a_listing_whose_row_was_replaced_since_is_not_taken_for_a_lost_commit(
    db_url: str,
) -> None:
    # The lost commit landed, then another node ("replace") put the instance at another
    # path; the listing stays (replace leaves listings alone). The retry must not answer
    # stored: no row names its file, which the store would then keep as an orphan.
    first = _record()
    token = "e" * 32

    async def run() -> tuple[bool, str | None]:
        ours, other = IndexWriter(engine, "reject"), IndexWriter(engine, "replace")
        ours.start()
        other.start()
        try:
            landed = await asyncio.wrap_future(ours.enqueue(first, unsynced=token))
            assert landed.stored
            moved = dataclasses.replace(first, rel_path="x/elsewhere.dcm")
            assert (await other.submit(moved)).stored
            retried = await asyncio.wrap_future(ours.enqueue(first, unsynced=token))
            return retried.stored, retried.existing_path
        finally:
            await ours.close()
            await other.close()

    engine = make_engine(db_url)
    try:
        assert asyncio.run(run()) == (False, "x/elsewhere.dcm")
    finally:
        engine.dispose()
