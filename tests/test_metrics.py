"""The ops endpoint of a running daemon: Prometheus metrics after real traffic, health."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from minipacs.ops.http import OpsServer
from minipacs.ops.metrics import Metrics
from tests.servers import MinipacsProcess, free_port, start_minipacs
from tests.test_cli import run_minipacs

TIMEOUT = 10


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[MinipacsProcess, int]]:
    """A daemon with its metrics endpoint on a free port."""
    port = free_port()
    env = {"MINIPACS_METRICS_PORT": str(port), "MINIPACS_STORAGE_MIN_FREE_BYTES": "0"}
    workdir = tmp_path / "server"
    workdir.mkdir()
    process = start_minipacs(workdir, env)
    yield process, port
    process.stop()


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=TIMEOUT) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _samples(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_metrics_count_real_traffic(watched: tuple[MinipacsProcess, int], tmp_path: Path) -> None:
    process, port = watched
    dicom_port = str(process.port)
    ct = get_testdata_file("CT_small.dcm")
    assert run_minipacs(tmp_path, "store", "127.0.0.1", dicom_port, ct).returncode == 0
    found = run_minipacs(tmp_path, "find", "127.0.0.1", dicom_port, "-k", "PatientID=1CT1")
    assert found.returncode == 0
    assert run_minipacs(tmp_path, "echo", "127.0.0.1", dicom_port, "--aec", "WRONG").returncode
    status, text = _get(port, "/metrics")
    assert status == 200
    samples = _samples(text)
    assert samples["minipacs_associations_total"] == 2
    assert samples["minipacs_associations_active"] == 0
    assert samples['minipacs_associations_rejected_total{reason="called AE title"}'] == 1
    assert samples['minipacs_dimse_operations_total{service="C-STORE",status="0x0000"}'] == 1
    assert samples['minipacs_dimse_operations_total{service="C-FIND",status="0x0000"}'] == 1
    assert samples['minipacs_operation_seconds_count{service="C-STORE"}'] == 1
    assert samples["minipacs_received_bytes_total"] > Path(ct).stat().st_size - 1000
    assert samples["minipacs_sent_bytes_total"] > 0
    assert samples['minipacs_index_entities{kind="instances"}'] == 1
    assert samples["minipacs_store_free_bytes"] > 0


def test_health_endpoints(watched: tuple[MinipacsProcess, int]) -> None:
    _process, port = watched
    assert _get(port, "/healthz") == (200, "alive\n")
    assert _get(port, "/readyz") == (200, "ready\n")
    assert _get(port, "/nothing")[0] == 404


def test_not_ready_is_503_with_the_reason() -> None:
    async def scenario() -> tuple[int, str]:
        async def not_ready() -> str:
            return "not accepting associations"

        async def exposition() -> bytes:
            return Metrics().exposition()

        ops = OpsServer(exposition, not_ready)
        port = await ops.start("127.0.0.1", 0)
        try:
            return await asyncio.to_thread(_get, port, "/readyz")
        finally:
            await ops.stop()

    assert asyncio.run(scenario()) == (503, "not ready: not accepting associations\n")
