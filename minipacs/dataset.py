"""Decode and encode DIMSE data sets in a given transfer syntax (PS3.5 Section 10).

Blocking and CPU-bound: callers run these in an executor, never on the event loop.
"""

from __future__ import annotations

import functools
import io
import mmap
import operator
import struct
import zlib
from collections.abc import Callable, Container, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import Dataset
from pydicom.dataelem import RawDataElement, empty_value_for_VR
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian


def _at_bulk_pixels(tag: int, vr: str | None, length: int) -> bool:
    # Group 7FE0 (Pixel Data, Float and Double Float Pixel Data) is the bulk; the index
    # needs everything before it and nothing of it.
    return int(tag) >> 16 == 0x7FE0


class DataSetError(Exception):
    """A data set that cannot be decoded in its transfer syntax."""


# pydicom's UID() validates with a regex each time: a few syntaxes recur in every store.
@functools.lru_cache(maxsize=64)
def _syntax(transfer_syntax: str) -> tuple[bool, bool]:
    uid = UID(transfer_syntax)
    if not uid.is_transfer_syntax:
        raise DataSetError(f"{transfer_syntax} is not a known transfer syntax")
    return uid.is_implicit_VR, uid.is_little_endian


def _inflate(raw: bytes) -> bytes:
    # PS3.5 A.5: Deflated Explicit VR Little Endian is a raw deflate stream (no zlib header).
    try:
        return zlib.decompress(raw, -zlib.MAX_WBITS)
    except zlib.error as exc:
        raise DataSetError(f"deflated data set does not inflate: {exc}") from exc


# The preamble and "DICM" prefix come before the File Meta Information (PS3.10 7.1).
_META_START = 132
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
)
# PS3.5 Table 6.2-1: an explicit VR outside this set cannot be decoded (pydicom raises
# NotImplementedError when the value is first read), so the walk refuses it up front.
_KNOWN_VRS = _LONG_VRS | frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT"}
    | {b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
)
# An explicit VR's header size (PS3.5 7.1.2): one lookup both classes and checks it.
_HEADER_SIZE = dict.fromkeys(_KNOWN_VRS, 8) | dict.fromkeys(_LONG_VRS, 12)
_UNDEFINED = 0xFFFFFFFF
_ITEM = (0xFFFE, 0xE000)
_SEQUENCE_END = (0xFFFE, 0xE0DD)


