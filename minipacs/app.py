"""Builds the server from Settings and runs it: start, serve until a signal, drain, stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from minipacs.config import Settings
from minipacs.logs import log_event
from minipacs.net.association import Limits
from minipacs.net.server import Server, ServerConfig
from minipacs.net.session import Timeouts
from minipacs.services import build_services

log = logging.getLogger("minipacs.app")


def server_config(settings: Settings) -> ServerConfig:
    """Translate Settings into the acceptor's configuration."""
    server = settings.server
    return ServerConfig(
        ae_title=server.ae_title,
        host=server.host,
        port=server.port,
        check_called_ae=server.check_called_ae,
        allowed_calling_aes=tuple(server.allowed_calling_aes),
        max_associations=server.max_associations,
        limits=Limits(
            max_pdu_length=server.max_pdu_length,
            max_associate_length=server.max_associate_rq_length,
            spool_threshold=server.spool_threshold,
        ),
        timeouts=Timeouts(artim=server.artim_timeout, idle=server.idle_timeout),
        spool_dir=settings.spool_dir,
    )


async def serve(settings: Settings, started: asyncio.Event | None = None) -> None:
    """Run the server until SIGTERM or SIGINT, then shut down gracefully."""
    server = Server(server_config(settings), build_services())
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if started is not None:
        started.set()
    try:
        await stop.wait()
        log_event(log, "server.signal", active=len(server.sessions))
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
        await server.shutdown(settings.server.shutdown_grace)


def run(settings: Settings) -> int:
    """Run the server to completion on uvloop when installed; return the exit code."""
    if settings.server.use_uvloop:
        try:
            import uvloop
        except ImportError:
            uvloop = None
        if uvloop is not None:
            uvloop.run(serve(settings))
            return 0
    asyncio.run(serve(settings))
    return 0
