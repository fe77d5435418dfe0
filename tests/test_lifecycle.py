"""The daemon's lifecycle: graceful shutdown on SIGTERM, structured association logs."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import pytest

from minipacs.net.client import ClientAssociation
from minipacs.net.negotiation import UNCOMPRESSED_TRANSFER_SYNTAXES, VERIFICATION
from tests.dicom_tools import echoscu
from tests.servers import MinipacsProcess, free_port, spawn_minipacs, start_minipacs

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


def _catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for the signal (SigCgt of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


@pytest.mark.parametrize("uvloop", ["true", "false"], ids=["uvloop", "asyncio"])
def test_sigterm_during_startup_stops_gracefully(tmp_path: Path, uvloop: str) -> None:
    # Regression: handlers were installed only once listening, so a SIGTERM during
    # start-up (imports, opening the archive) killed the process - or, as PID 1 in a
    # container, was dropped by the kernel and the server kept running.
    process, log_path, _ = spawn_minipacs(
        tmp_path, free_port(), {"MINIPACS_SERVER_USE_UVLOOP": uvloop}
    )
    try:
        deadline = time.monotonic() + 20
        while not _catches(process.pid, signal.SIGTERM):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.002)
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    events = [json.loads(line)["event"] for line in log_path.read_text().splitlines()]
    # Caught as soon as the process could catch anything: long before the port opened.
    assert "server.listening" not in events
    assert "server.signal" in events and events[-1] == "server.stopped"


@pytest.mark.parametrize(
    ("second", "uvloop"),
    [(signal.SIGTERM, "true"), (signal.SIGINT, "true"), (signal.SIGINT, "false")],
    ids=["SIGTERM-uvloop", "SIGINT-uvloop", "SIGINT-asyncio"],
)
def test_second_signal_during_grace_aborts_at_once(
    tmp_path: Path, second: signal.Signals, uvloop: str
) -> None:
    # Regression: the handlers were removed before the grace period, so a second signal
    # killed the process (SIGTERM: -15) or raised KeyboardInterrupt in the loop (130),
    # with the index writer not closed and `server.stopped` never logged.
    server = start_minipacs(
        tmp_path,
        {"MINIPACS_SERVER_SHUTDOWN_GRACE": "60", "MINIPACS_SERVER_USE_UVLOOP": uvloop},
    )

    async def run() -> tuple[str, float]:
        association = await ClientAssociation.connect(
            "127.0.0.1", server.port, calling_ae="STAYS", called_ae="MINIPACS", contexts=CONTEXTS
        )
        server.process.send_signal(signal.SIGTERM)
        while '"server.draining"' not in server.log_text():
            await asyncio.sleep(0.02)
        started = time.monotonic()
        server.process.send_signal(second)
        await association.session.ended.wait()
        return association.session.outcome, time.monotonic() - started

    outcome, took = asyncio.run(asyncio.wait_for(run(), 30))
    assert "aborted" in outcome
    assert took < 10, "the second signal did not cut the 60 s grace period short"
    assert server.process.wait(15) == 0
    events = _events(server)
    aborting = [e for e in events if e["event"] == "server.aborting"]
    assert aborting and aborting[0]["reason"] == "hurried"
    assert events[-1]["event"] == "server.stopped"


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
