"""A small archive with known content for C-FIND tests, stored through real C-STOREs."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pydicom
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from minipacs import dataset as dicom
from tests.qr_client import store_encoded

SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
ROOT = "1.2.826.0.1.3680043.10.1234"
# Instances of the one big series, enough for several pages (cancel, streaming).
BIG_SERIES_SIZE = 450
CHARSET_FILES = ("chrFren.dcm", "chrH31.dcm", "chrX1.dcm", "chrI2.dcm")


@dataclass(frozen=True)
class Spec:
    """One study of the test archive."""

    uid: str
    patient_id: str
    patient_name: str
    date: str
    time: str
    accession: str
    description: str
    # (series number, modality, instances, institution)
    series: tuple[tuple[int, str, int, str], ...]


# One row per study keeps the table readable.
# fmt: off
STUDIES = (
    Spec(
        f"{ROOT}.1", "PID1", "DOE^JOHN", "20240105", "101500", "ACC%1", "CHEST_CT",
        ((1, "CT", 3, "GENERAL HOSPITAL"), (2, "MR", 2, "GENERAL HOSPITAL")),
    ),
    Spec(
        f"{ROOT}.2", "PID2", "Doe^Jane", "20240107", "083000", "ACC_2", "CHESTXCT",
        ((1, "CT", 1, "OTHER CLINIC"),),
    ),
    Spec(
        f"{ROOT}.3", "P_3%", "SMITH^ANNA", "20231231", "235959", "ACCX2", "ABDOMEN",
        ((1, "US", 1, "OTHER CLINIC"),),
    ),
    Spec(
        f"{ROOT}.4", "P_3%", "SMITH^ANNA", "20240110", "120000", "ACCzz1", "HEAD",
        ((1, "OT", 1, ""),),
    ),
    Spec(
        f"{ROOT}.5", "PBIG", "MANY^IMAGES", "20220601", "090000", "BIG", "BIG SERIES",
        ((1, "CT", BIG_SERIES_SIZE, "GENERAL HOSPITAL"),),
    ),
)
# fmt: on
SOP_CLASS = {"CT": CT_IMAGE, "MR": MR_IMAGE, "US": US_IMAGE, "OT": SC_IMAGE}


def series_uid(study: Spec, number: int) -> str:
    """The Series Instance UID of a test series."""
    return f"{study.uid}.{number}"


def instance_uid(study: Spec, number: int, index: int) -> str:
    """The SOP Instance UID of a test instance."""
    return f"{study.uid}.{number}.{index + 1}"


def _instance(study: Spec, series: tuple[int, str, int, str], index: int) -> Dataset:
    number, modality, _count, institution = series
    ds = Dataset()
    ds.SOPClassUID = SOP_CLASS[modality]
    ds.SOPInstanceUID = instance_uid(study, number, index)
    ds.StudyDate, ds.StudyTime = study.date, study.time
    ds.SeriesDate = study.date
    ds.AccessionNumber = study.accession
    ds.Modality = modality
    if institution:
        ds.InstitutionName = institution
    ds.ReferringPhysicianName = "WELBY^MARCUS"
    ds.StudyDescription = study.description
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F" if "Jane" in study.patient_name or "ANNA" in study.patient_name else "M"
    if study.uid.endswith(".1"):
        ds.PatientAge = "054Y"
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator = "CT123", "99LOCAL"
        code.CodeMeaning = "CT chest"
        ds.ProcedureCodeSequence = Sequence([code])
    ds.StudyInstanceUID = study.uid
    ds.SeriesInstanceUID = series_uid(study, number)
    ds.StudyID = study.uid[-1]
    ds.SeriesNumber = number
    ds.InstanceNumber = index + 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = bytes(range(16))
    return ds


def archive_datasets() -> list[Dataset]:
    """Every instance of the test archive, the pydicom charset files included."""
    datasets = [
        _instance(study, series, index)
        for study in STUDIES
        for series in study.series
        for index in range(series[2])
    ]
    for name in CHARSET_FILES:
        ds = pydicom.dcmread(get_charset_files(name)[0])
        del ds.file_meta
        datasets.append(ds)
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ct.file_meta
    datasets.append(ct)
    return datasets


def charset_dataset(name: str) -> Dataset:
    """One of the pydicom charset files stored in the test archive."""
    return pydicom.dcmread(get_charset_files(name)[0])


async def store_all(port: int, datasets: list[Dataset], timeout: float = 300.0) -> list[int]:
    """Store data sets over one association with our client; return their statuses."""
    instances = [
        (
            str(ds.SOPClassUID),
            str(ds.SOPInstanceUID),
            ExplicitVRLittleEndian,
            dicom.encode(copy.copy(ds), ExplicitVRLittleEndian),
        )
        for ds in datasets
    ]
    return await store_encoded(port, "FINDTEST", instances, timeout)
