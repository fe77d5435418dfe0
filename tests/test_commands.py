"""The DIMSE command codec produces the same bytes as pynetdicom's and refuses bad input."""

from __future__ import annotations

from io import BytesIO

import pytest
from pynetdicom.dimse_messages import C_ECHO_RSP, C_FIND_RQ, C_MOVE_RSP, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_MOVE, C_STORE

from minipacs.net.commands import CommandError, decode_command, encode_command

CT = "1.2.840.10008.5.1.4.1.1.2"


def _pynetdicom_bytes(message_class: type, primitive: object) -> bytes:
    message = message_class()
    message.primitive_to_message(primitive)
    pdvs = []
    for pdata in message.encode_msg(1, 0):
        pdvs.extend(pdata.presentation_data_value_list)
    # Each PDV is (context id, control header + data); keep the command fragments.
    return b"".join(pdv[1][1:] for pdv in pdvs if pdv[1][0] & 0x01)


def test_echo_response_matches_pynetdicom() -> None:
    primitive = C_ECHO()
    primitive.MessageIDBeingRespondedTo = 7
    primitive.AffectedSOPClassUID = "1.2.840.10008.1.1"
    primitive.Status = 0x0000
    ours = encode_command(
        {
            "CommandField": 0x8030,
            "MessageIDBeingRespondedTo": 7,
            "AffectedSOPClassUID": "1.2.840.10008.1.1",
            "CommandDataSetType": 0x0101,
            "Status": 0,
        }
    )
    assert ours == _pynetdicom_bytes(C_ECHO_RSP, primitive)


def test_store_request_matches_pynetdicom() -> None:
    primitive = C_STORE()
    primitive.MessageID = 12
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = "1.2.3.4.5"
    primitive.Priority = 0
    primitive.MoveOriginatorApplicationEntityTitle = "WORKSTATION"
    primitive.MoveOriginatorMessageID = 3
    primitive.DataSet = BytesIO(b"\x00" * 4)
    ours = encode_command(
        {
            "CommandField": 0x0001,
            "MessageID": 12,
            "AffectedSOPClassUID": CT,
            "AffectedSOPInstanceUID": "1.2.3.4.5",
            "Priority": 0,
            "CommandDataSetType": 0x0001,
            "MoveOriginatorApplicationEntityTitle": "WORKSTATION",
            "MoveOriginatorMessageID": 3,
        }
    )
    theirs = _pynetdicom_bytes(C_STORE_RQ, primitive)
    assert decode_command(ours) == decode_command(theirs)
    assert ours == theirs


def test_find_and_move_round_trip() -> None:
    find = C_FIND()
    find.MessageID = 1
    find.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"
    find.Priority = 2
    find.Identifier = BytesIO(b"\x00" * 2)
    decoded = decode_command(_pynetdicom_bytes(C_FIND_RQ, find))
    assert decoded["CommandField"] == 0x0020
    assert decoded["Priority"] == 2
    assert encode_command(decoded) == _pynetdicom_bytes(C_FIND_RQ, find)

    move = C_MOVE()
    move.MessageIDBeingRespondedTo = 5
    move.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.2"
    move.Status = 0xFF00
    move.NumberOfRemainingSuboperations = 10
    move.NumberOfCompletedSuboperations = 2
    move.NumberOfFailedSuboperations = 1
    move.NumberOfWarningSuboperations = 0
    theirs = _pynetdicom_bytes(C_MOVE_RSP, move)
    assert encode_command(decode_command(theirs)) == theirs


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\x00\x00\x01",  # truncated element header
        b"\x00\x00\x00\x01\xff\x00\x00\x00\x01",  # length overruns
        b"\x08\x00\x18\x00\x02\x00\x00\x001\x00",  # element outside group 0000
        b"\x00\x00\x10\x01\x02\x00\x00\x00\x01\x00",  # no Command Field
        b"\x00\x00\x00\x01\x03\x00\x00\x00abc",  # US of length 3
    ],
)
def test_bad_command_sets_are_refused(raw: bytes) -> None:
    with pytest.raises(CommandError):
        decode_command(raw)


def test_odd_values_are_padded() -> None:
    raw = encode_command({"CommandField": 0x0030, "AffectedSOPClassUID": "1.2.3"})
    assert len(raw) % 2 == 0
    assert decode_command(raw)["AffectedSOPClassUID"] == "1.2.3"
