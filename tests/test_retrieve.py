"""C-MOVE and C-GET end to end: pynetdicom, DCMTK movescu/getscu and storescp as real peers,
on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import io
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet as PATIENT_GET,
)
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelMove as PATIENT_MOVE,
)
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelGet as STUDY_GET,
)
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelMove as STUDY_MOVE,
)

from minipacs import dataset as dicom
from minipacs.index import schema
from minipacs.net.commands import C_GET_RQ, C_MOVE_RQ, C_STORE_RQ
from minipacs.net.operations import SUCCESS, Operation, Service
from minipacs.storage.meta import encode_file_meta
from tests import retrieve_data
from tests.dicom_tools import dcmtk, echoscu
from tests.qr_client import connect, identifier, request_and_cancel
from tests.retrieve_data import BIG_SERIES_SIZE, CT_IMAGE, MR_IMAGE, ROOT, Stored
from tests.servers import MinipacsProcess, free_port, start_minipacs, wait_for_port

TIMEOUT = 30
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


@dataclass
class StoreSCP:
    """A DCMTK storescp the daemon moves to, and the folder it writes into."""

    ae_title: str
    port: int
    folder: Path
    process: subprocess.Popen[bytes]

    def take(self) -> dict[str, tuple[str, bytes]]:
        """What arrived since the last call: SOP Instance UID -> (transfer syntax, data set)."""
        received = {}
        for path in sorted(self.folder.iterdir()):
            meta = pydicom.dcmread(path, stop_before_pixels=True)
            received[str(meta.SOPInstanceUID)] = (
                str(meta.file_meta.TransferSyntaxUID),
                retrieve_data._file_dataset(path),
            )
            path.unlink()
        return received


def _storescp(root: Path, ae_title: str, *options: str) -> StoreSCP:
    folder = root / ae_title
    folder.mkdir()
    port = free_port()
    process = subprocess.Popen(
        ["storescp", "-aet", ae_title, "-od", str(folder), *options, str(port)],
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, process, 10)
    return StoreSCP(ae_title, port, folder, process)


@dataclass
class Site:
    """The daemon under test, its archive and the destinations it may move to."""

    pacs: MinipacsProcess
    instances: list[Stored]
    peers: dict[str, StoreSCP]

    @property
    def port(self) -> int:
        """The daemon's port."""
        return self.pacs.port

    def select(self, **keys: str) -> dict[str, Stored]:
        """The archive's instances whose attributes have these values, by SOP Instance UID."""
        return {
            i.sop_uid: i
            for i in self.instances
            if all(getattr(i, name) == value for name, value in keys.items())
        }


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def site(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Site]:
    """A daemon holding tests/retrieve_data.py's archive, with storescp destinations."""
    if shutil.which("storescp") is None:
        pytest.fail("storescp not found: install DCMTK (scripts/test.sh does it)")
    workdir = tmp_path_factory.mktemp(f"retrieve-{request.param}")
    peers = {
        # storescp accepts only uncompressed transfer syntaxes unless told +xa; +B writes
        # the data set exactly as received.
        "STORESCP": _storescp(workdir, "STORESCP", "--fork", "+B"),
        "ANYTS": _storescp(workdir, "ANYTS", "--fork", "+xa", "+B"),
        "REFUSER": _storescp(workdir, "REFUSER", "--refuse"),
        "GONE": _storescp(workdir, "GONE", "--abort-after"),
    }
    # Listens but never answers: its A-ASSOCIATE-RQ waits in the backlog until we give up.
    silent = socket.create_server(("127.0.0.1", 0))
    destinations = {name: peer.port for name, peer in peers.items()}
    destinations["SILENT"] = silent.getsockname()[1]
    destinations["NOWHERE"] = free_port()
    lines = [
        f'{name} = {{ host = "127.0.0.1", port = {port} }}' for name, port in destinations.items()
    ]
    # TLS to a peer that speaks plain DICOM: the handshake fails, the move must not hang.
    lines.append(
        f'PLAINTLS = {{ host = "127.0.0.1", port = {peers["STORESCP"].port}, tls = true }}'
    )
    config = workdir / "minipacs.toml"
    config.write_text("[destinations]\n" + "\n".join(lines) + "\n")
    env = {
        "MINIPACS_CONFIG": str(config),
        "MINIPACS_STORAGE_MIN_FREE_BYTES": "0",
        "MINIPACS_STORAGE_FSYNC": "false",
        "MINIPACS_RETRIEVE_CONNECT_TIMEOUT": "3",
        "MINIPACS_RETRIEVE_RESPONSE_TIMEOUT": "5",
    }
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres").create_database()
        schema.upgrade(url)
        env["MINIPACS_DATABASE_URL"] = url
    pacs = start_minipacs(workdir, env)
    instances = retrieve_data.archive()
    try:
        assert set(asyncio.run(retrieve_data.store_all(pacs.port, instances))) == {0}
        yield Site(pacs, instances, peers)
    finally:
        pacs.stop()
        silent.close()
        for peer in peers.values():
            peer.process.terminate()
            peer.process.wait(10)


