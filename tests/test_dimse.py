"""Reassembly of DIMSE messages from PDVs, its rules, spooling, and fragmentation."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from minipacs.net import pdu
from minipacs.net.commands import encode_command
from minipacs.net.dimse import (
    DataSet,
    MessageAssembler,
    encode_fragments,
    fragment_size,
    frame_dataset,
)

STORE = encode_command(
    {
        "CommandField": 0x0001,
        "MessageID": 1,
        "AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
        "AffectedSOPInstanceUID": "1.2.3",
        "CommandDataSetType": 0x0001,
        "Priority": 0,
    }
)
ECHO = encode_command({"CommandField": 0x0030, "MessageID": 2, "CommandDataSetType": 0x0101})


def _pdvs(context_id: int, data: bytes, command: bool, size: int) -> list[pdu.Pdv]:
    parts = list(encode_fragments(context_id, data, command, size))
    raws = [bytes(parts[i]) + bytes(parts[i + 1]) for i in range(0, len(parts), 2)]
    return [item for raw in raws for item in pdu.parse_pdata(raw)]


def test_message_with_dataset_reassembles() -> None:
    assembler = MessageAssembler({1}, spool_threshold=1 << 20, max_dataset_size=1 << 32)
    dataset = bytes(range(256)) * 40
    assert assembler.feed(_pdvs(1, STORE, True, 16)) == []
    messages = assembler.feed(_pdvs(1, dataset, False, 1000))
    assert len(messages) == 1
    assert messages[0].command["AffectedSOPInstanceUID"] == "1.2.3"
    assert messages[0].dataset is not None
    assert messages[0].dataset.getvalue() == dataset


def test_large_dataset_spills_to_disk(tmp_path: Path) -> None:
    assembler = MessageAssembler({1}, spool_threshold=4096, max_dataset_size=1 << 32)
    dataset = b"\x01\x02" * 50_000
    assembler.feed(_pdvs(1, STORE, True, 1000))
    spilled = 0
    message = None
    for pdv in _pdvs(1, dataset, False, 1000):
        done = assembler.feed([pdv])
        pending = assembler.needs_spill
        if pending is not None:
            pending.spill(tmp_path)
            spilled += 1
            assert pending.pending_bytes == 0
        if done:
            message = done[0]
    assert spilled > 10
    assert message is not None and message.dataset is not None
    assert message.dataset.spool_path is not None
    assert message.dataset.getvalue() == dataset
    message.dataset.discard()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "steps",
    [
        [(3, STORE, True)],  # context not accepted
        [(1, b"\x00\x00", False)],  # data before command
        [(1, ECHO, True), (1, b"\x00\x00", False)],  # data after a command with none
        [(1, STORE[:10], True, False), (5, STORE[10:], True)],  # context switch mid-message
    ],
)
def test_protocol_violations_are_refused(steps: list[tuple]) -> None:
    assembler = MessageAssembler({1, 5}, spool_threshold=1 << 20, max_dataset_size=1 << 32)
    with pytest.raises(pdu.PduError):
        for step in steps:
            context_id, data, command, *last = step
            is_last = last[0] if last else True
            raw = pdu.pdata_header(context_id, command, is_last, len(data)) + data
            assembler.feed(pdu.parse_pdata(raw))


def test_fragments_are_even_and_within_peer_limit() -> None:
    size = fragment_size(16385, 1 << 22)
    assert size % 2 == 0 and size + 6 <= 16385
    assert fragment_size(0, 1 << 20) == (1 << 20) - 6
    parts = list(encode_fragments(1, b"x" * 5, False, 4))
    lengths = [len(p) for p in parts[1::2]]
    assert lengths == [4, 2]
    assert bytes(parts[-1]) == b"x\0"


@pytest.mark.parametrize("size", [0, 10, 16378, 16379 * 3 + 1])
def test_framed_dataset_is_what_send_message_would_send(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    framed = frame_dataset(3, data, 16378)
    assert (framed.context_id, framed.max_fragment) == (3, 16378)
    assert [bytes(pdu) for pdu in framed.pdus] == [
        bytes(pdu) for pdu in encode_fragments(3, data, False, 16378)
    ]


def test_small_fragments_of_big_pdus_do_not_keep_the_pdus_alive() -> None:
    dataset = DataSet()
    tracemalloc.start()
    try:
        for _ in range(100):
            big = bytes(64 * 1024)
            dataset.append(memoryview(big)[:1])
            dataset.append(memoryview(big)[:0])
            del big
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Views would pin 100 PDUs of 64 KiB; copies hold 100 bytes and their objects.
    assert held < 64 * 1024
    assert dataset.size == 100
    assert dataset.getvalue() == bytes(100)
