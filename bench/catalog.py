"""A synthetic archive for query benchmarks: the same content as files or as index rows.

Patients hold studies, studies series, series instances, all named by their position,
so a benchmark knows what each query matches at any size. Each patient's name starts
with PAT<n // 10> (a prefix query matches ten patients), each study is one day after
the previous one (a ten-day range matches ten studies), whatever the archive's size.
`write_files` makes Part 10 files to send with C-STORE (to minipacs and Orthanc alike);
`fill_index` writes the same content straight into a minipacs index, for sizes no
benchmark has the hours to send.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import insert

from minipacs import dataset as dicom
from minipacs.index.db import make_engine
from minipacs.index.models import Instance, Patient, Series, Study
from minipacs.index.records import normalise_name

ROOT = "1.2.826.0.1.3680043.10.999"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MODALITIES = ("CT", "MR", "CT", "US", "CT")
GIVEN = ("JOHN", "JANE", "ANNA", "PAUL", "MARIA")
FIRST_DAY = datetime.date(1960, 1, 1)
_CHUNK = 20_000


@dataclass(frozen=True)
class Layout:
    """How many of each: patients, and studies / series / instances below each parent."""

    patients: int
    studies: int = 2
    series: int = 5
    instances: int = 10

    @property
    def total(self) -> int:
        """Instances in the archive."""
        return self.patients * self.studies * self.series * self.instances

    @classmethod
    def of_size(cls, instances: int) -> Layout:
        """A layout with (about) this many instances."""
        return cls(max(1, instances // 100))


def patient_id(p: int) -> str:
    """Patient ID of patient p."""
    return f"ID{p:07d}"


def patient_name(p: int) -> str:
    """Patient Name of patient p: PAT<p // 10><p % 10>^<given name>."""
    return f"PAT{p:07d}^{GIVEN[p % len(GIVEN)]}"


def study_uid(p: int, s: int) -> str:
    """Study Instance UID of study s of patient p."""
    return f"{ROOT}.{p}.{s}"


def study_date(layout: Layout, p: int, s: int) -> str:
    """One study a day, in order of patient and study."""
    day = FIRST_DAY + datetime.timedelta(days=p * layout.studies + s)
    return day.strftime("%Y%m%d")


def series_uid(p: int, s: int, r: int) -> str:
    """Series Instance UID of series r of study (p, s)."""
    return f"{ROOT}.{p}.{s}.{r}"


def instance_uid(p: int, s: int, r: int, i: int) -> str:
    """SOP Instance UID of instance i of series (p, s, r)."""
    return f"{ROOT}.{p}.{s}.{r}.{i}"


def _dataset(layout: Layout, p: int, s: int, r: int, i: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = instance_uid(p, s, r, i)
    ds.StudyDate = ds.SeriesDate = study_date(layout, p, s)
    ds.StudyTime = "101500"
    ds.AccessionNumber = f"A{p:07d}{s}"
    ds.Modality = MODALITIES[r % len(MODALITIES)]
    ds.ReferringPhysicianName = "WELBY^MARCUS"
    ds.StudyDescription = f"STUDY {s}"
    ds.PatientName = patient_name(p)
    ds.PatientID = patient_id(p)
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F" if p % 2 else "M"
    ds.StudyInstanceUID = study_uid(p, s)
    ds.SeriesInstanceUID = series_uid(p, s, r)
    ds.StudyID = str(s)
    ds.SeriesNumber = r + 1
    ds.InstanceNumber = i + 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.PixelData = bytes(128)
    return ds


def _positions(layout: Layout) -> Iterator[tuple[int, int, int, int]]:
    for p in range(layout.patients):
        for s in range(layout.studies):
            for r in range(layout.series):
                for i in range(layout.instances):
                    yield p, s, r, i


def write_files(root: Path, layout: Layout, parts: int = 8) -> list[Path]:
    """Write the archive as Part 10 files into root/part<k> (patients dealt round-robin)."""
    folders = [root / f"part{k}" for k in range(parts)]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    for p, s, r, i in _positions(layout):
        ds = _dataset(layout, p, s, r, i)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folders[p % parts] / f"{p}-{s}-{r}-{i}.dcm", enforce_file_format=True)
    return folders