def _ae(title: str) -> AE:
    ae = AE(ae_title=title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    return ae


def pynetdicom_move(
    port: int, ds: Dataset, destination: str, model: str = STUDY_MOVE
) -> tuple[list[Dataset], Dataset, Dataset | None]:
    """One C-MOVE with pynetdicom: the Pending statuses, the final status and identifier."""
    ae = _ae("MOVESCU")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title="MINIPACS")
    assert assoc.is_established
    pending: list[Dataset] = []
    final, final_identifier = Dataset(), None
    try:
        for status, response in assoc.send_c_move(ds, destination, model):
            assert status is not None, "no response before the DIMSE timeout"
            if status.Status == 0xFF00:
                pending.append(status)
            else:
                final, final_identifier = status, response
    finally:
        assoc.release()
    return pending, final, final_identifier


def pynetdicom_get(
    port: int,
    ds: Dataset,
    model: str = STUDY_GET,
    classes: tuple[str, ...] = (CT_IMAGE, MR_IMAGE, SC_IMAGE),
    syntaxes: tuple[list[str], ...] = (UNCOMPRESSED,),
) -> tuple[dict[str, tuple[str, bytes]], Dataset, Dataset | None]:
    """One C-GET with pynetdicom, offering storage of `classes` with the SCP role.

    Each class is offered in one context per item of `syntaxes`.
    """
    received: dict[str, tuple[str, bytes]] = {}

    def on_store(event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        received[uid] = (str(event.context.transfer_syntax), event.request.DataSet.getvalue())
        return 0x0000

    ae = _ae("GETSCU")
    ae.add_requested_context(model)
    for sop_class in classes:
        for offered in syntaxes:
            ae.add_requested_context(sop_class, offered)
    roles = [build_role(sop_class, scp_role=True) for sop_class in classes]
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="MINIPACS",
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    final, final_identifier = Dataset(), None
    try:
        for status, response in assoc.send_c_get(ds, model):
            assert status is not None, "no response before the DIMSE timeout"
            if status.Status != 0xFF00:
                final, final_identifier = status, response
    finally:
        assoc.release()
    return received, final, final_identifier


def assert_counts(final: Dataset, status: int, completed: int, failed: int = 0) -> None:
    """The final response's status and sub-operation counts."""
    assert final.Status == status
    assert final.NumberOfCompletedSuboperations == completed
    assert final.NumberOfFailedSuboperations == failed
    assert final.NumberOfWarningSuboperations == 0


def assert_arrived(received: dict[str, tuple[str, bytes]], expected: dict[str, Stored]) -> None:
    """Every expected instance arrived, once, with the very bytes it was stored with."""
    assert set(received) == set(expected)
    for uid, (syntax, data) in received.items():
        assert syntax == expected[uid].transfer_syntax, uid
        assert data == expected[uid].data, uid


STUDY_1 = f"{ROOT}.1"
SERIES_1_2 = f"{ROOT}.1.2"
LEVELS = ["patient", "study", "series", "image"]


def _level_case(site: Site, level: str) -> tuple[Dataset, dict[str, Stored], bool]:
    """A retrieve at one level: identifier, expected instances, whether it is Patient Root."""
    if level == "patient":
        return identifier("PATIENT", PatientID="R1"), site.select(patient_id="R1"), True
    if level == "study":
        ds = identifier("STUDY", StudyInstanceUID=STUDY_1)
        return ds, site.select(study_uid=STUDY_1), False
    if level == "series":
        ds = identifier("SERIES", StudyInstanceUID=STUDY_1, SeriesInstanceUID=SERIES_1_2)
        return ds, site.select(series_uid=SERIES_1_2), False
    # A list of UIDs at the retrieve level (PS3.4 C.4.2.2.1); the series key names one
    # series, so the second UID (of another series) does not match.
    uids = [f"{ROOT}.1.1.1", f"{ROOT}.1.1.3", f"{ROOT}.1.2.2"]
    ds = identifier(
        "IMAGE", StudyInstanceUID=STUDY_1, SeriesInstanceUID=f"{ROOT}.1.1", SOPInstanceUID=uids
    )
    expected = {uid: i for uid, i in site.select(series_uid=f"{ROOT}.1.1").items() if uid in uids}
    return ds, expected, False


@pytest.mark.parametrize("level", LEVELS)
def test_pynetdicom_move_at_each_level(site: Site, level: str) -> None:
    ds, expected, patient_root = _level_case(site, level)
    model = PATIENT_MOVE if patient_root else STUDY_MOVE
    pending, final, _ = pynetdicom_move(site.port, ds, "STORESCP", model)
    assert_counts(final, 0x0000, len(expected))
    # Paced (retrieve.pending_interval): the first sub-operation is reported, then at most
    # one a pending_interval, each with counts that add up and only move forward.
    remaining = [p.NumberOfRemainingSuboperations for p in pending]
    assert remaining[0] == len(expected) - 1
    assert remaining == sorted(set(remaining), reverse=True)
    for p in pending:
        assert p.NumberOfCompletedSuboperations + p.NumberOfRemainingSuboperations == len(expected)
    assert_arrived(site.peers["STORESCP"].take(), expected)


@pytest.mark.parametrize("level", LEVELS)
def test_pynetdicom_get_at_each_level(site: Site, level: str) -> None:
    ds, expected, patient_root = _level_case(site, level)
    received, final, _ = pynetdicom_get(site.port, ds, PATIENT_GET if patient_root else STUDY_GET)
    assert_counts(final, 0x0000, len(expected))
    assert_arrived(received, expected)


def test_patient_root_levels_below_patient(site: Site) -> None:
    ds = identifier(
        "SERIES", PatientID="R1", StudyInstanceUID=STUDY_1, SeriesInstanceUID=SERIES_1_2
    )
    _, final, _ = pynetdicom_move(site.port, ds, "STORESCP", PATIENT_MOVE)
    assert_counts(final, 0x0000, 2)
    assert_arrived(site.peers["STORESCP"].take(), site.select(series_uid=SERIES_1_2))
    # Another patient's ID does not reach the study.
    ds = identifier("STUDY", PatientID="R2", StudyInstanceUID=STUDY_1)
    _, final, _ = pynetdicom_move(site.port, ds, "STORESCP", PATIENT_MOVE)
    assert_counts(final, 0x0000, 0)


def _dcmtk_keys(ds: Dataset) -> list[str]:
    keys = []
    for element in ds:
        value = "\\".join(element.value) if element.VM > 1 else str(element.value)
        keys += ["-k", f"{element.keyword}={value}"]
    return keys


@pytest.mark.parametrize("level", LEVELS)
def test_dcmtk_movescu_at_each_level(site: Site, level: str) -> None:
    ds, expected, patient_root = _level_case(site, level)
    result = dcmtk(
        "movescu",
        "-to", "10", "-ta", "10", "-td", "30",
        "-P" if patient_root else "-S",
        "-aet", "MOVESCU", "-aec", "MINIPACS", "-aem", "STORESCP",
        *_dcmtk_keys(ds),
        "127.0.0.1", str(site.port),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Final Move Response (Success)" in result.stderr or result.stderr == ""
    assert_arrived(site.peers["STORESCP"].take(), expected)


@pytest.mark.parametrize("level", LEVELS)
def test_dcmtk_getscu_at_each_level(site: Site, level: str, tmp_path: Path) -> None:
    ds, expected, patient_root = _level_case(site, level)
    result = dcmtk(
        "getscu",
        "-to", "10", "-ta", "10", "-td", "30",
        "-P" if patient_root else "-S",
        "-aet", "GETSCU", "-aec", "MINIPACS", "-od", str(tmp_path),
        *_dcmtk_keys(ds),
        "127.0.0.1", str(site.port),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    folder = StoreSCP("GETSCU", 0, tmp_path, None)  # type: ignore[arg-type]
    assert_arrived(folder.take(), expected)


def test_unknown_destination_is_a801_at_once(site: Site) -> None:
    started = time.monotonic()
    pending, final, _ = pynetdicom_move(
        site.port, identifier("STUDY", StudyInstanceUID=STUDY_1), "NOSUCHAE"
    )
    assert pending == [] and final.Status == 0xA801
    assert time.monotonic() - started < 5
    assert site.peers["STORESCP"].take() == {}


def test_no_matches_is_success_without_suboperations(site: Site) -> None:
    ds = identifier("STUDY", StudyInstanceUID=f"{ROOT}.999")
    pending, final, _ = pynetdicom_move(site.port, ds, "STORESCP")
    assert pending == []
    assert_counts(final, 0x0000, 0)
    received, final, _ = pynetdicom_get(site.port, ds)
    assert received == {}
    assert_counts(final, 0x0000, 0)
    # An unreachable destination is not even contacted when nothing matches.
    _, final, _ = pynetdicom_move(site.port, ds, "NOWHERE")
    assert_counts(final, 0x0000, 0)


@pytest.mark.parametrize("destination", ["REFUSER", "NOWHERE", "SILENT", "GONE", "PLAINTLS"])
def test_failing_destination_fails_every_suboperation(site: Site, destination: str) -> None:
    expected = site.select(study_uid=STUDY_1)
    started = time.monotonic()
    _, final, failed = pynetdicom_move(
        site.port, identifier("STUDY", StudyInstanceUID=STUDY_1), destination
    )
    # Connect and response timeouts are 3 s and 5 s in this daemon: no hang.
    assert time.monotonic() - started < 15
    assert_counts(final, 0xA702, 0, len(expected))
    assert failed is not None
    assert set(failed.FailedSOPInstanceUIDList) == set(expected)
    assert echoscu(site.port) == 0


def _decode(data: bytes, syntax: str) -> Dataset:
    """Data set bytes as pydicom reads them from a file."""
    return pydicom.dcmread(io.BytesIO(encode_file_meta(SC_IMAGE, "1.2.3", syntax, "") + data))


def test_compressed_instance_to_uncompressed_only_destination(site: Site) -> None:
    for name in retrieve_data.COMPRESSED_FILES:
        original = retrieve_data.compressed(name)
        ds = identifier("STUDY", StudyInstanceUID=original.StudyInstanceUID)
        _, final, _ = pynetdicom_move(site.port, ds, "STORESCP")
        assert_counts(final, 0x0000, 1)
        received = site.peers["STORESCP"].take()
        assert list(received) == [original.SOPInstanceUID]
        syntax, data = received[original.SOPInstanceUID]
        assert syntax in UNCOMPRESSED
        arrived = _decode(data, syntax)
        assert arrived.SOPInstanceUID == original.SOPInstanceUID
        # pydicom's own decode of the stored file: the same pixels.
        assert np.array_equal(arrived.pixel_array, original.pixel_array), name


def test_compressed_instance_goes_as_stored_when_accepted(site: Site) -> None:
    original = retrieve_data.compressed("JPEG2000.dcm")
    ds = identifier("STUDY", StudyInstanceUID=original.StudyInstanceUID)
    _, final, _ = pynetdicom_move(site.port, ds, "ANYTS")
    assert_counts(final, 0x0000, 1)
    expected = site.select(sop_uid=original.SOPInstanceUID)
    assert_arrived(site.peers["ANYTS"].take(), expected)
    syntax = str(original.file_meta.TransferSyntaxUID)
    received, final, _ = pynetdicom_get(site.port, ds, syntaxes=([syntax], UNCOMPRESSED))
    assert_counts(final, 0x0000, 1)
    assert_arrived(received, expected)


def test_get_fails_instances_of_classes_without_a_context(site: Site) -> None:
    ds = identifier("STUDY", StudyInstanceUID=STUDY_1)
    received, final, failed = pynetdicom_get(site.port, ds, classes=(CT_IMAGE,))
    mr = {uid for uid, i in site.select(study_uid=STUDY_1).items() if i.sop_class == MR_IMAGE}
    assert_counts(final, 0xB000, 3, 2)
    assert failed is not None and set(failed.FailedSOPInstanceUIDList) == mr
    assert set(received) == set(site.select(study_uid=STUDY_1)) - mr


@pytest.mark.parametrize(
    "ds",
    [
        identifier("STUDY"),
        identifier("STUDY", StudyInstanceUID=""),
        identifier("STUDY", StudyInstanceUID=f"{ROOT}.*"),
        identifier("SERIES", SeriesInstanceUID=SERIES_1_2),
        identifier("NOSUCH", StudyInstanceUID=STUDY_1),
    ],
)
def test_bad_identifiers_fail_with_a900(site: Site, ds: Dataset) -> None:
    _, final, _ = pynetdicom_move(site.port, ds, "STORESCP")
    assert final.Status == 0xA900 and final.ErrorComment
    _, final, _ = pynetdicom_get(site.port, ds)
    assert final.Status == 0xA900


async def _retrieve_and_cancel(port: int, command_field: int) -> tuple[int, dict[str, object]]:
    """C-MOVE or C-GET of the big series, cancelled after the first Pending response."""
    model = STUDY_MOVE if command_field == C_MOVE_RQ else STUDY_GET
    stored: list[str] = []

    async def on_store(operation: Operation) -> None:
        stored.append(str(operation.command["AffectedSOPInstanceUID"]))
        await operation.respond(SUCCESS)

    async with asyncio.timeout(TIMEOUT):
        assoc = await connect(
            port,
            "CANCELSCU",
            [(model, UNCOMPRESSED), (CT_IMAGE, UNCOMPRESSED)],
            roles={CT_IMAGE: (False, True)},
            services={C_STORE_RQ: Service(on_store)},
        )
        async with assoc:
            command: dict[str, object] = {"CommandField": command_field}
            if command_field == C_MOVE_RQ:
                command["MoveDestination"] = "STORESCP"
            ds = identifier("SERIES", StudyInstanceUID=f"{ROOT}.3", SeriesInstanceUID=f"{ROOT}.3.1")
            responses = await request_and_cancel(assoc, model, command, ds)
        return len(responses) - 1, responses[-1]


@pytest.mark.parametrize("command_field", [C_MOVE_RQ, C_GET_RQ], ids=["move", "get"])
def test_cancel_ends_with_fe00_and_counts(site: Site, command_field: int) -> None:
    pending, final = asyncio.run(_retrieve_and_cancel(site.port, command_field))
    assert final["Status"] == 0xFE00
    completed = final["NumberOfCompletedSuboperations"]
    assert 1 <= pending < BIG_SERIES_SIZE
    assert 1 <= completed < BIG_SERIES_SIZE  # type: ignore[operator]
    assert final["NumberOfRemainingSuboperations"] == BIG_SERIES_SIZE - completed  # type: ignore[operator]
    assert final["NumberOfFailedSuboperations"] == 0
    site.peers["STORESCP"].take()
    assert echoscu(site.port) == 0


# A Study Root C-MOVE-RQ to the storescp destination (its identifier sent apart).
MOVE_TO_STORESCP: Final = {
    "CommandField": C_MOVE_RQ,
    "AffectedSOPClassUID": STUDY_MOVE,
    "Priority": 0,
    "CommandDataSetType": 1,
    "MoveDestination": "STORESCP",
}


async def _move_then_abort(port: int) -> None:
    """Start a C-MOVE of the big series and abort the association at its first response."""
    async with asyncio.timeout(TIMEOUT):
        assoc = await connect(port, "ABORTSCU", [(STUDY_MOVE, UNCOMPRESSED)])
        ds = identifier("SERIES", StudyInstanceUID=f"{ROOT}.3", SeriesInstanceUID=f"{ROOT}.3.1")
        async for _ in assoc.request(1, MOVE_TO_STORESCP, dicom.encode(ds, ExplicitVRLittleEndian)):
            break
        await assoc.abort()


def test_requestor_abort_mid_move_leaves_the_server_serving(site: Site) -> None:
    asyncio.run(_move_then_abort(site.port))
    time.sleep(0.5)
    site.peers["STORESCP"].take()
    # The abandoned move ended with its requestor; the next one to the same place completes.
    _, final, _ = pynetdicom_move(
        site.port, identifier("STUDY", StudyInstanceUID=STUDY_1), "STORESCP"
    )
    assert_counts(final, 0x0000, len(site.select(study_uid=STUDY_1)))
    site.peers["STORESCP"].take()
    assert echoscu(site.port) == 0
    assert "aborted by peer" in site.pacs.log_text()


async def _concurrent_moves(port: int, count: int) -> list[dict[str, object]]:
    async def one() -> dict[str, object]:
        assoc = await connect(port, f"MOVESCU{count}", [(STUDY_MOVE, UNCOMPRESSED)])
        async with assoc:
            raw = dicom.encode(
                identifier("STUDY", StudyInstanceUID=f"{ROOT}.3"), ExplicitVRLittleEndian
            )
            responses = [r.command async for r in assoc.request(1, MOVE_TO_STORESCP, raw)]
        return responses[-1]

    async with asyncio.timeout(120):
        return await asyncio.gather(*(one() for _ in range(count)))


def test_concurrent_moves_all_complete(site: Site) -> None:
    finals = asyncio.run(_concurrent_moves(site.port, 3))
    for final in finals:
        assert final["Status"] == 0
        assert final["NumberOfCompletedSuboperations"] == BIG_SERIES_SIZE
    assert set(site.peers["STORESCP"].take()) == set(site.select(study_uid=f"{ROOT}.3"))
