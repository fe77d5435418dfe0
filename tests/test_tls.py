"""DICOM TLS (PS3.15 B.10): DCMTK, pynetdicom and our requestor on the TLS port; refusals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as STUDY_ROOT_MOVE

from minipacs.app import tls_client_context
from minipacs.config import load_settings
from minipacs.net import negotiation as neg
from minipacs.net.client import AssociationRefused, ClientAssociation
from minipacs.net.tls import BCP195_CIPHERS, client_context
from tests import find_data
from tests.certs import Certificates, make_certificates
from tests.dicom_tools import dcmtk, echoscu
from tests.qr_client import identifier as query
from tests.servers import MinipacsProcess, free_port, running_minipacs
from tests.test_bad_input import ECHO, _associate_rq
from tests.test_cli import run_minipacs
from tests.test_find import series_instances
from tests.test_limits import Flood, wait_for_log

TIMEOUT = 20


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A CA with a server and a client certificate, and a stranger's from another CA."""
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_server(
    tmp_path_factory: pytest.TempPathFactory, certs: Certificates
) -> Iterator[MinipacsProcess]:
    """minipacs with its TLS listener requiring client certificates from the test CA."""
    with running_minipacs(
        tmp_path_factory.mktemp("tls"),
        {
            "MINIPACS_SERVER_ARTIM_TIMEOUT": "2",
            "MINIPACS_SERVER_MAX_PENDING_CONNECTIONS": "50",
            "MINIPACS_TLS_PORT": str(free_port()),
            "MINIPACS_TLS_CERTIFICATE": str(certs.server_cert),
            "MINIPACS_TLS_PRIVATE_KEY": str(certs.server_key),
            "MINIPACS_TLS_CA_FILE": str(certs.ca),
            "MINIPACS_TLS_REQUIRE_CLIENT_CERT": "true",
        },
    ) as process:
        yield process


def _tls_port(server: MinipacsProcess) -> int:
    # start_minipacs waits for the plain port; the TLS one is bound just before it logs.
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for line in server.log_text().splitlines():
            event = json.loads(line) if line.startswith("{") else {}
            if event.get("event") == "server.listening":
                return int(event["tls_port"])
        time.sleep(0.05)
    raise TimeoutError("no server.listening event with a tls_port")


async def _echo(port: int, context: ssl.SSLContext) -> tuple[int, str]:
    async with asyncio.timeout(TIMEOUT):
        assoc = await ClientAssociation.connect(
            "127.0.0.1",
            port,
            calling_ae="TLSSCU",
            called_ae="MINIPACS",
            contexts=[(neg.VERIFICATION, neg.UNCOMPRESSED_TRANSFER_SYNTAXES)],
            ssl_context=context,
            connect_timeout=TIMEOUT,
        )
        async with assoc:
            version = assoc.session.connection.get_extra_info("ssl_object").version()
            return await assoc.echo(), version


def _tls_echoscu(port: int, *tls: str) -> int:
    result = dcmtk(
        "echoscu", "-to", "10", "-ta", "10", "-td", "10", "-aet", "ECHOSCU",
        "-aec", "MINIPACS", *tls, "127.0.0.1", str(port),
    )  # fmt: skip
    return result.returncode


def test_echoscu_over_tls(tls_server: MinipacsProcess, certs: Certificates) -> None:
    port = _tls_port(tls_server)
    key, cert = str(certs.client_key), str(certs.client_cert)
    # DCMTK's default profile is the Non-Downgrading BCP 195 one (PS3.15 B.10).
    assert _tls_echoscu(port, "+tls", key, cert, "+cf", str(certs.ca)) == 0
    # Without a client certificate, the handshake fails: client certificates are required.
    assert _tls_echoscu(port, "+tla", "+cf", str(certs.ca)) != 0
    assert echoscu(tls_server.port) == 0, "the plain listener serves beside the TLS one"


def test_our_client_with_the_context_from_config(
    tls_server: MinipacsProcess, certs: Certificates, tmp_path: Path
) -> None:
    config = tmp_path / "client.toml"
    config.write_text(
        f'[tls]\nca_file = "{certs.ca}"\ncertificate = "{certs.client_cert}"\n'
        f'private_key = "{certs.client_key}"\n'
    )
    context = tls_client_context(load_settings(config, environ={}))
    status, version = asyncio.run(_echo(_tls_port(tls_server), context))
    assert status == 0
    assert version in ("TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize(
    "suite", [*BCP195_CIPHERS.split(":")[:4], "AES128-SHA", "AES256-GCM-SHA384"]
)
def test_tls_1_2_suites(tls_server: MinipacsProcess, certs: Certificates, suite: str) -> None:
    # PS3.15 B.10: the four BCP 195 suites all work; none without forward secrecy does.
    context = client_context(str(certs.ca), str(certs.client_cert), str(certs.client_key))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(suite)
    if suite in BCP195_CIPHERS.split(":"):
        assert asyncio.run(_echo(_tls_port(tls_server), context)) == (0, "TLSv1.2")
    else:
        with pytest.raises(AssociationRefused):
            asyncio.run(_echo(_tls_port(tls_server), context))


