"""Hostile and broken peers: each gets a clear answer, and the next client is served."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom.pdu_primitives import A_ASSOCIATE

from minipacs.net import negotiation as neg
from minipacs.net import pdu
from minipacs.net.commands import C_STORE_RQ, DATASET_PRESENT, PRIORITY_MEDIUM, encode_command
from tests.dicom_tools import echoscu
from tests.servers import MinipacsProcess, start_minipacs


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MinipacsProcess]:
    """A server with short timers so that silent peers are dropped quickly."""
    process = start_minipacs(
        tmp_path_factory.mktemp("strict"),
        {
            "MINIPACS_SERVER_ARTIM_TIMEOUT": "1",
            "MINIPACS_SERVER_IDLE_TIMEOUT": "2",
            "MINIPACS_SERVER_SPOOL_THRESHOLD": "65536",
        },
    )
    yield process
    process.stop()


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(10)
    return sock


def _read_pdu(sock: socket.socket) -> bytes:
    """Read one PDU, or b'' if the server closed the connection."""
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            return header
        header += chunk
    length = int.from_bytes(header[2:6], "big")
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            break
        body += chunk
    return header + body


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _associate_rq(contexts: list[tuple[str, tuple[str, ...]]], called: str = "MINIPACS") -> bytes:
    request = A_ASSOCIATE()
    request.application_context_name = neg.APPLICATION_CONTEXT_NAME
    request.calling_ae_title = "RAWSCU"
    request.called_ae_title = called
    request.presentation_context_definition_list = neg.build_requested_contexts(contexts)
    request.user_information = neg.user_information_request(16384, {})
    return pdu.encode_associate_rq(request)


ECHO = [(neg.VERIFICATION, (neg.UNCOMPRESSED_TRANSFER_SYNTAXES[1],))]


def _served_after(server: MinipacsProcess) -> None:
    assert server.process.poll() is None, "server died"
    assert echoscu(server.port) == 0, "next client was not served"


def test_garbage_bytes_get_abort(strict_server: MinipacsProcess) -> None:
    with _connect(strict_server.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = _read_pdu(sock)
        assert reply[:1] == b"\x07", "expected an A-ABORT PDU"
    _served_after(strict_server)


def test_unknown_pdu_type_gets_abort(strict_server: MinipacsProcess) -> None:
    with _connect(strict_server.port) as sock:
        sock.sendall(b"\x09\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        # PS3.8 Table 9-10: Evt19 in Sta2 is AA-1, an A-ABORT.
        assert _read_pdu(sock)[:1] == b"\x07"
    _served_after(strict_server)


def test_pdu_announcing_2gb_is_aborted_without_reading_it(strict_server: MinipacsProcess) -> None:
    with _connect(strict_server.port) as sock:
        sock.sendall(b"\x01\x00\x7f\xff\xff\xff" + b"\x00" * 1000)
        assert _read_pdu(sock)[:1] == b"\x07"
    with _connect(strict_server.port) as sock:
        sock.sendall(_associate_rq(ECHO))
        assert _read_pdu(sock)[:1] == b"\x02"
        sock.sendall(b"\x04\x00\x7f\xff\xff\xff" + b"\x00" * 1000)
        assert _read_pdu(sock)[:1] == b"\x07"
    _served_after(strict_server)


def test_truncated_pdu_then_close(strict_server: MinipacsProcess) -> None:
    with _connect(strict_server.port) as sock:
        sock.sendall(_associate_rq(ECHO)[:40])
    _served_after(strict_server)


def test_truncated_pdu_then_silence_is_dropped_by_artim(strict_server: MinipacsProcess) -> None:
    with _connect(strict_server.port) as sock:
        sock.sendall(_associate_rq(ECHO)[:40])
        _served_after(strict_server)
        started = time.monotonic()
        # PS3.8 9.1.1: no whole A-ASSOCIATE-RQ before ARTIM expires, so the transport closes.
        assert _read_pdu(sock) == b""
        assert time.monotonic() - started < 8
    _served_after(strict_server)


def test_no_acceptable_context_is_rejected(strict_server: MinipacsProcess) -> None:
    with _connect(strict_server.port) as sock:
        sock.sendall(_associate_rq([("1.2.3.4.5.6.7", ("1.2.840.10008.1.2",))]))
        reply = _read_pdu(sock)
        # A-ASSOCIATE-RJ, rejected-permanent, service-user, no reason given.
        assert reply == pdu.encode_reject(1, 1, 1)
    # The retired Patient/Study Only model alone. Read off the wire: pynetdicom reports
    # about one such RJ in 200 as an abort (a race on its side: the RJ is on the wire).
    retired = ("1.2.840.10008.5.1.4.1.2.3.1", ("1.2.840.10008.1.2",))
    with _connect(strict_server.port) as sock:
        sock.sendall(_associate_rq([retired]))
        assert _read_pdu(sock) == pdu.encode_reject(1, 1, 1)
    _served_after(strict_server)


def test_silent_client_is_dropped_by_artim(strict_server: MinipacsProcess) -> None:
    with _connect(strict_server.port) as sock:
        _served_after(strict_server)
        started = time.monotonic()
        assert _closed_by_server(sock)
        assert time.monotonic() - started < 8
    _served_after(strict_server)


def test_idle_association_is_aborted(strict_server: MinipacsProcess) -> None:
    with _connect(strict_server.port) as sock:
        sock.sendall(_associate_rq(ECHO))
        assert _read_pdu(sock)[:1] == b"\x02"
        assert _read_pdu(sock)[:1] == b"\x07"
    _served_after(strict_server)


def test_client_vanishing_mid_message(strict_server: MinipacsProcess) -> None:
    with _connect(strict_server.port) as sock:
        sock.sendall(_associate_rq([(neg.STORAGE_SOP_CLASSES[0], ("1.2.840.10008.1.2",))]))
        assert _read_pdu(sock)[:1] == b"\x02"
        command = pdu.pdata_header(1, True, False, 20) + b"\x00" * 20
        sock.sendall(command + b"\x04\x00\x00\x01\x00\x00")
    _served_after(strict_server)


def test_client_vanishing_mid_dataset_leaves_no_spool_file(
    strict_server: MinipacsProcess,
) -> None:
    ct = "1.2.840.10008.5.1.4.1.1.2"
    spool = strict_server.workdir / "store" / ".spool"
    with _connect(strict_server.port) as sock:
        sock.sendall(_associate_rq([(ct, ("1.2.840.10008.1.2",))]))
        assert _read_pdu(sock)[:1] == b"\x02"
        command = encode_command(
            {
                "CommandField": C_STORE_RQ,
                "MessageID": 1,
                "AffectedSOPClassUID": ct,
                "AffectedSOPInstanceUID": "1.2.3.4.5.6.7.8",
                "Priority": PRIORITY_MEDIUM,
                "CommandDataSetType": DATASET_PRESENT,
            }
        )
        sock.sendall(pdu.pdata_header(1, True, True, len(command)) + command)
        chunk = b"\x00" * 16384
        # Past the 64 KiB spool threshold, the data set in progress is on disk...
        for _ in range(8):
            sock.sendall(pdu.pdata_header(1, False, False, len(chunk)) + chunk)
        deadline = time.monotonic() + 10
        while not list(spool.glob("*")):
            assert time.monotonic() < deadline, "the data set was never spooled"
            time.sleep(0.02)
    # ...and the peer vanished before its last fragment: the spool file must go too.
    deadline = time.monotonic() + 10
    while list(spool.glob("*")):
        assert time.monotonic() < deadline, f"spool file left behind: {list(spool.glob('*'))}"
        time.sleep(0.02)
    _served_after(strict_server)


def test_pdata_on_unaccepted_context_is_aborted(strict_server: MinipacsProcess) -> None:
    with _connect(strict_server.port) as sock:
        sock.sendall(_associate_rq(ECHO))
        assert _read_pdu(sock)[:1] == b"\x02"
        sock.sendall(pdu.pdata_header(7, True, True, 4) + b"\x00" * 4)
        assert _read_pdu(sock)[:1] == b"\x07"
    _served_after(strict_server)


def test_bad_input_is_logged(strict_server: MinipacsProcess, tmp_path: Path) -> None:
    with _connect(strict_server.port) as sock:
        sock.sendall(b"\xff" * 10)
        _read_pdu(sock)
    time.sleep(0.2)
    assert "unrecognised PDU type 0xff" in strict_server.log_text()


def test_junk_right_behind_an_associate_request(strict_server: MinipacsProcess) -> None:
    # Found by tests/test_fuzz.py: a PDU of unknown type in the same read as the RQ aborts
    # the association before the acceptor answers it; answering then raised in the session.
    with _connect(strict_server.port) as sock:
        sock.sendall(_associate_rq(ECHO) + bytes(6))
        reply = _read_pdu(sock)
        assert reply == b"" or reply[0] == 0x07  # closed, or A-ABORT
    _served_after(strict_server)
    assert "Traceback" not in strict_server.log_text()
