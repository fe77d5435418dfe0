"""Worker mode (server.workers > 1): several processes serve one node, as one node."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from minipacs.index import schema
from minipacs.index.db import make_engine, share_writes, write_lock_path, write_turn
from minipacs.net import negotiation as neg
from minipacs.net.client import ClientAssociation
from minipacs.storage.filestore import FileStore
from tests.certs import make_certificates
from tests.dicom_tools import dcmtk, echoscu
from tests.peers import rejection
from tests.servers import MinipacsProcess, free_port, spawn_minipacs, start_minipacs
from tests.test_crash import _client, _index, _template

TIMEOUT = 30.0
CLIENTS = 8
PER_CLIENT = 25


def _events(process: MinipacsProcess, event: str) -> list[dict[str, object]]:
    """The JSON log records of one event, in order."""
    records = [json.loads(line) for line in process.log_text().splitlines() if line.startswith("{")]
    return [record for record in records if record["event"] == event]


def _worker_pids(process: MinipacsProcess) -> dict[int, int]:
    """Worker number -> pid of its newest process."""
    return {int(r["worker"]): int(r["pid"]) for r in _events(process, "worker.started")}  # type: ignore[call-overload]


def _serving(process: MinipacsProcess, worker: int) -> list[dict[str, object]]:
    """The server.listening events of one worker number (one per process it had)."""
    return [r for r in _events(process, "server.listening") if r.get("worker") == worker]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _write_series(root: Path, study_uid: str) -> list[Path]:
    """CLIENTS folders of PER_CLIENT instances, one series each, all in one study."""
    template = _template()
    template.StudyInstanceUID = study_uid
    folders = []
    for client in range(CLIENTS):
        folder = root / f"series{client}"
        folder.mkdir()
        template.SeriesInstanceUID = generate_uid()
        for number in range(PER_CLIENT):
            template.SOPInstanceUID = generate_uid()
            template.InstanceNumber = number + 1
            ds = Dataset()
            ds.update(template)
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.save_as(folder / f"{number}.dcm", enforce_file_format=True)
        folders.append(folder)
    return folders


def send_folders(port: int, folders: list[Path], timeout: float) -> list[tuple[int, str]]:
    """Send each folder over its own storescu association, all at once: (exit code, stderr)."""

    async def send_all() -> list[tuple[int, str]]:
        runs = [
            asyncio.to_thread(
                dcmtk,
                "storescu",
                "-aec",
                "MINIPACS",
                "127.0.0.1",
                str(port),
                "+sd",
                str(folder),
                timeout=timeout,
            )
            for folder in folders
        ]
        return [(r.returncode, r.stderr) for r in await asyncio.gather(*runs)]

    return asyncio.run(send_all())


def _study_counts(port: int, study_uid: str) -> tuple[int, int]:
    """NumberOfStudyRelatedSeries and -Instances as C-FIND answers them."""
    ae = AE(ae_title="FINDSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="MINIPACS")
    assert assoc.is_established
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        query.NumberOfStudyRelatedSeries = None
        query.NumberOfStudyRelatedInstances = None
        matches = [
            ds
            for status, ds in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
            if status.Status in (0xFF00, 0xFF01)
        ]
    finally:
        assoc.release()
    assert len(matches) == 1
    return int(matches[0].NumberOfStudyRelatedSeries), int(matches[0].NumberOfStudyRelatedInstances)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_store_eight_associations_into_one_study(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    env = {"MINIPACS_SERVER_WORKERS": "2", "MINIPACS_STORAGE_MIN_FREE_BYTES": "0"}
    if backend == "postgresql":
        env["MINIPACS_DATABASE_URL"] = request.getfixturevalue("postgres").create_database()
        schema.upgrade(env["MINIPACS_DATABASE_URL"])
    study_uid = generate_uid()
    (tmp_path / "data").mkdir()
    folders = _write_series(tmp_path / "data", study_uid)
    workdir = tmp_path / "server"
    workdir.mkdir()
    process = start_minipacs(workdir, env)
    try:
        results = send_folders(process.port, folders, TIMEOUT * 4)
        assert [code for code, _ in results] == [0] * CLIENTS, results
        assert not [err for _, err in results if "E:" in err]
        assert _study_counts(process.port, study_uid) == (CLIENTS, CLIENTS * PER_CLIENT)
        index = _index(process.database_url)
        assert len(index) == CLIENTS * PER_CLIENT
        assert all((workdir / "store" / rel).is_file() for rel in index.values())
        # Both workers took a share of the associations.
        served_by = {r["worker"] for r in _events(process, "association.accepted")}
        assert served_by == {0, 1}
        pids = _worker_pids(process)
        assert len(pids) == 2 and process.process.pid not in pids.values()
    finally:
        assert process.stop() == 0
    assert not [pid for pid in pids.values() if _alive(pid)]


def test_association_limit_counts_the_associations_of_every_worker(tmp_path: Path) -> None:
    env = {"MINIPACS_SERVER_WORKERS": "2", "MINIPACS_SERVER_MAX_ASSOCIATIONS": "2"}
    process = start_minipacs(tmp_path, env)
    try:

        async def hold_two() -> tuple[tuple[int, int, int] | None, tuple[int, int, int] | None]:
            held = [
                await ClientAssociation.connect(
                    "127.0.0.1",
                    process.port,
                    calling_ae=f"HOLD{i}",
                    called_ae="MINIPACS",
                    contexts=[(neg.VERIFICATION, neg.UNCOMPRESSED_TRANSFER_SYNTAXES)],
                    connect_timeout=TIMEOUT,
                )
                for i in range(2)
            ]
            third = await asyncio.to_thread(rejection, process.port, "THIRD")
            await held.pop().release()
            # The release reaches the supervisor's count as a notice: give it a moment.
            after = third
            deadline = time.monotonic() + TIMEOUT
            while after is not None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                after = await asyncio.to_thread(rejection, process.port, "FOURTH")
            await held.pop().release()
            return third, after

        third, after = asyncio.run(asyncio.wait_for(hold_two(), TIMEOUT * 2))
        # PS3.8 Table 9-21: rejected-transient, service-provider (presentation), local limit.
        assert third == (2, 3, 2)
        assert after is None
        assert {r["worker"] for r in _events(process, "association.accepted")} == {0, 1}
    finally:
        assert process.stop() == 0


def test_the_pending_connection_limit_holds_for_the_node(tmp_path: Path) -> None:
    # Six silent connections against a node-wide limit of four, over two workers: each
    # worker closes the oldest beyond its share, so two are closed, not none.
    env = {"MINIPACS_SERVER_WORKERS": "2", "MINIPACS_SERVER_MAX_PENDING_CONNECTIONS": "4"}
    process = start_minipacs(tmp_path, env)
    silent = []
    try:
        for _ in range(6):
            silent.append(socket.create_connection(("127.0.0.1", process.port), TIMEOUT))
            time.sleep(0.05)  # the supervisor hands each on before the next
        closed = 0
        for connection in silent:
            connection.settimeout(1.0)
            with contextlib.suppress(TimeoutError):
                closed += connection.recv(1) == b""
        assert closed == 2
        assert len(_events(process, "connection.dropped")) == 2
        assert echoscu(process.port) == 0
    finally:
        for connection in silent:
            connection.close()
        assert process.stop() == 0


def test_a_killed_worker_is_restarted_and_nothing_acknowledged_is_lost(tmp_path: Path) -> None:
    env = {"MINIPACS_SERVER_WORKERS": "2", "MINIPACS_STORAGE_MIN_FREE_BYTES": "0"}
    process = start_minipacs(tmp_path, env)
    try:
        victim = _worker_pids(process)[0]

        async def run() -> list[str]:
            acknowledged: list[str] = []
            stop = asyncio.Event()
            tasks = [
                asyncio.create_task(_client(process.port, _template(), acknowledged, stop))
                for _ in range(CLIENTS)
            ]
            await asyncio.sleep(1.5)
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + TIMEOUT
            while _worker_pids(process)[0] == victim and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            # The other worker's clients kept storing; new ones reach both again.
            more = [
                asyncio.create_task(_client(process.port, _template(), acknowledged, stop))
                for _ in range(4)
            ]
            await asyncio.sleep(1.5)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks, *more), TIMEOUT)
            return acknowledged

        acknowledged = asyncio.run(run())
        assert _worker_pids(process)[0] != victim
        died = _events(process, "worker.died")
        assert [(r["worker"], r["pid"]) for r in died] == [(0, victim)]
        assert len(acknowledged) > 50
        assert echoscu(process.port) == 0
        index = _index(process.database_url)
        lost = [uid for uid in acknowledged if uid not in index]
        assert not lost, f"{len(lost)} acknowledged instances missing from the index"
        for uid in acknowledged:
            assert pydicom.dcmread(tmp_path / "store" / index[uid]).SOPInstanceUID == uid
    finally:
        assert process.stop() == 0


def test_workers_stop_by_themselves_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    env = {"MINIPACS_SERVER_WORKERS": "2"}
    process = start_minipacs(tmp_path, env)
    pids = list(_worker_pids(process).values())
    process.process.kill()
    process.process.wait(TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if _alive(pid)]
    # Nothing holds the port or the archive: the node starts again on the same folder.
    again = start_minipacs(tmp_path, env)
    try:
        assert echoscu(again.port) == 0
    finally:
        assert again.stop() == 0


def test_metrics_of_every_worker_come_from_one_endpoint(tmp_path: Path) -> None:
    port = free_port()
    env = {"MINIPACS_SERVER_WORKERS": "2", "MINIPACS_METRICS_PORT": str(port)}
    process = start_minipacs(tmp_path, env)
    try:
        for _ in range(4):
            assert echoscu(process.port) == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=TIMEOUT) as reply:
            assert reply.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as reply:
            text = reply.read().decode()
        assert "minipacs_workers_running 2.0" in text
        assert 'worker="0"' in text and 'worker="1"' in text
    finally:
        assert process.stop() == 0


def test_a_bad_tls_setting_stops_the_supervisor_as_it_stops_one_process(tmp_path: Path) -> None:
    env = {
        "MINIPACS_SERVER_WORKERS": "2",
        "MINIPACS_TLS_PORT": str(free_port()),
        "MINIPACS_TLS_CERTIFICATE": str(tmp_path / "missing.pem"),
        "MINIPACS_TLS_PRIVATE_KEY": str(tmp_path / "missing.key"),
    }
    process, log_path, _ = spawn_minipacs(tmp_path, free_port(), env)
    try:
        code = process.wait(TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    assert code == 2
    assert "missing.pem" in log_path.read_text()
    assert "worker.started" not in log_path.read_text()


def test_a_worker_is_restarted_once_the_store_it_needs_is_back(tmp_path: Path) -> None:
    process = start_minipacs(tmp_path, {"MINIPACS_SERVER_WORKERS": "2"})
    journals = tmp_path / "store" / ".journals"
    try:
        victim = _worker_pids(process)[0]
        # Recovery after the death cannot read the journals folder for a while.
        journals.rename(tmp_path / "journals.away")
        journals.write_text("not a folder")
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + TIMEOUT
        while not _events(process, "worker.restart_failed") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _events(process, "worker.restart_failed")
        journals.unlink()
        (tmp_path / "journals.away").rename(journals)
        while _worker_pids(process)[0] == victim and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _worker_pids(process)[0] != victim
        for _ in range(4):
            assert echoscu(process.port) == 0
    finally:
        assert process.stop() == 0


def test_failed_tls_handshakes_do_not_skew_which_worker_gets_connections(
    tmp_path: Path,
) -> None:
    (tmp_path / "certs").mkdir()
    certs = make_certificates(tmp_path / "certs")
    tls_port = free_port()
    env = {
        "MINIPACS_SERVER_WORKERS": "2",
        "MINIPACS_TLS_PORT": str(tls_port),
        "MINIPACS_TLS_CERTIFICATE": str(certs.server_cert),
        "MINIPACS_TLS_PRIVATE_KEY": str(certs.server_key),
    }
    workdir = tmp_path / "server"
    workdir.mkdir()
    process = start_minipacs(workdir, env)
    try:
        # Port scanners and TCP health checks: connect, say nothing TLS, close.
        for _ in range(10):
            with socket.create_connection(("127.0.0.1", tls_port), timeout=TIMEOUT) as sock:
                sock.sendall(b"not a TLS handshake")
        deadline = time.monotonic() + TIMEOUT
        while len(_events(process, "connection.dropped")) < 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(_worker_pids(process)[1], signal.SIGKILL)
        # Serving again once its new process says so; it starts with no connections.
        while len(_serving(process, 1)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        before = len(_events(process, "association.accepted"))
        for _ in range(6):
            assert echoscu(process.port) == 0
        served_by = [r["worker"] for r in _events(process, "association.accepted")[before:]]
        # The survivor's failed handshakes were subtracted: it is not passed over.
        assert sorted(served_by) == [0, 0, 0, 1, 1, 1]
    finally:
        assert process.stop() == 0


def _order(
    first: contextlib.AbstractContextManager[object],
    second: contextlib.AbstractContextManager[object],
) -> list[str]:
    """Enter `first` in a thread and hold it a moment, then `second` here: who ran when."""
    order: list[str] = []
    held = threading.Event()

    def hold() -> None:
        with first:
            held.set()
            time.sleep(0.3)
            order.append("first done")

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(TIMEOUT)
    with second:
        order.append("second in")
    thread.join(TIMEOUT)
    return order


def test_shared_claims_hold_a_path_against_another_process(tmp_path: Path) -> None:
    # Two stores on one folder, each with its own lock files open, like two workers.
    first = FileStore(tmp_path / "store", tmp_path / "spool", 0, shared_claims=True)
    second = FileStore(tmp_path / "store", tmp_path / "spool", 0, shared_claims=True)
    try:
        assert _order(first.claim("a/b.dcm"), second.claim("a/b.dcm")) == [
            "first done",
            "second in",
        ]
        assert _order(first.claim("a/b.dcm"), second.claim("c/d.dcm")) == [
            "second in",
            "first done",
        ]
    finally:
        first.close()
        second.close()


def test_every_writer_of_a_shared_sqlite_index_takes_its_turn(tmp_path: Path) -> None:
    # Two engines on one file, like two workers: recovery, ANALYZE and a withdrawal take
    # the same turn (db.write_turn) as the index writers.
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    engines = [make_engine(url), make_engine(url)]
    for engine in engines:
        share_writes(engine)
    try:
        assert write_lock_path(engines[0]) == tmp_path / "index.sqlite.writelock"
        assert _order(write_turn(engines[0]), write_turn(engines[1])) == [
            "first done",
            "second in",
        ]
        single = make_engine(url)
        assert write_lock_path(single) is None
        assert _order(write_turn(engines[0]), write_turn(single)) == ["second in", "first done"]
        single.dispose()
    finally:
        for engine in engines:
            engine.dispose()


def test_a_stopped_worker_is_killed_and_replaced(tmp_path: Path) -> None:
    env = {"MINIPACS_SERVER_WORKERS": "2", "MINIPACS_SERVER_WORKER_TIMEOUT": "2"}
    process = start_minipacs(tmp_path, env)
    try:
        victim = _worker_pids(process)[1]
        os.kill(victim, signal.SIGSTOP)
        deadline = time.monotonic() + TIMEOUT
        while len(_serving(process, 1)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [r["pid"] for r in _events(process, "worker.hung")] == [victim]
        assert not _alive(victim)
        before = len(_events(process, "association.accepted"))
        for _ in range(4):
            assert echoscu(process.port) == 0
        served_by = [r["worker"] for r in _events(process, "association.accepted")[before:]]
        assert sorted(served_by) == [0, 0, 1, 1]
    finally:
        assert process.stop() == 0
