"""C-ECHO against the running daemon with DCMTK echoscu, pynetdicom and our requestor."""

from __future__ import annotations

import asyncio

from pynetdicom import AE

from minipacs.net.client import AssociationRefused, ClientAssociation
from minipacs.net.negotiation import UNCOMPRESSED_TRANSFER_SYNTAXES, VERIFICATION
from tests.dicom_tools import dcmtk, echoscu
from tests.servers import MinipacsProcess

ECHO_CONTEXTS = [(VERIFICATION, UNCOMPRESSED_TRANSFER_SYNTAXES)]


def test_dcmtk_echoscu(server: MinipacsProcess) -> None:
    result = dcmtk(
        "echoscu", "-v", "--repeat", "5", "-aec", "MINIPACS", "127.0.0.1", str(server.port)
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Received Echo Response (Success)") == 5


def test_pynetdicom_echo(server: MinipacsProcess) -> None:
    ae = AE(ae_title="PYNETDICOM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="MINIPACS")
    assert assoc.is_established
    status = assoc.send_c_echo()
    assert status.Status == 0x0000
    assoc.release()
    assert assoc.is_released


def test_our_requestor_echo_and_max_pdu(server: MinipacsProcess) -> None:
    async def run() -> None:
        async with asyncio.timeout(20):
            association = await ClientAssociation.connect(
                "127.0.0.1",
                server.port,
                calling_ae="TESTSCU",
                called_ae="MINIPACS",
                contexts=ECHO_CONTEXTS,
            )
            assert association.session.association.peer_max_pdu == 1048576
            for _ in range(10):
                assert await association.echo() == 0x0000
            await association.release()
            assert association.session.outcome == "released"

    asyncio.run(run())


def test_wrong_called_ae_is_rejected(server: MinipacsProcess) -> None:
    async def run() -> None:
        try:
            await ClientAssociation.connect(
                "127.0.0.1",
                server.port,
                calling_ae="TESTSCU",
                called_ae="SOMEONE",
                contexts=ECHO_CONTEXTS,
            )
        except AssociationRefused as exc:
            # PS3.8 Table 9-21: rejected-permanent, service-user, called AE not recognized.
            assert exc.reject == (1, 1, 7)
        else:
            raise AssertionError("association with a wrong called AE was accepted")

    asyncio.run(asyncio.wait_for(run(), 20))
    assert echoscu(server.port) == 0


def test_async_operations_window_is_answered(server: MinipacsProcess) -> None:
    ae = AE(ae_title="PYNETDICOM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(VERIFICATION)
    from pynetdicom.pdu_primitives import AsynchronousOperationsWindowNegotiation

    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 5
    window.maximum_number_operations_performed = 5
    assoc = ae.associate("127.0.0.1", server.port, ae_title="MINIPACS", ext_neg=[window])
    assert assoc.is_established
    replies = [
        item
        for item in assoc.acceptor.user_information
        if isinstance(item, AsynchronousOperationsWindowNegotiation)
    ]
    assert [
        (r.maximum_number_operations_invoked, r.maximum_number_operations_performed)
        for r in replies
    ] == [(1, 1)]
    assert assoc.acceptor.implementation_class_uid.startswith("2.25.")
    assoc.release()
