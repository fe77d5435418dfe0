"""The daemon's lifecycle: graceful shutdown on SIGTERM, structured association logs."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

from minipacs.net.client import ClientAssociation
from minipacs.net.negotiation import UNCOMPRESSED_TRANSFER_SYNTAXES, VERIFICATION
from tests.dicom_tools import echoscu
from tests.servers import MinipacsProcess, start_minipacs

CONTEXTS = [(VERIFICATION, UNCOMPRESSED_TRANSFER_SYNTAXES)]


def _events(server: MinipacsProcess) -> list[dict]:
    return [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]


def test_sigterm_lets_open_association_finish_then_exits_0(tmp_path: Path) -> None:
    server = start_minipacs(tmp_path, {"MINIPACS_SERVER_SHUTDOWN_GRACE": "10"})

    async def run() -> None:
        association = await ClientAssociation.connect(
            "127.0.0.1", server.port, calling_ae="LATE", called_ae="MINIPACS", contexts=CONTEXTS
        )
        server.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        # Still served during the grace period; new connections are no longer accepted.
        assert await association.echo() == 0
        await association.release()

    asyncio.run(asyncio.wait_for(run(), 20))
    assert server.process.wait(15) == 0
    events = [e["event"] for e in _events(server)]
    assert "server.draining" in events and "server.stopped" in events


def test_sigterm_aborts_associations_after_grace(tmp_path: Path) -> None:
    server = start_minipacs(tmp_path, {"MINIPACS_SERVER_SHUTDOWN_GRACE": "1"})

    async def run() -> str:
        association = await ClientAssociation.connect(
            "127.0.0.1", server.port, calling_ae="STAYS", called_ae="MINIPACS", contexts=CONTEXTS
        )
        server.process.send_signal(signal.SIGTERM)
        await association.session.ended.wait()
        return association.session.outcome

    started = time.monotonic()
    outcome = asyncio.run(asyncio.wait_for(run(), 20))
    assert "aborted" in outcome
    assert server.process.wait(15) == 0
    assert time.monotonic() - started < 10


def test_one_log_event_per_association_and_operation(server: MinipacsProcess) -> None:
    assert echoscu(server.port, calling="LOGGED") == 0
    time.sleep(0.3)
    events = _events(server)
    accepted = [e for e in events if e["event"] == "association.accepted"]
    ended = [e for e in events if e["event"] == "association.end"]
    operations = [e for e in events if e["event"] == "dimse.operation"]
    assert accepted[-1]["calling_ae"] == "LOGGED"
    assert accepted[-1]["peer"].startswith("127.0.0.1:")
    assert ended[-1]["outcome"] == "released" and "duration_ms" in ended[-1]
    assert operations[-1]["operation"] == "C-ECHO-RQ"
    assert operations[-1]["status"] == "0x0000"
