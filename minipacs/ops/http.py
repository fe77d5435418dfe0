"""The ops HTTP endpoint on asyncio: /metrics (Prometheus), /healthz and /readyz.

/healthz answers 200 while the event loop runs (it is the loop that answers); /readyz
answers 200 only while the DICOM listener accepts associations and the index answers a
query, else 503 with the reason, so an orchestrator stops sending traffic to a draining
or cut-off node. Requests are tiny GETs; anything else gets 404 or 405.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from minipacs.logs import log_event

log = logging.getLogger("minipacs.ops")

_REQUEST_TIMEOUT: Final = 5.0
_TEXT: Final = "text/plain; charset=utf-8"
_PROMETHEUS: Final = "text/plain; version=0.0.4; charset=utf-8"


class OpsServer:
    """Serves metrics and health checks over HTTP/1.1 (one request per connection)."""

    def __init__(
        self,
        exposition: Callable[[], Awaitable[bytes]],
        ready: Callable[[], Awaitable[str | None]],
    ) -> None:
        """exposition: the Prometheus text, produced off the event loop."""
        self.exposition = exposition
        # Returns None when ready, else why not.
        self.ready = ready
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port; return the bound port."""
        self._server = await asyncio.start_server(self._serve, host, port)
        bound = int(self._server.sockets[0].getsockname()[1])
        log_event(log, "ops.listening", host=host, port=bound)
        return bound

    async def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                request = await reader.readuntil(b"\r\n\r\n")
                status, content_type, body = await self._answer(request)
                head = (
                    f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                )
                writer.write(head.encode() + body)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()

    async def _answer(self, request: bytes) -> tuple[str, str, bytes]:
        method, _, rest = request.decode("latin-1").partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        if method != "GET":
            return "405 Method Not Allowed", _TEXT, b"only GET\n"
        if path == "/metrics":
            return "200 OK", _PROMETHEUS, await self.exposition()
        if path == "/healthz":
            return "200 OK", _TEXT, b"alive\n"
        if path == "/readyz":
            problem = await self.ready()
            if problem is None:
                return "200 OK", _TEXT, b"ready\n"
            return "503 Service Unavailable", _TEXT, f"not ready: {problem}\n".encode()
        return "404 Not Found", _TEXT, b"try /metrics, /healthz or /readyz\n"
