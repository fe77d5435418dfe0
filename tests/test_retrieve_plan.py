"""Retrieve identifiers (PS3.4 C.4.2.2.1), sub-operation counts and context choice, as units."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless

from minipacs import dataset as dicom
from minipacs.index.keys import PATIENT_ROOT, STUDY_ROOT
from minipacs.index.query import QueryError
from minipacs.index.retrieve import StoredInstance, plan_retrieve
from minipacs.net.negotiation import AcceptedContext
from minipacs.services.retrieve import PendingPacer
from minipacs.services.suboperations import FAILED_UIDS_MAX_BYTES, Counts, Target, proposals
from tests.qr_client import identifier

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize(
    ("model", "identifier", "level", "keys"),
    [
        (PATIENT_ROOT, identifier("PATIENT", PatientID="P_1%"), "PATIENT", {"PatientID"}),
        (STUDY_ROOT, identifier("STUDY", StudyInstanceUID=["1.2", "1.3"]), "STUDY", None),
        (
            PATIENT_ROOT,
            identifier("SERIES", PatientID="P", StudyInstanceUID="1.2", SeriesInstanceUID="1.3"),
            "SERIES",
            {"PatientID", "StudyInstanceUID", "SeriesInstanceUID"},
        ),
        # Keys other than the unique keys are no matching keys of a retrieve: ignored.
        (STUDY_ROOT, identifier("STUDY", StudyInstanceUID="1.2", PatientName="X*"), "STUDY", None),
    ],
)
def test_accepted_identifiers(
    model: object, identifier: Dataset, level: str, keys: set[str] | None
) -> None:
    plan = plan_retrieve(model, identifier)  # type: ignore[arg-type]
    assert plan.level == level
    assert {keyword for keyword, _ in plan.keys} == (keys or {"StudyInstanceUID"})


@pytest.mark.parametrize(
    ("model", "identifier", "offending"),
    [
        (STUDY_ROOT, identifier("STUDY"), 0x0020000D),
        (STUDY_ROOT, identifier("STUDY", StudyInstanceUID=""), 0x0020000D),
        (STUDY_ROOT, identifier("STUDY", StudyInstanceUID="1.2.*"), 0x0020000D),
        (STUDY_ROOT, identifier("PATIENT", PatientID="P"), 0x00080052),
        (STUDY_ROOT, identifier("SERIES", SeriesInstanceUID="1.3"), 0x0020000D),
        (
            STUDY_ROOT,
            identifier("SERIES", StudyInstanceUID=["1.2", "1.4"], SeriesInstanceUID="1.3"),
            0x0020000D,
        ),
        (PATIENT_ROOT, identifier("PATIENT", PatientID="P*"), 0x00100020),
        (PATIENT_ROOT, identifier("PATIENT", PatientID=["P1", "P2"]), 0x00100020),
        (PATIENT_ROOT, identifier("STUDY", StudyInstanceUID="1.2"), 0x00100020),
    ],
)
def test_refused_identifiers_name_the_offending_key(
    model: object, identifier: Dataset, offending: int
) -> None:
    with pytest.raises(QueryError) as caught:
        plan_retrieve(model, identifier)  # type: ignore[arg-type]
    assert caught.value.tag == offending


@pytest.mark.parametrize(
    ("results", "cancelled", "status"),
    [
        ([], False, 0x0000),
        ([0x0000, 0x0000], False, 0x0000),
        ([0x0000, 0xB007], False, 0xB000),
        ([0x0000, 0xA700], False, 0xB000),
        ([None, 0xA700], False, 0xA702),
        ([0x0000], True, 0xFE00),
    ],
)
def test_final_status(results: list[int | None], cancelled: bool, status: int) -> None:
    counts = Counts(len(results) + 1)
    for index, result in enumerate(results):
        counts.record(result, f"1.2.{index}")
    assert counts.final_status(cancelled) == status
    assert counts.remaining == 1
    assert len(counts.failed_uids) == counts.failed
    assert "NumberOfRemainingSuboperations" in counts.fields(final=True, cancelled=True)
    assert "NumberOfRemainingSuboperations" not in counts.fields(final=True)


def test_failed_uid_list_is_capped_to_what_explicit_vr_encodes() -> None:
    counts = Counts(3000)
    uids = [f"1.2.826.0.1.3680043.10.4321.9{index:035d}" for index in range(3000)]
    for uid in uids:
        counts.record(None, uid)
    assert counts.failed == 3000
    assert counts.failed_uids == uids[: len(counts.failed_uids)]
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = counts.failed_uids
    encoded = dicom.encode(ds, ExplicitVRLittleEndian)
    # Tag (4) + VR (2) + 16-bit length (2) + value: the value fits the 16-bit length.
    assert len(encoded) - 8 <= FAILED_UIDS_MAX_BYTES
    assert len(encoded) - 8 > FAILED_UIDS_MAX_BYTES - 2 * len(uids[0])


def test_pending_pacer_without_interval_reports_every_sub_operation() -> None:
    pacer = PendingPacer(0.0)
    assert [pacer.due(done, 5.0) for done in (1, 1, 2, 3)] == [True, False, True, True]


def test_pending_pacer_reports_the_first_then_at_most_once_an_interval() -> None:
    pacer = PendingPacer(0.1)
    # (sub-operations done, loop time): the first is due at once, then 0.1 s must pass.
    steps = [(1, 10.0), (2, 10.05), (3, 10.1), (3, 10.3), (4, 10.3), (5, 10.35)]
    assert [pacer.due(done, now) for done, now in steps] == [True, False, True, False, True, False]
    assert pacer.reported == 4


def test_proposals_offer_the_stored_syntax_then_uncompressed() -> None:
    summary = {(CT, JPEG2000Lossless): 2, (CT, ExplicitVRLittleEndian): 1}
    assert proposals(summary) == [
        (CT, [JPEG2000Lossless]),
        (CT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
    ]


def test_context_choice_prefers_the_stored_syntax() -> None:
    instance = StoredInstance(1, CT, "1.2.3", JPEG2000Lossless, "a/b.dcm", 10)
    uncompressed = AcceptedContext(3, CT, ImplicitVRLittleEndian, False, True)
    stored = AcceptedContext(1, CT, JPEG2000Lossless, False, True)
    no_role = AcceptedContext(5, CT, JPEG2000Lossless, True, False)
    assert Target(None, [uncompressed, stored], 1.0).context_for(instance) == (1, JPEG2000Lossless)
    assert Target(None, [no_role, uncompressed], 1.0).context_for(instance) == (
        3,
        ImplicitVRLittleEndian,
    )
    assert Target(None, [no_role], 1.0).context_for(instance) is None