class _Walker:
    """Checks that every element, item and fragment of a data set fits (PS3.5 7.1, 7.5).

    pydicom reads past a truncated end without complaint, so the lengths are checked
    here; values are never decoded, so this is cheap even for multi-GB data sets (mmap).
    On the way it notes where the top-level elements in `wanted` are, so that only those
    need decoding.
    """

    def __init__(self, data: bytes | memoryview, little: bool, wanted: Container[int]) -> None:
        self.data = data
        self.wanted = wanted
        self.pixel_offset: int | None = None
        # Top-level elements in `wanted`: tag -> (VR or None, length, value offset).
        self.found: dict[int, tuple[bytes | None, int, int]] = {}
        # Where the walk read an 8-byte header (element, item or delimiter), and a
        # 12-byte one (explicit long VR): all that decides its course (see _Layout).
        self.heads: list[int] = []
        self.long_heads: list[int] = []
        order = "<" if little else ">"
        # One unpack reads an element's header: tag and length (implicit), or tag, VR and
        # a short length (explicit; for long VRs the real length follows).
        self.implicit_header = struct.Struct(order + "HHL")
        self.explicit_header = struct.Struct(order + "HH2sH")
        self.u32 = struct.Struct(order + "L")
        # PS3.5 7.5: items and delimiters are always coded like Implicit VR.
        self.item_header = struct.Struct(order + "HHL")

    def elements(self, offset: int, end: int, delimited: bool, implicit: bool) -> int:
        """Walk elements in [offset, end); return where they stop."""
        data = self.data
        # Bound once: this loop runs for every element of every data set received.
        unpack = (self.implicit_header if implicit else self.explicit_header).unpack_from
        u32 = self.u32.unpack_from
        wanted = () if delimited else self.wanted
        found = self.found
        header_size = _HEADER_SIZE.get
        head = self.heads.append
        while offset < end:
            if end - offset < 8:
                raise DataSetError(f"element header truncated at byte {offset}")
            start = offset
            if implicit:
                group, element, length = unpack(data, offset)
                vr = b"UN"
                offset += 8
                head(start)
            else:
                group, element, vr, length = unpack(data, offset)
                size = header_size(vr)
                if group == 0xFFFE:
                    # Items and delimiters are coded like Implicit VR (PS3.5 7.5).
                    vr = b""
                    length = u32(data, offset + 4)[0]
                    offset += 8
                    head(start)
                elif size == 8:
                    head(start)
                    offset += 8
                    if group < 0x7FE0 and offset + length <= end:
                        # Most elements: a short VR (never undefined, never a sequence)
                        # before the bulk, that fits. The walk takes 14% less time.
                        tag = group << 16 | element
                        if tag in wanted:
                            found[tag] = (vr, length, offset)
                        offset += length
                        continue
                elif size is None:
                    raise DataSetError(
                        f"element ({group:04X},{element:04X}) has an unknown VR {vr!r}"
                    )
                else:
                    if end - offset < 12:
                        raise DataSetError(f"element header truncated at byte {offset}")
                    length = u32(data, offset + 8)[0]
                    offset += 12
                    self.long_heads.append(start)
            if group >= 0x7FE0:
                if group == 0x7FE0 and not delimited and self.pixel_offset is None:
                    # Only the top level walks undelimited: this is where the bulk begins.
                    self.pixel_offset = start
                if group == 0xFFFE and element == 0xE00D:
                    if not delimited:
                        raise DataSetError(f"stray item delimiter at byte {start}")
                    return offset
            if length == _UNDEFINED:
                # PS3.5 6.2.2: an UN of undefined length holds Implicit VR LE items.
                offset = self.items(offset, end, implicit or vr == b"UN")
                continue
            if offset + length > end:
                raise DataSetError(
                    f"element ({group:04X},{element:04X}) needs {length} bytes, "
                    f"{end - offset} left: data set truncated"
                )
            tag = group << 16 | element
            if tag in wanted:
                found[tag] = (None if implicit else vr, length, offset)
            if vr == b"SQ":
                self.items(offset, offset + length, implicit, defined=True)
            offset += length
        if delimited:
            raise DataSetError("item without its delimiter: data set truncated")
        return offset

    def items(self, offset: int, end: int, implicit: bool, defined: bool = False) -> int:
        """Walk sequence items or pixel fragments up to the end or the delimiter."""
        while offset < end:
            if end - offset < 8:
                raise DataSetError(f"item header truncated at byte {offset}")
            group, element, length = self.item_header.unpack_from(self.data, offset)
            self.heads.append(offset)
            offset += 8
            if (group, element) == _SEQUENCE_END:
                return offset
            if (group, element) != _ITEM:
                raise DataSetError(f"expected an item at byte {offset - 8}")
            if length == _UNDEFINED:
                offset = self.elements(offset, end, delimited=True, implicit=implicit)
            elif offset + length > end:
                raise DataSetError("item longer than what is left: data set truncated")
            else:
                offset += length
        if not defined:
            raise DataSetError("sequence without its delimiter: data set truncated")
        return offset


@dataclass(frozen=True)
class _Layout:
    """Where a walk read headers in a data set, what it read there, and what it found.

    The walk's course depends only on the headers it reads (tags, VRs, lengths, items)
    and on where the data ends. A data set of the same length holding the same bytes at
    each of those places is walked the same way: it is as sound, its wanted elements and
    its bulk are at the same offsets. Consecutive instances of a series often share a
    layout (one template, UIDs of one length), and one C-level comparison of those bytes
    then stands for the Python loop over every element.
    """

    headers: Callable[[bytes], object]
    expected: object
    found: dict[int, tuple[bytes | None, int, int]]
    pixel_offset: int | None


