"""Large data sets are streamed through a spool file, not held whole in memory."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psutil
import pydicom
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from minipacs import dataset as dicom
from minipacs.net.client import ClientAssociation
from minipacs.storage.layout import instance_path
from tests.servers import start_minipacs

CT = "1.2.840.10008.5.1.4.1.1.2"
FRAMES, SIZE = 6, 2048


def _big_dataset() -> tuple[pydicom.Dataset, bytes]:
    ds = dcmread(Path(pydicom.data.__file__).parent / "test_files" / "CT_small.dcm")
    ds.SOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = SIZE
    ds.NumberOfFrames = FRAMES
    pixels = bytes(range(256)) * (FRAMES * SIZE * SIZE * 2 // 256)
    ds.PixelData = pixels
    return ds, dicom.encode(ds, ExplicitVRLittleEndian)


def test_48mb_instance_is_spooled_and_stored_byte_exact(tmp_path: Path) -> None:
    server = start_minipacs(
        tmp_path,
        {"MINIPACS_SERVER_SPOOL_THRESHOLD": "1048576", "MINIPACS_STORAGE_MIN_FREE_BYTES": "0"},
    )
    try:
        ds, raw = _big_dataset()
        process = psutil.Process(server.process.pid)
        before = process.memory_info().rss

        async def send() -> dict:
            association = await ClientAssociation.connect(
                "127.0.0.1",
                server.port,
                calling_ae="BIGSCU",
                called_ae="MINIPACS",
                contexts=[(CT, [ExplicitVRLittleEndian])],
            )
            response = await association.store(
                association.context_for(CT), CT, ds.SOPInstanceUID, raw
            )
            await association.release()
            return response

        response = asyncio.run(asyncio.wait_for(send(), 120))
        grown = process.memory_info().rss - before
        assert response["Status"] == 0x0000
        # The data set is 48 MiB; the server must not have held it whole.
        assert grown < 24 * 1024 * 1024, f"server RSS grew by {grown / 2**20:.1f} MiB"
        stored = (
            tmp_path
            / "store"
            / instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        )
        on_disk = stored.read_bytes()
        assert on_disk.endswith(raw)
        assert dcmread(stored).PixelData == ds.PixelData
        assert list((tmp_path / "store" / ".spool").glob("*")) == []
    finally:
        server.stop()