def _flush(connection: Any, table: Any, rows: list[dict[str, Any]]) -> None:
    if rows:
        connection.execute(insert(table), rows)
        rows.clear()


def fill_index(url: str, layout: Layout) -> None:
    """Insert the archive's rows straight into a migrated, empty minipacs index.

    Every instance row carries the encoded header of the archive's first instance (the
    benchmark queries use only indexed keys); the files themselves are not written.
    """
    engine = make_engine(url)
    header = dicom.encode(_dataset(layout, 0, 0, 0, 0), ExplicitVRLittleEndian)
    header = header[: header.find(b"\xe0\x7f\x10\x00")]
    received = datetime.datetime.now(UTC)
    per_patient = layout.studies * layout.series * layout.instances
    patients: list[dict[str, Any]] = []
    studies: list[dict[str, Any]] = []
    series: list[dict[str, Any]] = []
    instances: list[dict[str, Any]] = []
    series_id = instance_id = 0
    with engine.begin() as connection:
        for p in range(layout.patients):
            name = patient_name(p)
            patients.append(
                {
                    "id": p + 1,
                    "patient_id": patient_id(p),
                    "issuer": "",
                    "patient_name": name,
                    "patient_name_norm": normalise_name(name),
                    "birth_date": "19700101",
                    "sex": "F" if p % 2 else "M",
                    "num_studies": layout.studies,
                    "num_series": layout.studies * layout.series,
                    "num_instances": per_patient,
                }
            )
            for s in range(layout.studies):
                study_id = p * layout.studies + s + 1
                studies.append(
                    {
                        "id": study_id,
                        "patient_fk": p + 1,
                        "study_uid": study_uid(p, s),
                        "study_date": study_date(layout, p, s),
                        "study_time": "101500",
                        "accession_number": f"A{p:07d}{s}",
                        "study_id": str(s),
                        "description": f"STUDY {s}",
                        "referring_name": "WELBY^MARCUS",
                        "referring_name_norm": "WELBY^MARCUS",
                        "modalities": "\\".join(sorted(set(MODALITIES[: layout.series]))),
                        "num_series": layout.series,
                        "num_instances": layout.series * layout.instances,
                    }
                )
                for r in range(layout.series):
                    series_id += 1
                    series.append(
                        {
                            "id": series_id,
                            "study_fk": study_id,
                            "series_uid": series_uid(p, s, r),
                            "modality": MODALITIES[r % len(MODALITIES)],
                            "series_number": r + 1,
                            "description": "",
                            "body_part": "",
                            "series_date": study_date(layout, p, s),
                            "series_time": "101500",
                            "num_instances": layout.instances,
                        }
                    )
                    for i in range(layout.instances):
                        instance_id += 1
                        instances.append(
                            {
                                "id": instance_id,
                                "series_fk": series_id,
                                "sop_uid": instance_uid(p, s, r, i),
                                "sop_class_uid": CT_IMAGE,
                                "instance_number": i + 1,
                                "transfer_syntax": ExplicitVRLittleEndian,
                                "number_of_frames": None,
                                "rows": 8,
                                "columns": 8,
                                "rel_path": f"bench/{p}/{s}/{r}/{i}.dcm",
                                "size": 1000,
                                "received_at": received,
                                "calling_ae": "BENCH",
                                "charset": "",
                                "header": header,
                            }
                        )
            if len(instances) >= _CHUNK:
                for table, rows in (
                    (Patient, patients),
                    (Study, studies),
                    (Series, series),
                    (Instance, instances),
                ):
                    _flush(connection, table, rows)
        for table, rows in ((Patient, patients), (Study, studies), (Series, series)):
            _flush(connection, table, rows)
        _flush(connection, Instance, instances)
    engine.dispose()
