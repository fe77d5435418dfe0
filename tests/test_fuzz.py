"""Property-based fuzzing (hypothesis) of what peers control: PDUs, data sets, identifiers.

Each target may refuse its input only in the documented way (an A-ABORT or reject for the
association, DataSetError for a data set, QueryError for a C-FIND identifier); any other
exception would be a crash the server turns into a processing failure or worse. Inputs
are random bytes and mutations of valid messages, bounded in number (CI runs them all).
"""

from __future__ import annotations

import contextlib
import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.pdu_primitives import A_ASSOCIATE

from minipacs import dataset as dicom
from minipacs.index.keys import PATIENT_ROOT, STUDY_ROOT
from minipacs.index.query import QueryError, plan_find
from minipacs.net import negotiation as neg
from minipacs.net import pdu
from minipacs.net.association import Aborted, AssociateRequested, Association, Limits

# Random inputs on a developer's machine, where a new crash is found and turned into a
# regression test; the same fixed sequence in CI (CI=true), so a run there is repeatable.
FUZZ = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=bool(os.environ.get("CI")),
)


def _associate_rq() -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = neg.APPLICATION_CONTEXT_NAME
    primitive.calling_ae_title = "FUZZER"
    primitive.called_ae_title = "MINIPACS"
    primitive.presentation_context_definition_list = neg.build_requested_contexts(
        [
            (neg.VERIFICATION, [ImplicitVRLittleEndian]),
            (STUDY_ROOT.find_uid, [ExplicitVRLittleEndian]),
        ]
    )
    primitive.user_information = neg.user_information_request(16384, {})
    return pdu.encode_associate_rq(primitive)


VALID_RQ = _associate_rq()


def _mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    """A valid message with bytes flipped, cut short, or with junk spliced in."""
    flips = st.lists(
        st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)), min_size=1, max_size=8
    )

    def flip(changes: list[tuple[int, int]]) -> bytes:
        data = bytearray(valid)
        for index, value in changes:
            data[index] = value
        return bytes(data)

    return st.one_of(
        flips.map(flip),
        st.integers(0, len(valid)).map(lambda n: valid[:n]),
        st.tuples(st.integers(0, len(valid)), st.binary(max_size=64)).map(
            lambda cut: valid[: cut[0]] + cut[1] + valid[cut[0] :]
        ),
    )


def _drive_acceptor(chunks: list[bytes]) -> None:
    """Feed an acceptor; answer any association request as the server would (accept)."""
    association = Association(requestor=False, limits=Limits(max_pdu_length=16384))
    association.connection_made()
    for chunk in chunks:
        if association.finished:
            return
        for event in association.receive_data(chunk):
            # As the server (Session._handle): answered only while still awaited.
            if isinstance(event, AssociateRequested) and association.awaiting_response:
                association.reject(*neg.REJECT_NO_REASON)
            assert not isinstance(event, Aborted) or event.detail is not None
        association.data_to_send()


@FUZZ
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=5))
def test_acceptor_survives_random_bytes(chunks: list[bytes]) -> None:
    _drive_acceptor(chunks)


@FUZZ
@given(_mutations(VALID_RQ), st.integers(1, 64))
def test_acceptor_survives_mutated_associate_requests(data: bytes, split: int) -> None:
    _drive_acceptor([data[i : i + split] for i in range(0, len(data), split)] or [b""])


def _identifier() -> bytes:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.PatientName = "DOE^J*"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.StudyDate = "20240101-20240131"
    ds.SeriesInstanceUID = ""
    ds.Modality = "CT"
    return dicom.encode(ds, ExplicitVRLittleEndian)


VALID_IDENTIFIER = _identifier()


def _plan(raw: bytes) -> None:
    try:
        identifier = dicom.inspect(raw, ExplicitVRLittleEndian, dicom.ALL_TAGS).dataset
    except dicom.DataSetError:
        return
    for model in (STUDY_ROOT, PATIENT_ROOT):
        with contextlib.suppress(QueryError):
            plan_find(model, identifier)


@FUZZ
@given(_mutations(VALID_IDENTIFIER))
def test_find_identifiers_fail_only_with_documented_errors(raw: bytes) -> None:
    _plan(raw)


@FUZZ
@given(st.binary(max_size=200))
def test_data_sets_fail_only_with_data_set_errors(raw: bytes) -> None:
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, "1.2.840.10008.1.2.1.99"):
        with contextlib.suppress(dicom.DataSetError):
            dicom.inspect(raw, syntax, dicom.ALL_TAGS)


def _text_element(group: int, element: int, vr: str, value: str) -> bytes:
    raw = value.encode("latin-1", "replace")
    raw += b" " * (len(raw) % 2)
    return struct.pack("<HH2sH", group, element, vr.encode(), len(raw)) + raw


@FUZZ
@given(
    st.sampled_from(["PATIENT", "STUDY", "SERIES", "IMAGE", "", "X"]),
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    (0x0010, 0x0010, "PN"),
                    (0x0010, 0x0020, "LO"),
                    (0x0008, 0x0020, "DA"),
                    (0x0008, 0x0030, "TM"),
                    (0x0020, 0x000D, "UI"),
                    (0x0020, 0x000E, "UI"),
                    (0x0020, 0x0011, "IS"),
                    (0x0008, 0x0061, "CS"),
                    (0x0008, 0x002A, "DT"),
                ]
            ),
            st.text(alphabet="0123456789.-*?^=\\ ABCabc%_", max_size=24),
        ),
        max_size=6,
        unique_by=lambda item: item[0],
    ),
)
def test_find_identifiers_with_random_values(
    level: str, keys: list[tuple[tuple[int, int, str], str]]
) -> None:
    elements = [(0x0008, 0x0052, "CS", level), *((g, e, vr, v) for (g, e, vr), v in keys)]
    raw = b"".join(_text_element(*item) for item in sorted(elements))
    _plan(raw)
