"""A small archive for C-MOVE/C-GET tests: each instance with the exact bytes it was stored as."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from minipacs import dataset as dicom
from minipacs.storage.reader import DatasetReader
from tests.qr_client import store_encoded

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ROOT = "1.2.826.0.1.3680043.10.4321"
BIG_SERIES_SIZE = 250  # more than two pages of the retrieve query
# pydicom's compressed test files, stored in their own transfer syntax (one study each).
COMPRESSED_FILES = ("JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small_jpeg_ls_lossless.dcm")


@dataclass(frozen=True)
class Stored:
    """One instance of the archive: its keys, transfer syntax and data set bytes."""

    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str
    transfer_syntax: str
    data: bytes


def _instance(patient: str, study: int, series: int, index: int, modality: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE if modality == "CT" else MR_IMAGE
    ds.StudyInstanceUID = f"{ROOT}.{study}"
    ds.SeriesInstanceUID = f"{ROOT}.{study}.{series}"
    ds.SOPInstanceUID = f"{ROOT}.{study}.{series}.{index}"
    ds.PatientID = patient
    ds.PatientName = f"RETRIEVE^{patient}"
    ds.Modality = modality
    ds.StudyDate = "20240102"
    ds.SeriesNumber = series
    ds.InstanceNumber = index
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.PixelData = bytes((index + i) % 256 for i in range(128))
    ds["PixelData"].VR = "OW"
    return ds


def _stored(ds: Dataset, syntax: str, data: bytes) -> Stored:
    return Stored(
        str(ds.PatientID),
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.SOPInstanceUID),
        str(ds.SOPClassUID),
        syntax,
        data,
    )


def _file_dataset(path: Path) -> bytes:
    reader = DatasetReader(path)
    pieces = []
    last = False
    while not last:
        piece, last = reader.read()
        pieces.append(piece)
    return b"".join(pieces)


def archive() -> list[Stored]:
    """Patient R1: study 1 (CT x3, MR x2) and study 2 (CT x1); patient R2: study 3 (big)."""
    layout = [
        ("R1", 1, 1, 3, "CT"),
        ("R1", 1, 2, 2, "MR"),
        ("R1", 2, 1, 1, "CT"),
        ("R2", 3, 1, BIG_SERIES_SIZE, "CT"),
    ]
    instances = []
    for patient, study, series, count, modality in layout:
        for index in range(1, count + 1):
            ds = _instance(patient, study, series, index, modality)
            data = dicom.encode(ds, ExplicitVRLittleEndian)
            instances.append(_stored(ds, ExplicitVRLittleEndian, data))
    for name in COMPRESSED_FILES:
        path = Path(get_testdata_file(name))
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        instances.append(_stored(ds, str(ds.file_meta.TransferSyntaxUID), _file_dataset(path)))
    return instances


def compressed(name: str) -> Dataset:
    """One of the compressed pydicom files of the archive, decoded by pydicom."""
    return pydicom.dcmread(get_testdata_file(name))


async def store_all(port: int, instances: list[Stored]) -> list[int]:
    """Store every instance in its own transfer syntax over one association."""
    encoded = [(i.sop_class, i.sop_uid, i.transfer_syntax, i.data) for i in instances]
    return await store_encoded(port, "RETRIEVETEST", encoded, 120.0)
