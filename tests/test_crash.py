"""kill -9 during concurrent stores: every acknowledged instance survives, index and disk agree."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

from minipacs import dataset as dicom
from minipacs.index import schema
from minipacs.index.db import make_engine
from minipacs.index.models import Instance
from minipacs.net.client import AssociationLost, AssociationRefused, ClientAssociation
from tests.servers import MinipacsProcess, start_minipacs

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
CLIENTS = 8
KILL_AFTER = 3.0
STORE_TIMEOUT = 10.0


def _template() -> Dataset:
    """A small CT instance (64x64, 16-bit) to clone with new UIDs."""
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.Rows = ds.Columns = 64
    ds.PixelData = bytes(64 * 64 * 2)
    return Dataset({tag: elem for tag, elem in ds.items() if tag.group != 0x0002})


async def _client(
    port: int, template: Dataset, acknowledged: list[str], stop: asyncio.Event | None = None
) -> None:
    """Store new instances until the association dies (or `stop`); record the ones acknowledged."""
    try:
        async with asyncio.timeout(60):
            assoc = await ClientAssociation.connect(
                "127.0.0.1",
                port,
                calling_ae="CRASHTEST",
                called_ae="MINIPACS",
                contexts=[(CT_IMAGE, [ExplicitVRLittleEndian])],
                connect_timeout=10,
            )
            context_id = assoc.context_for(CT_IMAGE)
            template.SeriesInstanceUID = generate_uid()
            while stop is None or not stop.is_set():
                template.SOPInstanceUID = generate_uid()
                data = dicom.encode(template, ExplicitVRLittleEndian)
                async with asyncio.timeout(STORE_TIMEOUT):
                    response = await assoc.store(
                        context_id, CT_IMAGE, template.SOPInstanceUID, data
                    )
                if int(response["Status"]) == 0:  # type: ignore[call-overload]
                    acknowledged.append(str(template.SOPInstanceUID))
            await assoc.release()
    except (AssociationLost, AssociationRefused, ConnectionError, OSError, TimeoutError):
        return


async def _store_until_killed(process: MinipacsProcess) -> list[str]:
    """Run CLIENTS storing clients, kill -9 the server mid-way; return acknowledged UIDs."""
    acknowledged: list[str] = []
    tasks = [
        asyncio.create_task(_client(process.port, _template(), acknowledged))
        for _ in range(CLIENTS)
    ]
    await asyncio.sleep(KILL_AFTER)
    process.process.kill()
    process.process.wait(10)
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    return acknowledged


def _index(url: str) -> dict[str, str]:
    """SOP Instance UID -> relative path of every indexed instance."""
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            return dict(session.execute(select(Instance.sop_uid, Instance.rel_path)).all())
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("backend", "flush"),
    [("sqlite", "filesystem"), ("postgresql", "filesystem"), ("sqlite", "file")],
)
def test_kill_during_stores_loses_nothing_acknowledged(
    backend: str, flush: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    env = {"MINIPACS_STORAGE_MIN_FREE_BYTES": "0", "MINIPACS_STORAGE_FLUSH": flush}
    if backend == "postgresql":
        url = request.getfixturevalue("postgres").create_database()
        schema.upgrade(url)
        env["MINIPACS_DATABASE_URL"] = url
    process = start_minipacs(tmp_path, env)
    try:
        started = time.monotonic()
        acknowledged = asyncio.run(_store_until_killed(process))
        assert time.monotonic() - started < 120
    finally:
        if process.process.poll() is None:
            process.process.kill()
            process.process.wait(10)
    assert process.process.returncode == -9
    assert len(acknowledged) > 50, "too few stores before the kill to test anything"

    restarted = start_minipacs(tmp_path, env)
    try:
        store = tmp_path / "store"
        index = _index(restarted.database_url)
        lost = [uid for uid in acknowledged if uid not in index]
        assert not lost, f"{len(lost)} acknowledged instances missing from the index"
        for uid in acknowledged:
            stored = pydicom.dcmread(store / index[uid])
            assert stored.SOPInstanceUID == uid
        missing_files = [rel for rel in index.values() if not (store / rel).is_file()]
        assert not missing_files, f"index rows without a file: {missing_files[:5]}"
        on_disk = {
            p.relative_to(store).as_posix()
            for p in store.rglob("*.dcm")
            if p.relative_to(store).parts[0] not in (".tmp", ".spool")
        }
        orphans = on_disk - set(index.values())
        assert not orphans, f"{len(orphans)} files without an index row: {sorted(orphans)[:5]}"
        assert list((store / ".tmp").iterdir()) == []
    finally:
        assert restarted.stop() == 0
