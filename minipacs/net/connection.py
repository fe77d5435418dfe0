"""The transport end of one association: an asyncio Protocol in place of asyncio's streams.

Received bytes go first to `receive_now`, the session's synchronous fast path, while its
reader task is idle: a C-ECHO (or any message a session can answer without awaiting) is
then answered inside this callback, with no task wake-up, future or stream buffer on the
way (StreamReader + a reader task cost ~3 us per message of the ~7 us a bare round trip
takes on uvloop). Whatever the fast path declines queues here, in arrival order, for the
reader task (`next_item`); reading pauses while that queue is over its limit.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

# Queued bytes past which the transport stops reading (as StreamReader pauses at 2 x limit).
DEFAULT_LIMIT = 4 * 1024 * 1024

# What the reader task is handed: received bytes (b"": the connection ended) or a list of
# events the fast path parsed but left to the task.
Item = bytes | list[Any]


class Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: ordered inbox, write flow control, close waiter."""

    def __init__(
        self,
        on_connected: Callable[[Connection], Awaitable[None]] | None = None,
        limit: int = DEFAULT_LIMIT,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_connected = on_connected
        self._limit = limit
        self.transport: asyncio.Transport | None = None
        # The session's fast path: True when it consumed the bytes itself.
        self.receive_now: Callable[[bytes], bool] | None = None
        self.write_paused = False
        self._items: deque[Item] = deque()
        self._queued = 0
        self._eof = False
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._closed: asyncio.Future[None] = self._loop.create_future()
        # The loop keeps only a weak reference to a task: this one must live as long as us.
        self._task: asyncio.Task[None] | None = None

    # asyncio.Protocol callbacks.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport; start the connection's handler as its own task."""
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        if self._on_connected is not None:
            self._task = self._loop.create_task(self._on_connected(self))

    def data_received(self, data: bytes) -> None:
        """Offer bytes to the fast path when nothing is queued before them, else queue."""
        # A waiter exists only while the reader task is parked on an empty queue; with
        # writes paused the task must answer (it awaits drain), so no fast path then.
        receive_now = self.receive_now
        if (
            self._waiter is not None
            and receive_now is not None
            and not self.write_paused
            and receive_now(data)
        ):
            return
        self._queued += len(data)
        self._push(data)
        if self._queued > self._limit and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        """The peer closed its side: the reader sees the end after what is queued."""
        self.feed_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone: end the inbox, release drain and close waiters."""
        self.feed_eof()
        self.write_paused = False
        self._wake_drainers()
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        """The transport's buffer is over its high-water mark."""
        self.write_paused = True

    def resume_writing(self) -> None:
        """The transport's buffer drained below its low-water mark."""
        self.write_paused = False
        self._wake_drainers()

    # For the session.

    def hand_on(self, events: list[Any]) -> None:
        """Queue events the fast path parsed but did not handle (an empty list: re-check)."""
        self._push(events)

    def feed_eof(self) -> None:
        """End the inbox: the reader task gets b"" once it has taken what is queued."""
        if not self._eof:
            self._eof = True
            self._wake_reader()

    async def next_item(self) -> Item:
        """The next queued item, waiting for one; b"" once the connection ended."""
        while not self._items:
            if self._eof:
                return b""
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if isinstance(item, bytes):
            self._queued -= len(item)
            if self._reading_paused and self._queued <= self._limit // 2 and self.transport:
                self._reading_paused = False
                self.transport.resume_reading()
        return item

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its low-water mark, or it closed."""
        if not self.write_paused:
            return
        waiter = self._loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The transport's extra info (peername, socket, ssl_object...)."""
        return self.transport.get_extra_info(name, default) if self.transport else default

    def close(self) -> None:
        """Close the transport once its buffer is flushed."""
        if self.transport is not None:
            self.transport.close()

    async def wait_closed(self) -> None:
        """Wait until the connection is lost."""
        await asyncio.shield(self._closed)

    def _push(self, item: Item) -> None:
        self._items.append(item)
        self._wake_reader()

    def _wake_reader(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            # Cleared now, not when the task resumes: bytes arriving before then must
            # queue behind what woke it, not take the fast path ahead of it.
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


async def open_connection(
    host: str, port: int, *, ssl: Any = None, limit: int = DEFAULT_LIMIT
) -> Connection:
    """Connect to host:port (over TLS with an SSLContext) and return the Connection."""
    loop = asyncio.get_running_loop()
    _, connection = await loop.create_connection(
        lambda: Connection(limit=limit), host, port, ssl=ssl
    )
    return connection
