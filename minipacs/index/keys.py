"""C-FIND keys: which level each attribute belongs to and where the index holds it.

Levels and unique keys come from PS3.4 C.6.1.1 (Patient Root) and C.6.2.1 (Study Root).
A key the index has a column for is matched in SQL; any other key is answered from the
stored header of the entity (PS3.4 C.6.1.1: "all other attributes" of each level are
optional keys), and an attribute this table does not place is an instance-level one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from minipacs.index.models import Instance, Patient, Series, Study

PATIENT: Final = "PATIENT"
STUDY: Final = "STUDY"
SERIES: Final = "SERIES"
IMAGE: Final = "IMAGE"
LEVELS: Final = (PATIENT, STUDY, SERIES, IMAGE)
TABLES: Final = {PATIENT: Patient, STUDY: Study, SERIES: Series, IMAGE: Instance}
# The key that identifies one entity of each level (PS3.4 C.6.1.1.1).
UNIQUE_KEYS: Final = {
    PATIENT: "PatientID",
    STUDY: "StudyInstanceUID",
    SERIES: "SeriesInstanceUID",
    IMAGE: "SOPInstanceUID",
}


@dataclass(frozen=True)
class InformationModel:
    """A Q/R information model: its FIND SOP class and the levels it has, top first."""

    name: str
    find_uid: str
    move_uid: str
    get_uid: str
    levels: tuple[str, ...]

    def level_of(self, key_level: str) -> str:
        """The level a key sits at in this model (Study Root folds patient keys into STUDY)."""
        return key_level if key_level in self.levels else self.levels[0]


# SOP Class UIDs of PS3.4 C.6.1.1 (Patient Root) and C.6.2.1 (Study Root): FIND, MOVE, GET.
PATIENT_ROOT: Final = InformationModel(
    "Patient Root",
    "1.2.840.10008.5.1.4.1.2.1.1",
    "1.2.840.10008.5.1.4.1.2.1.2",
    "1.2.840.10008.5.1.4.1.2.1.3",
    (PATIENT, STUDY, SERIES, IMAGE),
)
STUDY_ROOT: Final = InformationModel(
    "Study Root",
    "1.2.840.10008.5.1.4.1.2.2.1",
    "1.2.840.10008.5.1.4.1.2.2.2",
    "1.2.840.10008.5.1.4.1.2.2.3",
    (STUDY, SERIES, IMAGE),
)
FIND_MODELS: Final = {model.find_uid: model for model in (PATIENT_ROOT, STUDY_ROOT)}
MOVE_MODELS: Final = {model.move_uid: model for model in (PATIENT_ROOT, STUDY_ROOT)}
GET_MODELS: Final = {model.get_uid: model for model in (PATIENT_ROOT, STUDY_ROOT)}


@dataclass(frozen=True)
class Key:
    """Where the index holds one attribute: a column, a count, or only the header."""

    keyword: str
    level: str
    # "column" (matched in SQL), "integer" (an int column), "modalities", "sop_classes",
    # or "header" (matched and returned from the stored header).
    source: str
    column: Any = None
    # PN: the upper-case normalised column used for case-insensitive matching.
    folded: Any = None


def _column(keyword: str, level: str, column: Any, folded: Any = None) -> Key:
    return Key(keyword, level, "column", column, folded)


def _integer(keyword: str, level: str, column: Any) -> Key:
    return Key(keyword, level, "integer", column)


_KEYS: Final = (
    _column("PatientName", PATIENT, Patient.patient_name, Patient.patient_name_norm),
    _column("PatientID", PATIENT, Patient.patient_id),
    _column("IssuerOfPatientID", PATIENT, Patient.issuer),
    _column("PatientBirthDate", PATIENT, Patient.birth_date),
    _column("PatientSex", PATIENT, Patient.sex),
    _integer("NumberOfPatientRelatedStudies", PATIENT, Patient.num_studies),
    _integer("NumberOfPatientRelatedSeries", PATIENT, Patient.num_series),
    _integer("NumberOfPatientRelatedInstances", PATIENT, Patient.num_instances),
    _column("StudyInstanceUID", STUDY, Study.study_uid),
    _column("StudyDate", STUDY, Study.study_date),
    _column("StudyTime", STUDY, Study.study_time),
    _column("AccessionNumber", STUDY, Study.accession_number),
    _column("StudyID", STUDY, Study.study_id),
    _column("StudyDescription", STUDY, Study.description),
    _column("ReferringPhysicianName", STUDY, Study.referring_name, Study.referring_name_norm),
    Key("ModalitiesInStudy", STUDY, "modalities", Study.modalities),
    Key("SOPClassesInStudy", STUDY, "sop_classes"),
    _integer("NumberOfStudyRelatedSeries", STUDY, Study.num_series),
    _integer("NumberOfStudyRelatedInstances", STUDY, Study.num_instances),
    _column("SeriesInstanceUID", SERIES, Series.series_uid),
    _column("Modality", SERIES, Series.modality),
    _integer("SeriesNumber", SERIES, Series.series_number),
    _column("SeriesDescription", SERIES, Series.description),
    _column("BodyPartExamined", SERIES, Series.body_part),
    _column("SeriesDate", SERIES, Series.series_date),
    _column("SeriesTime", SERIES, Series.series_time),
    _integer("NumberOfSeriesRelatedInstances", SERIES, Series.num_instances),
    _column("SOPInstanceUID", IMAGE, Instance.sop_uid),
    _column("SOPClassUID", IMAGE, Instance.sop_class_uid),
    _integer("InstanceNumber", IMAGE, Instance.instance_number),
    _integer("NumberOfFrames", IMAGE, Instance.number_of_frames),
    _integer("Rows", IMAGE, Instance.rows),
    _integer("Columns", IMAGE, Instance.columns),
    _column("AvailableTransferSyntaxUID", IMAGE, Instance.transfer_syntax),
)

# Attributes without a column whose level is not the instance: PS3.4 C.6.1.1.2-C.6.1.1.4
# tables and the Patient, Study, Series and Equipment modules of PS3.3.
_HEADER_LEVELS: Final = {
    PATIENT: (
        "PatientBirthTime",
        "OtherPatientIDsSequence",
        "OtherPatientNames",
        "EthnicGroup",
        "PatientComments",
        "PatientSpeciesDescription",
        "PatientBreedDescription",
        "ResponsiblePerson",
        "PatientIdentityRemoved",
        "IssuerOfPatientIDQualifiersSequence",
    ),
    STUDY: (
        "NameOfPhysiciansReadingStudy",
        "AdmittingDiagnosesDescription",
        "PatientAge",
        "PatientSize",
        "PatientWeight",
        "Occupation",
        "AdditionalPatientHistory",
        "OtherStudyNumbers",
        "ProcedureCodeSequence",
        "ReferencedStudySequence",
        "ReferencedPatientSequence",
        "IssuerOfAccessionNumberSequence",
        "PhysiciansOfRecord",
        "RequestingPhysician",
        "StudyComments",
        "ReasonForPerformedProcedureCodeSequence",
    ),
    SERIES: (
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
        "PerformedProcedureStepID",
        "PerformedProcedureStepDescription",
        "RequestAttributesSequence",
        "ReferencedPerformedProcedureStepSequence",
        "Laterality",
        "ProtocolName",
        "OperatorsName",
        "PerformingPhysicianName",
        "Manufacturer",
        "ManufacturerModelName",
        "InstitutionName",
        "InstitutionalDepartmentName",
        "StationName",
        "DeviceSerialNumber",
        "SoftwareVersions",
        "FrameOfReferenceUID",
    ),
}

_BY_TAG: Final = {int(tag_for_keyword(key.keyword)): key for key in _KEYS}  # type: ignore[arg-type]
_HEADER_LEVEL_BY_TAG: Final = {
    int(tag_for_keyword(keyword)): level  # type: ignore[arg-type]
    for level, keywords in _HEADER_LEVELS.items()
    for keyword in keywords
}


def indexed_keys() -> tuple[Key, ...]:
    """Every key the index holds as a column or computes, in level order."""
    return _KEYS


def key_for(tag: int) -> Key:
    """The index's knowledge of one attribute: a column, a computed value, or the header."""
    known = _BY_TAG.get(tag)
    if known is not None:
        return known
    keyword = keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    return Key(keyword, _HEADER_LEVEL_BY_TAG.get(tag, IMAGE), "header")


def dictionary_vr(tag: int) -> str:
    """The VR the data dictionary gives a tag, UN when it knows none (private tags)."""
    try:
        return str(dictionary_VR(tag)).split(" ")[0]
    except KeyError:
        return "UN"