# Recent layouts, by (transfer syntax, wanted tags, length); a lost race costs one walk.
_LAYOUTS: dict[tuple[str, Container[int], int], _Layout] = {}
_LAYOUTS_MAX = 64
# More headers than this (thousands of fragments) are walked each time, not remembered.
_LAYOUT_HEADS_MAX = 4096


def _walk(
    data: bytes | memoryview, transfer_syntax: str, tags: Container[int]
) -> tuple[dict[int, tuple[bytes | None, int, int]], int | None]:
    """Walk a data set (_Walker), or know it by a layout walked before; (found, bulk)."""
    implicit, little = _syntax(transfer_syntax)
    key = None
    if isinstance(data, bytes) and isinstance(tags, Hashable):
        key = (transfer_syntax, tags, len(data))
        layout = _LAYOUTS.get(key)
        if layout is not None and layout.headers(data) == layout.expected:
            return layout.found, layout.pixel_offset
    walker = _Walker(data, little, tags)
    walker.elements(0, len(data), False, implicit)
    starts, long_starts = walker.heads, walker.long_heads
    if key is not None and 0 < len(starts) + len(long_starts) <= _LAYOUT_HEADS_MAX:
        heads = [*map(slice, starts, map((8).__add__, starts))]
        heads += map(slice, long_starts, map((12).__add__, long_starts))
        getter = operator.itemgetter(*heads)
        if len(_LAYOUTS) >= _LAYOUTS_MAX:
            _LAYOUTS.clear()
        _LAYOUTS[key] = _Layout(getter, getter(data), walker.found, walker.pixel_offset)
    return walker.found, walker.pixel_offset


@dataclass(frozen=True)
class Inspected:
    """A received data set, checked: the attributes asked for, and its header's raw bytes."""

    # The top-level elements of the header whose tags were asked for, as read (raw), by
    # plain int tag: a BaseTag key costs a Python-level __eq__ on every lookup.
    elements: dict[int, RawDataElement]
    # The encoded elements before group 7FE0, in `header_syntax`: what the index keeps.
    header: bytes
    header_syntax: str

    @functools.cached_property
    def dataset(self) -> Dataset:
        """The elements as a pydicom data set, decoded on access."""
        # Made only when asked: the index reads most values from the raw elements.
        return Dataset({element.tag: element for element in self.elements.values()})


class _Everything:
    """A container holding every tag: inspect() then keeps the whole top level."""

    def __contains__(self, tag: object) -> bool:
        return True


# For data sets read whole: C-FIND identifiers, headers answering return keys.
ALL_TAGS: Container[int] = _Everything()


def header_syntax(transfer_syntax: str) -> str:
    """The transfer syntax of a data set's header bytes as inspect() keeps them."""
    # A deflated data set is kept inflated (PS3.5 A.5): Explicit VR Little Endian.
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        return ExplicitVRLittleEndian
    return transfer_syntax


def inspect(
    source: bytes | Path, transfer_syntax: str, tags: Container[int], offset: int = 0
) -> Inspected:
    """Check every length in the data set (from `offset`); keep the top-level `tags`.

    Raises DataSetError for a data set that is truncated or cannot be decoded.
    """
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        raw = source.read_bytes() if isinstance(source, Path) else source
        return _inspect_data(_inflate(raw[offset:]), transfer_syntax, tags)
    if isinstance(source, bytes):
        # Whole, as bytes: the walk's layout is remembered only for bytes (see _Layout).
        data = source if offset == 0 else memoryview(source)[offset:]
        return _inspect_data(data, transfer_syntax, tags)
    with (
        open(source, "rb") as handle,
        mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
    ):
        # What is returned is copied out: nothing refers to the mapping once it closes.
        return _inspect_data(memoryview(mapped)[offset:], transfer_syntax, tags)