def test_pynetdicom_over_tls(tls_server: MinipacsProcess, certs: Certificates) -> None:
    context = client_context(str(certs.ca), str(certs.client_cert), str(certs.client_key))
    ae = AE(ae_title="PYNETDICOM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.add_requested_context(neg.VERIFICATION)
    assoc = ae.associate(
        "127.0.0.1", _tls_port(tls_server), ae_title="MINIPACS", tls_args=(context, "127.0.0.1")
    )
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()


@pytest.mark.parametrize("who", ["no certificate", "another CA", "TLS 1.1"])
def test_refused_clients(tls_server: MinipacsProcess, certs: Certificates, who: str) -> None:
    if who == "no certificate":
        context = client_context(str(certs.ca))
    elif who == "another CA":
        context = client_context(str(certs.ca), str(certs.stranger_cert), str(certs.stranger_key))
    else:
        context = client_context(str(certs.ca), str(certs.client_cert), str(certs.client_key))
        with warnings.catch_warnings():
            # Deprecated versions are the point here: the server must refuse them.
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(AssociationRefused):
        asyncio.run(_echo(_tls_port(tls_server), context))
    assert _tls_echoscu(
        _tls_port(tls_server), "+tls", str(certs.client_key), str(certs.client_cert),
        "+cf", str(certs.ca),
    ) == 0  # fmt: skip


def test_server_certificate_checked_by_the_client(
    tls_server: MinipacsProcess, certs: Certificates
) -> None:
    # A requestor that trusts another CA does not talk to us (PS3.15 B.10: peer auth).
    context = client_context(
        str(certs.stranger_cert), str(certs.client_cert), str(certs.client_key)
    )
    with pytest.raises(AssociationRefused, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(_echo(_tls_port(tls_server), context))


def test_plain_tcp_on_the_tls_port_fails_cleanly(
    tls_server: MinipacsProcess, certs: Certificates
) -> None:
    port = _tls_port(tls_server)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.settimeout(TIMEOUT)
        sock.sendall(_associate_rq(ECHO))
        started = time.monotonic()
        try:
            reply = sock.recv(4096)
        except ConnectionResetError:
            reply = b""
        # No A-ASSOCIATE-AC in clear text: a TLS alert at most, then the connection closes.
        assert not reply.startswith(b"\x02")
        assert time.monotonic() - started < 10
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        # Connected, then silent: the handshake timeout (ARTIM, 2 s here) closes it.
        sock.settimeout(TIMEOUT)
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(4096) == b""
        assert time.monotonic() - started < 10
    context = client_context(str(certs.ca), str(certs.client_cert), str(certs.client_key))
    assert asyncio.run(_echo(port, context))[0] == 0
    assert echoscu(tls_server.port) == 0
    assert tls_server.process.poll() is None


def test_handshake_flood(tls_server: MinipacsProcess, certs: Certificates) -> None:
    # 300 connections that never send a ClientHello, against a cap of 50 handshakes.
    port = _tls_port(tls_server)
    flood = Flood(port, 300)
    flood.start()
    try:
        assert flood.ready.wait(30), "could not open the flood"
        # Each of the 250 past the cap pushes out the oldest handshake, and is logged.
        wait_for_log(tls_server, "too many handshakes at once", 250)
        context = client_context(str(certs.ca), str(certs.client_cert), str(certs.client_key))
        for _ in range(3):
            assert asyncio.run(_echo(port, context))[0] == 0
        assert echoscu(tls_server.port) == 0
    finally:
        flood.stop.set()
        flood.join(30)
    assert flood.closed_by_server > 0


def test_check_loads_the_tls_files(certs: Certificates, tmp_path: Path) -> None:
    env = {
        "MINIPACS_STORAGE_MIN_FREE_BYTES": "0",
        "MINIPACS_TLS_PORT": "2762",
        "MINIPACS_TLS_CERTIFICATE": str(certs.server_cert),
        "MINIPACS_TLS_PRIVATE_KEY": str(certs.server_key),
    }
    result = run_minipacs(tmp_path, "check", env=env)
    assert result.returncode == 0, result.stdout
    assert "ok    tls: " in result.stdout
    # A key that is not the certificate's.
    env["MINIPACS_TLS_PRIVATE_KEY"] = str(certs.client_key)
    result = run_minipacs(tmp_path, "check", env=env)
    assert result.returncode == 1
    assert "FAIL  tls: " in result.stdout


def test_c_move_to_a_tls_destination(
    tls_server: MinipacsProcess, certs: Certificates, tmp_path: Path
) -> None:
    # The destination is the TLS listener above (client certificates required); the
    # source reaches it with the [tls] client context: test CA and client certificate.
    config = tmp_path / "minipacs.toml"
    config.write_text(
        "[tls]\n"
        f'ca_file = "{certs.ca}"\n'
        f'certificate = "{certs.client_cert}"\n'
        f'private_key = "{certs.client_key}"\n'
        "[destinations]\n"
        f'MINIPACS = {{ host = "127.0.0.1", port = {_tls_port(tls_server)}, tls = true }}\n'
    )
    workdir = tmp_path / "source"
    workdir.mkdir()
    env = {"MINIPACS_CONFIG": str(config), "MINIPACS_STORAGE_MIN_FREE_BYTES": "0"}
    (instance,) = [ds for ds in find_data.archive_datasets() if "PBIG" not in ds.PatientID][:1]
    with running_minipacs(workdir, env) as source:
        assert asyncio.run(find_data.store_all(source.port, [instance], timeout=TIMEOUT)) == [0]
        ae = AE(ae_title="MOVESCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
        ae.add_requested_context(STUDY_ROOT_MOVE)
        assoc = ae.associate("127.0.0.1", source.port, ae_title="MINIPACS")
        assert assoc.is_established
        identifier = query(
            "IMAGE",
            StudyInstanceUID=str(instance.StudyInstanceUID),
            SeriesInstanceUID=str(instance.SeriesInstanceUID),
            SOPInstanceUID=str(instance.SOPInstanceUID),
        )
        responses = list(assoc.send_c_move(identifier, "MINIPACS", STUDY_ROOT_MOVE))
        assoc.release()
    final = responses[-1][0]
    assert final.Status == 0 and final.NumberOfCompletedSuboperations == 1
    assert series_instances(tls_server.port, instance) == {str(instance.SOPInstanceUID)}
