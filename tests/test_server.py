"""The acceptor in-process, on asyncio's loop and on uvloop: socket options and limits."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from minipacs.net import pdu
from minipacs.net.client import AssociationRefused, ClientAssociation
from minipacs.net.connection import Connection
from minipacs.net.negotiation import (
    REJECT_LOCAL_LIMIT,
    UNCOMPRESSED_TRANSFER_SYNTAXES,
    VERIFICATION,
)
from minipacs.net.server import Server, ServerConfig
from minipacs.services import build_services

CONTEXTS = [(VERIFICATION, UNCOMPRESSED_TRANSFER_SYNTAXES)]
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def _run(loop: str, main: Callable[[], Awaitable[None]]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(asyncio.wait_for(main(), 20))


async def _server(tmp_path: Path, **config: object) -> Server:
    server = Server(
        ServerConfig(port=0, spool_dir=tmp_path / "spool", **config),  # type: ignore[arg-type]
        build_services(),
    )
    await server.start()
    return server


async def _connect(server: Server, calling: str = "TESTSCU") -> ClientAssociation:
    return await ClientAssociation.connect(
        "127.0.0.1", server.port, calling_ae=calling, called_ae="MINIPACS", contexts=CONTEXTS
    )


def _nodelay(connection: Connection) -> int:
    sock = connection.get_extra_info("socket")
    return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


@pytest.mark.parametrize("loop", LOOPS)
def test_sockets_have_nodelay(loop: str, tmp_path: Path) -> None:
    # Nagle would hold each small PDU back until the previous one is acknowledged.
    async def main() -> None:
        server = await _server(tmp_path)
        association = await _connect(server)
        (session,) = server.sessions
        assert _nodelay(session.connection) == 1
        assert _nodelay(association.session.connection) == 1
        assert await association.echo() == 0
        await association.release()
        await server.shutdown(1)

    _run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_association_limit_counts_open_associations(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        server = await _server(tmp_path, max_associations=2)
        first, second = await _connect(server, "ONE"), await _connect(server, "TWO")
        with pytest.raises(AssociationRefused) as refused:
            await _connect(server, "THREE")
        # PS3.8 Table 9-21: rejected-transient, service-provider (presentation), local limit.
        assert refused.value.reject == REJECT_LOCAL_LIMIT
        await first.release()
        while len(server.sessions) > 1:  # the server side ends just after the client's
            await asyncio.sleep(0.01)
        third = await _connect(server, "THREE")
        assert await third.echo() == 0 and await second.echo() == 0
        await second.release()
        await third.release()
        await server.shutdown(1)
        assert server.rejected == {"association limit": 1}

    _run(loop, main)


def test_repeated_proposal_is_decoded_and_answered_from_cache(tmp_path: Path) -> None:
    # A modality sends the same A-ASSOCIATE-RQ bytes every time: decoding (~250 us per
    # context in pynetdicom), negotiation and AC encoding must happen once, not per set-up.
    async def main() -> None:
        server = await _server(tmp_path)
        before = pdu._decode_associate_rq_cached.cache_info()
        for _ in range(3):
            association = await _connect(server)
            await association.release()
        after = pdu._decode_associate_rq_cached.cache_info()
        assert after.hits - before.hits >= 2
        assert after.misses - before.misses <= 1
        assert len(server._ac_cache) == 1
        await server.shutdown(1)

    _run("uvloop", main)
