"""Faults around the server: its database going away and coming back."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from minipacs.index import schema
from tests import find_data
from tests.dicom_tools import echoscu
from tests.pgserver import PostgresServer, start_postgres
from tests.servers import MinipacsProcess, start_minipacs
from tests.test_find import find, query, series_instances
from tests.test_store import instance_files


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test's own, free to stop and start."""
    server = start_postgres()
    yield server
    server.stop()


def _instances(count: int) -> list[Dataset]:
    template = find_data.archive_datasets()[0]
    made = []
    for index in range(count):
        ds = copy.deepcopy(template)
        ds.SOPInstanceUID = f"{find_data.ROOT}.77.{index + 1}"
        made.append(ds)
    return made


def _server_on(postgres: PostgresServer, workdir: Path, **env: str) -> MinipacsProcess:
    """A daemon on a fresh, migrated database of `postgres`."""
    url = postgres.create_database()
    schema.upgrade(url)
    environ = {"MINIPACS_DATABASE_URL": url, "MINIPACS_STORAGE_MIN_FREE_BYTES": "0", **env}
    return start_minipacs(workdir, environ)


def test_database_outage_fails_stores_and_queries_then_recovers(
    own_postgres: PostgresServer, tmp_path: Path
) -> None:
    server = _server_on(own_postgres, tmp_path)
    first, second = _instances(2)
    try:
        assert asyncio.run(find_data.store_all(server.port, [first], timeout=60)) == [0]
        own_postgres.halt()
        # Stores fail with a failure status, never Success, and leave no file behind.
        statuses = asyncio.run(find_data.store_all(server.port, [second], timeout=60))
        assert statuses == [0xA700], f"0x{statuses[0]:04X}"
        assert len(instance_files(tmp_path / "store")) == 1
        _, _, final = find(server.port, query("STUDY", StudyInstanceUID=""))
        assert final.Status == 0xC001
        assert echoscu(server.port) == 0  # still serving
        own_postgres.resume()
        assert asyncio.run(find_data.store_all(server.port, [second], timeout=60)) == [0]
        expected = {str(first.SOPInstanceUID), str(second.SOPInstanceUID)}
        assert series_instances(server.port, first) == expected
        assert len(instance_files(tmp_path / "store")) == 2
    finally:
        server.stop()


def test_outage_during_a_replace_keeps_the_acknowledged_file(
    own_postgres: PostgresServer, tmp_path: Path
) -> None:
    server = _server_on(own_postgres, tmp_path, MINIPACS_STORAGE_DUPLICATE_POLICY="replace")
    (instance,) = _instances(1)
    try:
        assert asyncio.run(find_data.store_all(server.port, [instance], timeout=60)) == [0]
        own_postgres.halt()
        # The replacement is written over the stored file, then its index commit fails.
        assert asyncio.run(find_data.store_all(server.port, [instance], timeout=60)) == [0xA700]
        own_postgres.resume()
        files = instance_files(tmp_path / "store")
        assert len(files) == 1, "the acknowledged instance's file must survive"
        assert series_instances(server.port, instance) == {str(instance.SOPInstanceUID)}
    finally:
        server.stop()
