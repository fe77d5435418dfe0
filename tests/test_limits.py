"""Limits under attack: half-open floods, slow-loris peers, association rates, oversized
data sets. Each attack runs while a normal client echoes, stores and finds."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping

import pytest

from minipacs.net import pdu
from minipacs.net.commands import C_STORE_RQ, DATASET_PRESENT, PRIORITY_MEDIUM, encode_command
from tests import peers
from tests.servers import MinipacsProcess, running_minipacs
from tests.test_bad_input import _associate_rq, _connect, _read_pdu

ARTIM = 3.0
PENDING_CAP = 100
MAX_DATASET = 65536


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MinipacsProcess]:
    """minipacs with a short ARTIM, a small pending-connection cap and data set cap."""
    with running_minipacs(
        tmp_path_factory.mktemp("limits"),
        {
            "MINIPACS_SERVER_ARTIM_TIMEOUT": str(ARTIM),
            "MINIPACS_SERVER_MAX_PENDING_CONNECTIONS": str(PENDING_CAP),
            "MINIPACS_SERVER_MAX_DATASET_SIZE": str(MAX_DATASET),
            "MINIPACS_STORAGE_MIN_FREE_BYTES": "0",
            "MINIPACS_STORAGE_FSYNC": "false",
        },
    ) as process:
        yield process


def wait_for_log(server: MinipacsProcess, text: str, times: int = 1) -> None:
    """Wait (at most 10 s) until the server's log holds text at least `times` times."""
    deadline = time.monotonic() + 10
    while server.log_text().count(text) < times:
        assert time.monotonic() < deadline, f"{text!r} logged fewer than {times} times"
        time.sleep(0.05)


class Flood(threading.Thread):
    """Keeps `count` connections open that never send a byte, reopening closed ones."""

    def __init__(self, port: int, count: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.count = count
        self.closed_by_server = 0
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        sockets = []
        try:
            while not self.stop.is_set():
                while len(sockets) < self.count:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                    sock.setblocking(False)
                    sockets.append(sock)
                self.ready.set()
                time.sleep(0.05)
                for sock in list(sockets):
                    with contextlib.suppress(BlockingIOError):
                        try:
                            closed = sock.recv(1) == b""
                        except ConnectionResetError:
                            closed = True
                        if closed:
                            self.closed_by_server += 1
                            sockets.remove(sock)
                            sock.close()
        finally:
            for sock in sockets:
                sock.close()


def test_flood_of_300_idle_connections(limited: MinipacsProcess) -> None:
    flood = Flood(limited.port, 300)
    flood.start()
    try:
        assert flood.ready.wait(30), "could not open the flood"
        # Past the cap the oldest silent connections are closed for the new ones.
        wait_for_log(limited, '"reason": "pending connection limit"', 300 - PENDING_CAP)
        started = time.monotonic()
        for _ in range(3):
            peers.served(limited.port, "NORMAL")
        assert time.monotonic() - started < 15
    finally:
        flood.stop.set()
        flood.join(30)
    assert flood.closed_by_server > 0
    peers.served(limited.port, "NORMAL")


def test_slow_loris_is_closed_by_artim(limited: MinipacsProcess) -> None:
    request = _associate_rq([(peers.CT_IMAGE, ("1.2.840.10008.1.2",))])
    ended: list[float] = []

    def trickle() -> None:
        with _connect(limited.port) as sock:
            started = time.monotonic()
            for byte in request:
                try:
                    sock.sendall(bytes([byte]))
                    sock.settimeout(1.0)
                    if sock.recv(1) == b"":
                        break
                except TimeoutError:
                    continue
                except OSError:
                    break
            ended.append(time.monotonic() - started)

    lorises = [threading.Thread(target=trickle, daemon=True) for _ in range(5)]
    for loris in lorises:
        loris.start()
    time.sleep(0.5)
    peers.served(limited.port, "NORMAL")
    for loris in lorises:
        loris.join(ARTIM + 10)
    # PS3.8 9.1.5: a byte a second does not restart ARTIM; the RQ never completes.
    assert len(ended) == 5
    assert all(seconds < ARTIM + 3 for seconds in ended), ended
    peers.served(limited.port, "NORMAL")


def test_oversized_dataset_is_refused_0xa700(limited: MinipacsProcess) -> None:
    big = peers.ct_dataset("2")
    big.PixelData = b"\0" * (2 * MAX_DATASET - 40_000)
    assoc = peers.associate(limited.port)
    assert assoc.is_established
    result = peers.statuses(assoc, big)
    assert result["store"].Status == 0xA700
    assert result["store"].ErrorComment == f"data set over {MAX_DATASET} bytes, not accepted"
    assert (result["echo"].Status, result["find"].Status) == (0, 0), "association went on"
    assert not list((limited.workdir / "store").rglob("*77.2*")), "nothing was stored"


def test_endless_dataset_is_aborted(limited: MinipacsProcess) -> None:
    with _connect(limited.port) as sock:
        sock.sendall(_associate_rq([(peers.CT_IMAGE, ("1.2.840.10008.1.2",))]))
        assert _read_pdu(sock)[:1] == b"\x02"
        command = encode_command(
            {
                "CommandField": C_STORE_RQ,
                "MessageID": 1,
                "AffectedSOPClassUID": peers.CT_IMAGE,
                "AffectedSOPInstanceUID": "1.2.826.0.1.3680043.10.1234.77.3",
                "Priority": PRIORITY_MEDIUM,
                "CommandDataSetType": DATASET_PRESENT,
            }
        )
        sock.sendall(pdu.pdata_header(1, True, True, len(command)) + command)
        chunk = b"\0" * 16384
        with contextlib.suppress(OSError):
            # Past twice the cap (and the socket buffers hold all of it).
            for _ in range(4 * MAX_DATASET // len(chunk)):
                sock.sendall(pdu.pdata_header(1, False, False, len(chunk)) + chunk)
        # A-ABORT from the service provider; the data set never ended.
        assert _read_pdu(sock)[:1] == b"\x07"
    wait_for_log(limited, "over twice the cap")
    peers.served(limited.port)


def test_association_rate_per_address(
    minipacs_with: Callable[[Mapping[str, str]], MinipacsProcess],
) -> None:
    rated = minipacs_with({"MINIPACS_SERVER_ASSOCIATIONS_PER_MINUTE": "5"})
    assert [peers.rejection(rated.port) for _ in range(5)] == [None] * 5
    # Transient, service-provider (presentation), local limit exceeded: try again later.
    assert peers.rejection(rated.port) == (2, 3, 2)
    assert '"reason": "association rate"' in rated.log_text()


def test_slow_loris_after_association(limited: MinipacsProcess) -> None:
    # Associated, then a C-ECHO-RQ a byte a second: one association held, nobody else.
    with _connect(limited.port) as sock:
        sock.sendall(_associate_rq([(peers.CT_IMAGE, ("1.2.840.10008.1.2",))]))
        assert _read_pdu(sock)[:1] == b"\x02"
        trickle = pdu.pdata_header(1, True, True, 200) + b"\0" * 200
        stop = threading.Event()

        def send() -> None:
            for byte in trickle:
                if stop.wait(1.0):
                    return
                sock.sendall(bytes([byte]))

        loris = threading.Thread(target=send, daemon=True)
        loris.start()
        try:
            for _ in range(3):
                peers.served(limited.port, "NORMAL")
                time.sleep(1)
        finally:
            stop.set()
            loris.join(5)
