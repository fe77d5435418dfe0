"""PDU framing and the P-DATA-TF codec, against pynetdicom's encoders."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ, A_RELEASE_RP, A_RELEASE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import A_ASSOCIATE, A_P_ABORT, A_RELEASE, P_DATA

from minipacs.net import pdu


def _reader() -> pdu.PduReader:
    return pdu.PduReader(max_pdata_length=16384, max_associate_length=65536)


def test_pdata_round_trip_matches_pynetdicom() -> None:
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[3, b"\x03" + b"abcd"], [3, b"\x00" + b"ef"]]
    theirs = P_DATA_TF()
    theirs.from_primitive(primitive)
    raw = theirs.encode()
    items = pdu.parse_pdata(raw)
    assert [(i.context_id, i.is_command, i.is_last, bytes(i.data)) for i in items] == [
        (3, True, True, b"abcd"),
        (3, False, False, b"ef"),
    ]
    single = P_DATA()
    single.presentation_data_value_list = [[5, b"\x02" + b"xyzw"]]
    fresh = P_DATA_TF()
    fresh.from_primitive(single)
    assert pdu.pdata_header(5, False, True, 4) + b"xyzw" == fresh.encode()


def test_fixed_pdus_match_pynetdicom() -> None:
    release = A_RELEASE_RQ()
    release.from_primitive(A_RELEASE())
    assert release.encode() == pdu.RELEASE_RQ_PDU
    reply = A_RELEASE_RP()
    reply.from_primitive(A_RELEASE())
    assert reply.encode() == pdu.RELEASE_RP_PDU
    reject = A_ASSOCIATE()
    reject.result, reject.result_source, reject.diagnostic = 2, 3, 2
    rj = A_ASSOCIATE_RJ()
    rj.from_primitive(reject)
    assert pdu.encode_reject(2, 3, 2) == rj.encode()
    abort = A_P_ABORT()
    abort.provider_reason = 6
    ab = A_ABORT_RQ()
    ab.from_primitive(abort)
    assert pdu.encode_abort(2, 6) == ab.encode()


def test_reader_waits_for_whole_pdu_and_splits_stream() -> None:
    reader = _reader()
    stream = pdu.RELEASE_RQ_PDU + pdu.pdata_header(1, True, True, 2) + b"ok"
    for byte in stream[:-1]:
        reader.feed(bytes([byte]))
    first = reader.next_pdu()
    assert first == (pdu.RELEASE_RQ, pdu.RELEASE_RQ_PDU)
    assert reader.next_pdu() is None
    reader.feed(stream[-1:])
    kind, raw = reader.next_pdu()  # type: ignore[misc]
    assert kind == pdu.P_DATA_TF
    assert bytes(pdu.parse_pdata(raw)[0].data) == b"ok"


def test_huge_announced_length_fails_on_the_header() -> None:
    reader = _reader()
    reader.feed(b"\x04\x00\x7f\xff\xff\xff")
    with pytest.raises(pdu.PduTooLarge):
        reader.next_pdu()
    assert reader.buffered == 6


@pytest.mark.parametrize(
    "raw",
    [
        b"\x09\x00\x00\x00\x00\x04\x00\x00\x00\x00",  # unknown PDU type
        b"\x05\x00\x00\x00\x00\x08" + bytes(8),  # A-RELEASE-RQ of the wrong length
        b"\x01\x00\x00\x20\x00\x00" + bytes(8),  # A-ASSOCIATE-RQ over its own cap
    ],
)
def test_bad_headers_are_refused(raw: bytes) -> None:
    reader = pdu.PduReader(max_pdata_length=16384, max_associate_length=1024)
    reader.feed(raw)
    with pytest.raises(pdu.PduError):
        reader.next_pdu()


@pytest.mark.parametrize(
    "body",
    [
        b"",  # no items
        b"\x00\x00\x00\x01\x01",  # item length below 2
        b"\x00\x00\x00\x10\x01\x03ab",  # item overruns the PDU
        b"\x00\x00\x00\x04\x02\x03ab",  # even context ID
        b"\x00\x00\x00\x04\x01\x07ab",  # reserved control bits
    ],
)
def test_bad_pdata_is_refused(body: bytes) -> None:
    raw = b"\x04\x00" + len(body).to_bytes(4, "big") + body
    with pytest.raises(pdu.PduError):
        pdu.parse_pdata(raw)


def test_associate_rq_with_overrunning_item_is_refused() -> None:
    fixed = b"\x00\x01\x00\x00" + b"MINIPACS".ljust(16) + b"SCU".ljust(16) + bytes(32)
    item = b"\x10\x00\x00\xff" + b"1.2.840.10008.3.1.1.1"
    body = fixed + item
    raw = b"\x01\x00" + len(body).to_bytes(4, "big") + body
    with pytest.raises(pdu.PduError):
        pdu.decode_associate_rq(raw)


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=40),
)
def test_reader_returns_each_pdu_whole_however_the_stream_is_cut(
    sizes: list[int], cuts: list[int]
) -> None:
    pdus = [pdu.pdata_header(1, False, True, n) + bytes([n % 256]) * n for n in sizes]
    pdus.insert(len(pdus) // 2, pdu.RELEASE_RQ_PDU)
    stream = b"".join(pdus)
    reader = _reader()
    returned: list[bytes] = []
    position = 0
    for cut in [*cuts, len(stream)]:
        reader.feed(stream[position : position + cut])
        position += cut
        while (item := reader.next_pdu()) is not None:
            returned.append(item[1])
        assert reader.buffered == min(position, len(stream)) - sum(map(len, returned))
    assert returned == pdus
    assert reader.buffered == 0


def test_a_peer_trickling_bytes_costs_no_object_per_read() -> None:
    body = bytes(256 * 1024)
    stream = pdu.pdata_header(1, False, True, len(body)) + body
    reader = pdu.PduReader(max_pdata_length=1 << 20, max_associate_length=65536)
    tracemalloc.start()
    try:
        for index in range(len(stream) - 1):
            reader.feed(stream[index : index + 1])
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # One object per byte would be ~55 bytes each; merged reads cost about what they hold.
    assert held < 3 * len(stream)
    assert reader.buffered == len(stream) - 1
    reader.feed(stream[-1:])
    assert reader.next_pdu() == (pdu.P_DATA_TF, stream)


def test_a_stream_of_small_reads_that_never_ends_on_a_pdu_holds_only_the_rest() -> None:
    one = pdu.pdata_header(1, False, True, 94) + bytes(94)
    stream = one * 3000
    reader = _reader()
    returned = 0
    tracemalloc.start()
    try:
        # Each read ends one byte into the next PDU, so no read ever ends on a PDU.
        reader.feed(stream[:1])
        for start in range(1, len(stream), len(one)):
            reader.feed(stream[start : start + len(one)])
            while reader.next_pdu() is not None:
                returned += 1
            assert reader.buffered < len(one)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert returned == 3000
    # What was taken from the merged chunk is let go, not kept in front of the rest.
    assert peak < 16 * 1024
