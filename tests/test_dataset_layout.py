"""A data set walked with a remembered layout gives what a fresh walk gives (dataset._Layout)."""

from __future__ import annotations

from collections.abc import Container

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from minipacs import dataset as dicom
from minipacs.index.records import INDEXED_TAGS

SYNTAX = "1.2.840.10008.1.2.1"


def _body(sop_uid: str = "1.2.3.4") -> bytes:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = sop_uid
    return dicom.encode(ds, SYNTAX)


BASE = _body()
# Where the header ends: a flip before it lands in what the walk reads or keeps.
HEADER_END = len(dicom.inspect(BASE, SYNTAX, INDEXED_TAGS).header)


def _outcome(data: bytes, syntax: str, tags: Container[int]) -> object:
    """What inspect() makes of a data set: its elements and header, or its error."""
    try:
        inspected = dicom.inspect(data, syntax, tags)
    except dicom.DataSetError as exc:
        return str(exc)
    return inspected.elements, inspected.header


def _both_ways(
    base: bytes, changed: bytes, syntax: str = SYNTAX, tags: Container[int] = INDEXED_TAGS
) -> tuple[object, object]:
    """_outcome of `changed` with the layout of `base` remembered, and with none."""
    dicom._LAYOUTS.clear()
    dicom.inspect(base, syntax, tags)
    remembered = _outcome(changed, syntax, tags)
    dicom._LAYOUTS.clear()
    return remembered, _outcome(changed, syntax, tags)


def test_an_instance_of_the_same_layout_is_known_by_it() -> None:
    dicom._LAYOUTS.clear()
    first = dicom.inspect(BASE, SYNTAX, INDEXED_TAGS)
    (layout,) = dicom._LAYOUTS.values()
    other = _body("1.2.3.5")  # same length: only a value differs
    second = dicom.inspect(other, SYNTAX, INDEXED_TAGS)
    assert dicom._LAYOUTS[(SYNTAX, INDEXED_TAGS, len(other))] is layout
    assert second.elements[0x00080018].value == b"1.2.3.5\0"
    assert first.elements[0x00080018].value == b"1.2.3.4\0"
    assert second.header[:100] == first.header[:100]
    remembered, fresh = _both_ways(BASE, other)
    assert remembered == fresh


def test_a_header_that_differs_is_walked_again() -> None:
    # Patient ID (0010,0020) "1CT1" announced as 2 bytes: same length, another walk, which
    # fails where the next "element" begins inside the value.
    at = BASE.index(b"\x10\x00\x20\x00LO\x04\x00")
    broken = BASE[: at + 6] + b"\x02\x00" + BASE[at + 8 :]
    dicom._LAYOUTS.clear()
    dicom.inspect(BASE, SYNTAX, INDEXED_TAGS)
    with pytest.raises(dicom.DataSetError):
        dicom.inspect(broken, SYNTAX, INDEXED_TAGS)
    remembered, fresh = _both_ways(BASE, broken)
    assert remembered == fresh


def _nested(syntax: str) -> bytes:
    """An RT plan (sequences in sequences, items of defined and undefined length)."""
    ds = pydicom.dcmread(get_testdata_file("rtplan.dcm"))
    for item in ds.BeamSequence:
        item.ControlPointSequence[0].is_undefined_length_sequence_item = True
    ds.BeamSequence.is_undefined_length = True
    return dicom.encode(ds, syntax)


# (transfer syntax, data set): flat explicit, nested explicit, nested implicit.
BASES = [
    (SYNTAX, BASE),
    (SYNTAX, _nested(SYNTAX)),
    ("1.2.840.10008.1.2", _nested("1.2.840.10008.1.2")),
]


@pytest.mark.parametrize("index", range(len(BASES)))
def test_every_single_byte_change_gets_the_fresh_walk_s_answer(index: int) -> None:
    # Each byte of the header (all of a small data set) in turn, remembered layout or not.
    syntax, base = BASES[index]
    for at in range(min(len(base), HEADER_END)):
        changed = base[:at] + bytes([base[at] ^ 0x41]) + base[at + 1 :]
        remembered, fresh = _both_ways(base, changed, syntax, dicom.ALL_TAGS)
        assert remembered == fresh, at


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_changed_data_set_gets_the_fresh_walk_s_answer(data: st.DataObject) -> None:
    syntax, base = data.draw(st.sampled_from(BASES))
    end = min(len(base), HEADER_END)
    flips = data.draw(st.lists(st.tuples(st.integers(0, end - 1), st.integers(0, 255)), max_size=3))
    changed = bytearray(base)
    for at, value in flips:
        changed[at] = value
    remembered, fresh = _both_ways(base, bytes(changed), syntax, dicom.ALL_TAGS)
    assert remembered == fresh
