"""C-FIND end to end: pynetdicom and DCMTK findscu against the daemon, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind as PATIENT_ROOT,
)
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT,
)

from minipacs.index import schema
from minipacs.net.client import ClientAssociation
from minipacs.net.commands import C_FIND_RQ
from tests import find_data
from tests.dicom_tools import dcmtk, echoscu
from tests.find_data import BIG_SERIES_SIZE, ROOT, STUDIES
from tests.qr_client import connect, request_and_cancel
from tests.qr_client import identifier as query
from tests.servers import MinipacsProcess, start_minipacs

TIMEOUT = 30


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def pacs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MinipacsProcess]:
    """A daemon holding the test archive (tests/find_data.py), on each backend."""
    workdir = tmp_path_factory.mktemp(f"find-{request.param}")
    # Durability is not under test here: no fsync keeps the fixture quick.
    env = {"MINIPACS_STORAGE_MIN_FREE_BYTES": "0", "MINIPACS_STORAGE_FSYNC": "false"}
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres").create_database()
        schema.upgrade(url)
        env["MINIPACS_DATABASE_URL"] = url
    process = start_minipacs(workdir, env)
    statuses = asyncio.run(find_data.store_all(process.port, find_data.archive_datasets()))
    assert set(statuses) == {0}
    yield process
    process.stop()


def _ae() -> AE:
    ae = AE(ae_title="FINDSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.add_requested_context(STUDY_ROOT)
    ae.add_requested_context(PATIENT_ROOT)
    return ae


def find(
    port: int, identifier: Dataset, model: str = STUDY_ROOT, cancel_after: int | None = None
) -> tuple[list[Dataset], list[int], Dataset]:
    """Run one C-FIND; return the identifiers, the pending statuses and the final status."""
    assoc = _ae().associate("127.0.0.1", port, ae_title="MINIPACS")
    assert assoc.is_established
    found: list[Dataset] = []
    pending: list[int] = []
    final = Dataset()
    try:
        responses = assoc.send_c_find(identifier, model)
        for status, response in responses:
            assert status is not None, "no response before the DIMSE timeout"
            if status.Status in (0xFF00, 0xFF01):
                found.append(response)
                pending.append(status.Status)
                if cancel_after is not None and len(found) == cancel_after:
                    context = assoc._get_valid_context(model, "", "scu")
                    assoc.send_c_cancel(1, context.context_id)
            else:
                final = status
    finally:
        assoc.release()
    return found, pending, final


def studies(port: int, **keys: object) -> set[str]:
    """The Study Instance UIDs a Study Root STUDY query finds (asserting Success)."""
    found, _, final = find(port, query("STUDY", **{"StudyInstanceUID": "", **keys}))
    assert final.Status == 0x0000
    uids = [str(ds.StudyInstanceUID) for ds in found]
    assert len(uids) == len(set(uids)), "one response per study"
    return set(uids)


def series_instances(port: int, of: Dataset) -> set[str]:
    """The SOP Instance UIDs an IMAGE C-FIND finds in the series of `of` (asserting Success)."""
    found, _, final = find(
        port,
        query(
            "IMAGE",
            StudyInstanceUID=str(of.StudyInstanceUID),
            SeriesInstanceUID=str(of.SeriesInstanceUID),
            SOPInstanceUID="",
        ),
    )
    assert final.Status == 0
    return {str(ds.SOPInstanceUID) for ds in found}


def ours(*numbers: int) -> set[str]:
    """UIDs of the test studies by number."""
    return {f"{ROOT}.{n}" for n in numbers}


def only_ours(uids: set[str]) -> set[str]:
    """Keep the test studies of find_data.STUDIES, drop the pydicom files."""
    return {uid for uid in uids if uid.startswith(ROOT + ".")}


def test_universal_match_returns_every_study_once(pacs: MinipacsProcess) -> None:
    found, pending, final = find(
        pacs.port,
        query("STUDY", StudyInstanceUID="", PatientName="", NumberOfStudyRelatedInstances=""),
    )
    assert final.Status == 0
    assert set(pending) == {0xFF00}
    # 5 test studies, 4 charset files, CT_small: one response each, never one per instance.
    assert len(found) == len(STUDIES) + len(find_data.CHARSET_FILES) + 1
    counts = {str(ds.StudyInstanceUID): int(ds.NumberOfStudyRelatedInstances) for ds in found}
    assert counts[f"{ROOT}.1"] == 5
    assert counts[f"{ROOT}.5"] == BIG_SERIES_SIZE


def test_single_value_matching(pacs: MinipacsProcess) -> None:
    assert studies(pacs.port, PatientID="PID1") == ours(1)
    assert studies(pacs.port, PatientID="PID") == set()
    assert studies(pacs.port, AccessionNumber="ACC_2") == ours(2)


def test_sql_like_characters_are_literal(pacs: MinipacsProcess) -> None:
    # "%" and "_" are plain characters in DICOM: ACC%1 must not match ACCzz1, ACC_2 not ACCX2.
    assert studies(pacs.port, AccessionNumber="ACC%1") == ours(1)
    assert studies(pacs.port, AccessionNumber="ACC_*") == ours(2)
    assert studies(pacs.port, StudyDescription="CHEST_*") == ours(1)
    assert studies(pacs.port, PatientID="P_3%") == ours(3, 4)
    assert studies(pacs.port, PatientID="P?3%") == ours(3, 4)


def test_wildcards_and_case_insensitive_names(pacs: MinipacsProcess) -> None:
    assert studies(pacs.port, PatientName="doe*") == ours(1, 2)
    assert studies(pacs.port, PatientName="DOE^J?HN") == ours(1)
    assert studies(pacs.port, PatientName="Doe^John^^") == ours(1)
    assert studies(pacs.port, PatientName="*^ANNA") == ours(3, 4)
    assert studies(pacs.port, AccessionNumber="acc*") == set()  # only PN ignores case
    assert studies(pacs.port, PatientName="*") >= ours(1, 2, 3, 4, 5)


def test_date_ranges(pacs: MinipacsProcess) -> None:
    assert only_ours(studies(pacs.port, StudyDate="20240101-20240107")) == ours(1, 2)
    assert only_ours(studies(pacs.port, StudyDate="-20231231")) == ours(3, 5)
    assert only_ours(studies(pacs.port, StudyDate="20240108-")) == ours(4)
    assert only_ours(studies(pacs.port, StudyDate="20240105")) == ours(1)


def test_time_range_alone_and_combined_with_date(pacs: MinipacsProcess) -> None:
    assert only_ours(studies(pacs.port, StudyTime="0800-1030")) == ours(1, 2, 5)
    # Together they form one range: 2024-01-05 12:00 to 2024-01-07 09:00 takes study 2
    # (07th 08:30) and not study 1 (05th 10:15), though 10:15 and 08:30 both fall
    # outside "12:00-09:00" taken as a time range of its own.
    combined = studies(pacs.port, StudyDate="20240105-20240107", StudyTime="1200-0900")
    assert combined == ours(2)


def test_uid_list_matching(pacs: MinipacsProcess) -> None:
    assert studies(pacs.port, StudyInstanceUID=[f"{ROOT}.1", f"{ROOT}.3"]) == ours(1, 3)


def test_modalities_and_sop_classes_in_study(pacs: MinipacsProcess) -> None:
    assert only_ours(studies(pacs.port, ModalitiesInStudy="MR")) == ours(1)
    assert only_ours(studies(pacs.port, ModalitiesInStudy=["CT", "US"])) == ours(1, 2, 3, 5)
    found, _, _ = find(
        pacs.port,
        query("STUDY", StudyInstanceUID=f"{ROOT}.1", ModalitiesInStudy="", SOPClassesInStudy=""),
    )
    assert list(found[0].ModalitiesInStudy) == ["CT", "MR"]
    assert set(found[0].SOPClassesInStudy) == {find_data.CT_IMAGE, find_data.MR_IMAGE}


def test_series_and_image_levels(pacs: MinipacsProcess) -> None:
    found, _, final = find(
        pacs.port,
        query(
            "SERIES",
            StudyInstanceUID=f"{ROOT}.1",
            SeriesInstanceUID="",
            Modality="",
            NumberOfSeriesRelatedInstances="",
        ),
    )
    assert final.Status == 0
    assert {(ds.Modality, int(ds.NumberOfSeriesRelatedInstances)) for ds in found} == {
        ("CT", 3),
        ("MR", 2),
    }
    found, _, final = find(
        pacs.port,
        query(
            "IMAGE",
            StudyInstanceUID=f"{ROOT}.1",
            SeriesInstanceUID=f"{ROOT}.1.1",
            SOPInstanceUID="",
            InstanceNumber="",
            SOPClassUID="",
        ),
    )
    assert final.Status == 0
    assert sorted(int(ds.InstanceNumber) for ds in found) == [1, 2, 3]
    assert {str(ds.SOPInstanceUID) for ds in found} == {f"{ROOT}.1.1.{i}" for i in (1, 2, 3)}


def test_matching_kinds_below_the_study_level(pacs: MinipacsProcess) -> None:
    def series(**keys: object) -> set[str]:
        found, _, final = find(
            pacs.port,
            query("SERIES", **{"StudyInstanceUID": f"{ROOT}.1", "SeriesInstanceUID": "", **keys}),
        )
        assert final.Status == 0
        return {str(ds.SeriesInstanceUID) for ds in found}

    both = {f"{ROOT}.1.1", f"{ROOT}.1.2"}
    assert series(Modality="M?") == {f"{ROOT}.1.2"}
    assert series(SeriesDate="20240101-20240105") == both
    assert series(SeriesDate="20240106-") == set()
    assert series(SeriesNumber="2") == {f"{ROOT}.1.2"}
    assert series(SeriesInstanceUID=[f"{ROOT}.1.1", f"{ROOT}.9.9"]) == {f"{ROOT}.1.1"}

    def images(model: str = STUDY_ROOT, **keys: object) -> list[int]:
        found, _, final = find(
            pacs.port,
            query(
                "IMAGE",
                StudyInstanceUID=f"{ROOT}.1",
                SeriesInstanceUID=f"{ROOT}.1.1",
                InstanceNumber="",
                **keys,
            ),
            model,
        )
        assert final.Status == 0
        return sorted(int(ds.InstanceNumber) for ds in found)

    assert images(SOPInstanceUID=[f"{ROOT}.1.1.1", f"{ROOT}.1.1.3"]) == [1, 3]
    assert images(SOPClassUID=find_data.CT_IMAGE) == [1, 2, 3]
    assert images(SOPClassUID=find_data.MR_IMAGE) == []
    assert images(PATIENT_ROOT, PatientID="PID1", SOPInstanceUID=f"{ROOT}.1.1.2") == [2]


def test_patient_root_levels(pacs: MinipacsProcess) -> None:
    found, _, final = find(
        pacs.port,
        query("PATIENT", PatientName="DOE*", PatientID="", NumberOfPatientRelatedStudies=""),
        PATIENT_ROOT,
    )
    assert final.Status == 0
    assert {(str(ds.PatientID), int(ds.NumberOfPatientRelatedStudies)) for ds in found} == {
        ("PID1", 1),
        ("PID2", 1),
    }
    found, _, final = find(
        pacs.port, query("STUDY", PatientID="P_3%", StudyInstanceUID=""), PATIENT_ROOT
    )
    assert final.Status == 0
    assert {str(ds.StudyInstanceUID) for ds in found} == ours(3, 4)
    found, _, final = find(
        pacs.port,
        query(
            "SERIES",
            PatientID="PID1",
            StudyInstanceUID=f"{ROOT}.1",
            SeriesInstanceUID="",
        ),
        PATIENT_ROOT,
    )
    assert final.Status == 0 and len(found) == 2


@pytest.mark.parametrize(
    ("model", "identifier", "offending"),
    [
        (STUDY_ROOT, query("STUDY", StudyDate="2024-01-01x"), 0x00080020),
        (STUDY_ROOT, query("PATIENT", PatientID=""), 0x00080052),
        (STUDY_ROOT, query("", PatientID=""), 0x00080052),
        (STUDY_ROOT, query("NOSUCH", PatientID=""), 0x00080052),
        (STUDY_ROOT, query("SERIES", SeriesInstanceUID=""), 0x0020000D),
        (STUDY_ROOT, query("SERIES", StudyInstanceUID=f"{ROOT}.*"), 0x0020000D),
        (PATIENT_ROOT, query("STUDY", StudyInstanceUID=""), 0x00100020),
        (PATIENT_ROOT, query("IMAGE", PatientID="PID1", StudyInstanceUID=f"{ROOT}.1"), 0x0020000E),
    ],
)
def test_bad_identifiers_fail_with_a900(
    pacs: MinipacsProcess, model: str, identifier: Dataset, offending: int
) -> None:
    found, _, final = find(pacs.port, identifier, model)
    assert found == []
    assert final.Status == 0xA900
    assert final.ErrorComment
    assert final.OffendingElement == offending


async def _find_association(port: int) -> ClientAssociation:
    """An association for raw Study Root C-FINDs."""
    return await connect(port, "FINDSCU", [(STUDY_ROOT, [ExplicitVRLittleEndian])])


async def _raw_find(port: int, identifier: bytes) -> list[int]:
    """Send a C-FIND of raw identifier bytes with our client; the statuses, with comments."""
    async with asyncio.timeout(TIMEOUT):
        async with await _find_association(port) as assoc:
            command = {
                "CommandField": C_FIND_RQ,
                "AffectedSOPClassUID": STUDY_ROOT,
                "Priority": 0,
                "CommandDataSetType": 1,
            }
            context_id = assoc.context_for(STUDY_ROOT)
            responses = [r.command async for r in assoc.request(context_id, command, identifier)]
        assert responses[-1].get("ErrorComment") or responses[-1]["Status"] == 0
        return [int(r["Status"]) for r in responses]  # type: ignore[call-overload]


async def _find_and_cancel(port: int, identifier: Dataset) -> list[int]:
    """C-FIND, then C-CANCEL right behind it; every status."""
    async with asyncio.timeout(TIMEOUT):
        async with await _find_association(port) as assoc:
            command = {"CommandField": C_FIND_RQ}
            # Right after the request, so that the whole stream cannot go out before it.
            responses = await request_and_cancel(
                assoc, STUDY_ROOT, command, identifier, at_once=True
            )
        return [int(r["Status"]) for r in responses]  # type: ignore[call-overload]


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH", group, element) + vr + struct.pack("<H", len(value)) + value


@pytest.mark.parametrize(
    ("case", "identifier", "status"),
    [
        (
            "integer key that is no integer",
            _element(0x0008, 0x0052, b"CS", b"SERIES")
            + _element(0x0020, 0x000D, b"UI", f"{ROOT}.1\0".encode())
            + _element(0x0020, 0x0011, b"IS", b"x "),
            0xA900,
        ),
        ("truncated identifier", _element(0x0008, 0x0052, b"CS", b"STUDY")[:-3], 0xC000),
        # Found by tests/test_fuzz.py: pydicom raised NotImplementedError on first access.
        (
            "unknown VR",
            _element(0x0008, 0x0052, b"CS", b"STUDY ") + _element(0x0020, 0x000E, b"AI", b""),
            0xC000,
        ),
        ("no elements", b"", 0xA900),
    ],
)
def test_undecodable_identifiers_get_a_failure_status(
    pacs: MinipacsProcess, case: str, identifier: bytes, status: int
) -> None:
    assert asyncio.run(_raw_find(pacs.port, identifier)) == [status], case
    assert echoscu(pacs.port) == 0


def test_retired_patient_study_only_model_is_refused(pacs: MinipacsProcess) -> None:
    ae = AE(ae_title="FINDSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.add_requested_context("1.2.840.10008.5.1.4.1.2.3.1")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", pacs.port, ae_title="MINIPACS")
    assert assoc.is_established
    accepted = {context.abstract_syntax for context in assoc.accepted_contexts}
    assoc.release()
    assert accepted == {"1.2.840.10008.1.1"}


def test_keys_not_in_the_index_match_and_return_from_the_header(pacs: MinipacsProcess) -> None:
    found, _, final = find(
        pacs.port,
        query(
            "SERIES",
            StudyInstanceUID=f"{ROOT}.1",
            SeriesInstanceUID="",
            InstitutionName="GENERAL*",
            Manufacturer="",
        ),
    )
    assert final.Status == 0 and len(found) == 2
    assert {ds.InstitutionName for ds in found} == {"GENERAL HOSPITAL"}
    assert all(ds.Manufacturer == "" for ds in found)  # requested, absent: empty
    assert only_ours(studies(pacs.port, PatientAge="054Y")) == ours(1)
    assert only_ours(studies(pacs.port, PatientAge="099Y")) == set()
    found, _, _ = find(pacs.port, query("STUDY", StudyInstanceUID=f"{ROOT}.1", PatientAge=""))
    assert found[0].PatientAge == "054Y"


def test_sequence_matching(pacs: MinipacsProcess) -> None:
    item = Dataset()
    item.CodeValue = "CT123"
    item.CodeMeaning = ""
    ds = query("STUDY", StudyInstanceUID="", ProcedureCodeSequence=Sequence([item]))
    found, _, final = find(pacs.port, ds)
    assert final.Status == 0
    assert [str(d.StudyInstanceUID) for d in found] == [f"{ROOT}.1"]
    returned = found[0].ProcedureCodeSequence[0]
    assert returned.CodeValue == "CT123" and returned.CodeMeaning == "CT chest"
    assert "CodingSchemeDesignator" not in returned  # only the sub-keys asked for
    item.CodeValue = "NOPE"
    assert find(pacs.port, ds)[0] == []


def test_key_below_the_level_is_flagged_ff01_and_returned_empty(pacs: MinipacsProcess) -> None:
    found, pending, final = find(
        pacs.port, query("STUDY", StudyInstanceUID=f"{ROOT}.2", SOPInstanceUID="1.2.3")
    )
    assert final.Status == 0
    assert pending == [0xFF01]
    assert found[0].SOPInstanceUID == ""


def test_no_match_is_success_without_pending(pacs: MinipacsProcess) -> None:
    found, pending, final = find(pacs.port, query("STUDY", PatientID="NOBODY"))
    assert (found, pending, final.Status) == ([], [], 0)


def test_non_ascii_names_in_their_character_sets(pacs: MinipacsProcess) -> None:
    french = find_data.charset_dataset("chrFren.dcm")
    latin1 = query("STUDY", StudyInstanceUID="", PatientName="Buc^Jérôme")
    latin1.SpecificCharacterSet = "ISO_IR 100"
    found, _, final = find(pacs.port, latin1)
    assert final.Status == 0
    assert [str(ds.StudyInstanceUID) for ds in found] == [french.StudyInstanceUID]
    assert found[0].SpecificCharacterSet == "ISO_IR 100"
    assert str(found[0].PatientName) == "Buc^Jérôme"
    # The same name asked for in UTF-8, case folded.
    utf8 = query("STUDY", StudyInstanceUID="", PatientName="BUC^JÉRÔME")
    utf8.SpecificCharacterSet = "ISO_IR 192"
    found, _, _ = find(pacs.port, utf8)
    assert [str(ds.PatientName) for ds in found] == ["Buc^Jérôme"]
    # A Japanese name stored in ISO 2022 IR 87, found by its alphabetic group alone and by
    # its ideographic group; returned in UTF-8 to a client that named no character set.
    japanese = find_data.charset_dataset("chrH31.dcm")
    for name in ("Yamada^Tarou", "=山田^太郎", "yamada*"):
        ds = query("STUDY", StudyInstanceUID="", PatientName=name)
        if not name.isascii():
            ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
        found, _, _ = find(pacs.port, ds)
        assert [str(d.StudyInstanceUID) for d in found] == [japanese.StudyInstanceUID], name
        assert str(found[0].PatientName) == str(japanese.PatientName)
    assert found[0].SpecificCharacterSet == "ISO_IR 192"
    korean = query("STUDY", StudyInstanceUID="", PatientName="Hong^Gildong")
    korean.SpecificCharacterSet = ["", "ISO 2022 IR 149"]
    found, _, _ = find(pacs.port, korean)
    assert str(found[0].PatientName) == "Hong^Gildong=洪^吉洞=홍^길동"
    assert list(found[0].SpecificCharacterSet) == ["", "ISO 2022 IR 149"]


def test_cancel_stops_the_stream(pacs: MinipacsProcess) -> None:
    identifier = query(
        "IMAGE",
        StudyInstanceUID=f"{ROOT}.5",
        SeriesInstanceUID=f"{ROOT}.5.1",
        SOPInstanceUID="",
    )
    found, _, final = find(pacs.port, identifier)
    assert final.Status == 0 and len(found) == BIG_SERIES_SIZE
    statuses = asyncio.run(_find_and_cancel(pacs.port, identifier))
    assert statuses[-1] == 0xFE00
    assert len(statuses) - 1 < BIG_SERIES_SIZE
    assert echoscu(pacs.port) == 0


def test_result_cap_ends_with_out_of_resources(pacs: MinipacsProcess, tmp_path: Path) -> None:
    capped = start_minipacs(
        tmp_path,
        {
            "MINIPACS_DATABASE_URL": pacs.database_url,
            "MINIPACS_STORAGE_PATH": str(pacs.workdir / "store"),
            "MINIPACS_QUERY_MAX_RESULTS": "3",
            "MINIPACS_DATABASE_AUTO_UPGRADE": "false",
        },
    )
    try:
        found, _, final = find(capped.port, query("STUDY", StudyInstanceUID=""))
        assert len(found) == 3
        assert final.Status == 0xA700 and "3" in final.ErrorComment
        assert len(find(capped.port, query("STUDY", PatientID="PID1"))[0]) == 1
    finally:
        capped.stop()


def _findscu(port: int, out: Path, *keys: str, model: str = "-S") -> list[Dataset]:
    out.mkdir(exist_ok=True)
    result = dcmtk(
        "findscu",
        "-to", "10", "-ta", "10", "-td", "30",
        model,
        "-aet", "FINDSCU", "-aec", "MINIPACS",
        "-X", "-od", str(out),
        *(arg for key in keys for arg in ("-k", key)),
        "127.0.0.1", str(port),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [pydicom.dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]


def test_dcmtk_findscu(pacs: MinipacsProcess, tmp_path: Path) -> None:
    found = _findscu(
        pacs.port,
        tmp_path / "a",
        "QueryRetrieveLevel=STUDY",
        "PatientName=DOE*",
        "StudyDate=20240101-",
        "StudyInstanceUID",
        "ModalitiesInStudy",
    )
    assert {str(ds.StudyInstanceUID) for ds in found} == ours(1, 2)
    found = _findscu(
        pacs.port,
        tmp_path / "b",
        "QueryRetrieveLevel=SERIES",
        "PatientID=PID1",
        f"StudyInstanceUID={ROOT}.1",
        "SeriesInstanceUID",
        "Modality=MR",
        model="-P",
    )
    assert [ds.Modality for ds in found] == ["MR"]


def test_logs_name_no_patient(pacs: MinipacsProcess) -> None:
    # Privacy: stores and queries are logged (INFO) without names or patient IDs.
    assert studies(pacs.port, PatientName="Doe^John", PatientID="PID1") == ours(1)
    log = pacs.log_text()
    assert '"dimse.operation"' in log and '"C-FIND-RQ"' in log
    for value in ("DOE^JOHN", "Doe^John", "PID1", "SMITH^ANNA", "Jérôme"):
        assert value not in log