def _inspect_data(
    data: bytes | memoryview, transfer_syntax: str, tags: Container[int]
) -> Inspected:
    """Walk a data set; keep its header and its top-level `tags` as raw elements."""
    implicit, little = _syntax(transfer_syntax)
    found, pixel_offset = _walk(data, transfer_syntax, tags)
    end = len(data) if pixel_offset is None else pixel_offset
    elements = {}
    # pydicom's own reader decodes every element header once more in Python; the walk has
    # already found the few the index reads, which was most of a small store's CPU.
    for tag, (vr_bytes, length, start) in found.items():
        if start > end:
            # Pixel Data and what follows it are bulk, never part of the header.
            continue
        # The walk refused unknown explicit VRs; implicit ones come from the dictionary.
        vr = None if vr_bytes is None else vr_bytes.decode("latin-1")
        value = bytes(data[start : start + length]) if length else empty_value_for_VR(vr, raw=True)
        elements[tag] = RawDataElement(BaseTag(tag), vr, length, value, start, implicit, little)
    return Inspected(elements, bytes(data[:end]), header_syntax(transfer_syntax))


def data_set_offset(lead: bytes) -> int:
    """Where a Part 10 file's data set starts, from its first 144 bytes (PS3.10 7.1)."""
    # The group length (0002,0000) is Type 1 (PS3.10 Table 7.1-1): it tells where the
    # data set starts without decoding the meta elements one by one.
    if len(lead) < _META_START + 12 or lead[128:132] != b"DICM":
        raise DataSetError("not a DICOM Part 10 file (no DICM prefix)")
    if lead[_META_START : _META_START + 6] != b"\x02\x00\x00\x00UL":
        raise DataSetError("File Meta Information does not start with its group length")
    length: int = struct.unpack_from("<L", lead, _META_START + 8)[0]
    return _META_START + 12 + length


def read_file_meta(handle: BinaryIO) -> tuple[Dataset, int]:
    """A Part 10 file's File Meta Information and where its data set starts (PS3.10 7.1).

    `handle` is left at the data set.
    """
    lead = handle.read(_META_START + 12)
    length = data_set_offset(lead) - _META_START - 12
    rest = handle.read(length)
    if len(rest) != length:
        raise DataSetError("File Meta Information truncated")
    meta_bytes = lead[_META_START:] + rest
    meta = _read(io.BytesIO(meta_bytes), False, True)
    if not meta.get("TransferSyntaxUID"):
        raise DataSetError("no Transfer Syntax UID in its File Meta Information")
    return meta, _META_START + len(meta_bytes)


def read_part10(path: Path, tags: Container[int]) -> tuple[Dataset, Inspected]:
    """A Part 10 file's File Meta Information and its inspected data set (PS3.10 7.1)."""
    with open(path, "rb") as handle:
        meta, start = read_file_meta(handle)
    return meta, inspect(path, str(meta.TransferSyntaxUID), tags, start)


def part10_body(path: Path) -> bytes:
    """A Part 10 file's data set bytes, as stored (after its File Meta Information)."""
    with open(path, "rb") as handle:
        read_file_meta(handle)
        return handle.read()


def read_header(source: bytes | Path, transfer_syntax: str) -> Dataset:
    """Decode a data set up to its pixel data (group 7FE0), which is left unread."""
    implicit, little = _syntax(transfer_syntax)
    if isinstance(source, Path):
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            return _read(io.BytesIO(_inflate(source.read_bytes())), implicit, little)
        with open(source, "rb") as handle:
            return _read(handle, implicit, little)
    data = _inflate(source) if transfer_syntax == DeflatedExplicitVRLittleEndian else source
    return _read(io.BytesIO(data), implicit, little)


def _read(handle: BinaryIO, implicit: bool, little: bool) -> Dataset:
    handle.seek(0, io.SEEK_END)
    total = handle.tell()
    handle.seek(0)
    try:
        dataset = read_dataset(handle, implicit, little, stop_when=_at_bulk_pixels)
    except DataSetError:
        raise
    except Exception as exc:
        raise DataSetError(f"data set cannot be decoded: {exc}") from exc
    if len(dataset) == 0 and total:
        raise DataSetError("data set has no elements")
    return dataset


def encode(dataset: Dataset, transfer_syntax: str) -> bytes:
    """Encode a data set (e.g. a C-FIND identifier) in a transfer syntax."""
    implicit, little = _syntax(transfer_syntax)
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = implicit
    buffer.is_little_endian = little
    write_dataset(buffer, dataset)
    raw = buffer.getvalue()
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        raw = compressor.compress(raw) + compressor.flush()
    return raw
