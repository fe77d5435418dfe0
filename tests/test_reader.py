"""DatasetReader: a Part 10 file's data set, its File Meta Information skipped, in chunks."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from minipacs import dataset as dicom
from minipacs.storage.reader import DatasetReader


def _write(path: Path, pixels: int) -> bytes:
    """A Part 10 file with `pixels` bytes of pixel data; returns its data set bytes."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = "READER"
    ds.PixelData = bytes(range(256)) * (pixels // 256)
    ds["PixelData"].VR = "OB"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    with open(path, "rb") as handle:
        pydicom.filereader.read_preamble(handle, False)
        pydicom.filereader._read_file_meta_info(handle)
        return handle.read()


def _all(reader: DatasetReader) -> list[bytes]:
    pieces, last = [], False
    while not last:
        piece, last = reader.read()
        pieces.append(bytes(piece))
    return pieces


@pytest.mark.parametrize("chunk_size", [4 * 1024 * 1024, 1024, 150])
def test_reads_the_data_set_after_the_file_meta(tmp_path: Path, chunk_size: int) -> None:
    # 150 bytes: the File Meta Information is longer than the first read.
    path = tmp_path / "a.dcm"
    body = _write(path, 4096)
    pieces = _all(DatasetReader(path, chunk_size))
    assert b"".join(pieces) == body
    assert all(len(piece) % 2 == 0 for piece in pieces)
    if chunk_size > len(body) + 512:
        assert len(pieces) == 1


def test_a_file_without_prefix_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "b.dcm"
    path.write_bytes(b"\0" * 300)
    with pytest.raises(dicom.DataSetError):
        DatasetReader(path)
