"""Generate benchmark DICOM files from pydicom's CT_small.dcm with fresh UIDs.

Files are split into `parts` sub-folders (part0, part1, ...) so that concurrent clients
each send their own set; every part holds its own studies and series.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SOURCE = Path(pydicom.data.__file__).parent / "test_files" / "CT_small.dcm"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


@dataclass(frozen=True)
class FileSet:
    """A generated set of files: its parts (one folder per client), count and bytes."""

    root: Path
    parts: list[Path]
    count: int
    total_bytes: int


def _template() -> Dataset:
    ds = pydicom.dcmread(SOURCE)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def generate(
    root: Path,
    count: int,
    size: int,
    *,
    parts: int = 8,
    per_series: int = 20,
    series_per_study: int = 5,
    mixed_modalities: bool = False,
) -> FileSet:
    """Write `count` size x size 16-bit images into root/part<i>; alternate CT/MR series."""
    ds = _template()
    ds.Rows = size
    ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    folders = [root / f"part{i}" for i in range(parts)]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    # Files are dealt to the parts in contiguous blocks, so each part has its own studies.
    per_part = [count // parts + (1 if i < count % parts else 0) for i in range(parts)]
    total = 0
    series_index = 0
    for folder, n in zip(folders, per_part, strict=True):
        for i in range(n):
            if i % (per_series * series_per_study) == 0:
                ds.StudyInstanceUID = generate_uid()
                ds.StudyID = str(i)
            if i % per_series == 0:
                ds.SeriesInstanceUID = generate_uid()
                ds.SeriesNumber = series_index % 1000 + 1
                mr = mixed_modalities and series_index % 2 == 1
                ds.SOPClassUID = MR_IMAGE if mr else CT_IMAGE
                ds.Modality = "MR" if mr else "CT"
                series_index += 1
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = i % per_series + 1
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.PixelData = os.urandom(size * size * 2)
            ds["PixelData"].VR = "OW"
            path = folder / f"{i:06d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            total += path.stat().st_size
    return FileSet(root, folders, count, total)


def small(root: Path, count: int, parts: int = 8) -> FileSet:
    """64x64 16-bit CT and MR images (~10 KB each)."""
    return generate(root, count, 64, parts=parts, mixed_modalities=True)


def ct(root: Path, count: int, parts: int = 8) -> FileSet:
    """512x512 16-bit CT images (~520 KB each)."""
    return generate(root, count, 512, parts=parts, per_series=25, series_per_study=2)
