"""The line between the supervisor and one worker process (server.workers > 1).

One Unix socket pair per worker, JSON objects one per line, requests either way. A
request carries an "id" and gets exactly one reply with that id; a notice ("id" absent)
gets none. Worker to supervisor: "rate", "admit" (Gate); notices "release", "started"
(it serves) and "closed" (a handed-over connection ended). Supervisor to worker:
"metrics", "ready"; the notice "stop" (with "hurry": abort what is left). Either side's
end of file means the other is gone.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("minipacs.ops")

# A metrics exposition of many label sets is long; lines are at most this many bytes.
LINE_LIMIT = 16 * 1024 * 1024

Message = dict[str, Any]
Handler = Callable[[Message], Awaitable[Message | None]]


class ChannelClosed(Exception):
    """The other end of the control line is gone."""


class Channel:
    """Requests and notices over one stream socket, answered by a handler on each side."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Message]] = {}
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def over(cls, sock: socket.socket) -> Channel:
        """A channel on a connected Unix stream socket (it is taken over)."""
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=LINE_LIMIT)
        return cls(reader, writer)

    async def request(self, op: str, **fields: Any) -> Message:
        """Send a request and wait for its reply; raise ChannelClosed if the line drops."""
        if self._closed:
            raise ChannelClosed(op)
        number = next(self._ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[number] = future
        try:
            self._send({"op": op, "id": number, **fields})
            return await future
        finally:
            self._waiting.pop(number, None)

    def notify(self, op: str, **fields: Any) -> None:
        """Send a notice (no reply); dropped once the line is closed."""
        if not self._closed:
            self._send({"op": op, **fields})

    def _send(self, message: Message) -> None:
        self._writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    async def run(self, handle: Handler) -> None:
        """Read until the other end closes: replies wake requests, requests go to handle."""
        try:
            while True:
                try:
                    line = await self._reader.readline()
                except (ConnectionError, asyncio.LimitOverrunError, ValueError):
                    break
                if not line:
                    break
                message = json.loads(line)
                if "reply" in message:
                    future = self._waiting.get(message["reply"])
                    if future is not None and not future.done():
                        future.set_result(message)
                    continue
                task = asyncio.create_task(self._answer(handle, message))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            self.close()

    async def _answer(self, handle: Handler, message: Message) -> None:
        try:
            answer = await handle(message)
        except Exception:
            log.exception("control request %s failed", message.get("op"))
            answer = {"error": "failed"}
        number = message.get("id")
        if number is not None and not self._closed:
            self._send({"reply": number, **(answer or {})})

    def close(self) -> None:
        """Close the line; requests still waiting raise ChannelClosed."""
        if self._closed:
            return
        self._closed = True
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ChannelClosed("control line closed"))
        self._writer.close()

    @property
    def closed(self) -> bool:
        """Whether the line is closed."""
        return self._closed
