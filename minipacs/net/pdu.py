"""Upper Layer PDUs (PS3.8 9.3): framing of a byte stream into whole PDUs, and codecs.

Sans-I/O: `PduReader` takes bytes and hands back whole PDUs; the encoders return bytes.
The association PDUs (A-ASSOCIATE-RQ/AC) use pynetdicom's codecs, after we check their
item lengths ourselves (pynetdicom checks them with `assert`, which `python -O` removes).
The hot path, P-DATA-TF and the fixed-size PDUs, is coded here directly: it runs once per
fragment and pynetdicom's objects cost tens of microseconds each.
"""

from __future__ import annotations

import functools
import struct
from collections import deque
from dataclasses import dataclass
from typing import Final

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE

ASSOCIATE_RQ: Final = 0x01
ASSOCIATE_AC: Final = 0x02
ASSOCIATE_RJ: Final = 0x03
P_DATA_TF: Final = 0x04
RELEASE_RQ: Final = 0x05
RELEASE_RP: Final = 0x06
ABORT: Final = 0x07

PDU_NAMES: Final = {
    ASSOCIATE_RQ: "A-ASSOCIATE-RQ",
    ASSOCIATE_AC: "A-ASSOCIATE-AC",
    ASSOCIATE_RJ: "A-ASSOCIATE-RJ",
    P_DATA_TF: "P-DATA-TF",
    RELEASE_RQ: "A-RELEASE-RQ",
    RELEASE_RP: "A-RELEASE-RP",
    ABORT: "A-ABORT",
}

_HEADER = struct.Struct(">BxL")
# Reads shorter than this, after the first held, are merged into one chunk (PduReader).
_SMALL_READ = 65536
_PDV_HEADER = struct.Struct(">LBB")
_PDATA_HEADER = struct.Struct(">BxLLBB")
_FIXED_LENGTH_PDUS: Final = {ASSOCIATE_RJ, RELEASE_RQ, RELEASE_RP, ABORT}

# A-ABORT sources and reasons, PS3.8 9.3.8 Table 9-26.
ABORT_SOURCE_USER: Final = 0
ABORT_SOURCE_PROVIDER: Final = 2
ABORT_REASON_NOT_SPECIFIED: Final = 0
ABORT_REASON_UNRECOGNIZED_PDU: Final = 1
ABORT_REASON_UNEXPECTED_PDU: Final = 2
ABORT_REASON_UNRECOGNIZED_PARAMETER: Final = 4
ABORT_REASON_UNEXPECTED_PARAMETER: Final = 5
ABORT_REASON_INVALID_PARAMETER: Final = 6


class PduError(Exception):
    """The peer sent bytes that are not a valid PDU; `reason` is an A-ABORT reason."""

    def __init__(self, message: str, reason: int = ABORT_REASON_INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


class PduTooLarge(PduError):
    """A PDU announced a length above our limit; we abort before reading its body."""


@dataclass(slots=True)
class Pdv:
    """One presentation data value item of a P-DATA-TF (PS3.8 9.3.5.1)."""

    context_id: int
    is_command: bool
    is_last: bool
    data: memoryview


class PduReader:
    """Cuts a byte stream into whole PDUs, refusing any that announce more than a limit.

    Memory use is bounded by what actually arrives, never by what a header announces:
    only received bytes are held (small reads after the first merged into one chunk, so
    a peer trickling bytes costs no object per read) and a PDU over the limit fails on
    its header.
    """

    def __init__(self, max_pdata_length: int, max_associate_length: int) -> None:
        self.max_pdata_length = max_pdata_length
        self.max_associate_length = max_associate_length
        # The transport's reads as they came, not copied into one buffer: a PDU that is
        # one read is returned as it is and one across reads is joined once, where
        # appending to a bytearray and cutting the PDU out of it copied every byte twice
        # (a CT image's 512 KiB, four times over with what follows).
        self._chunks: deque[bytes | bytearray] = deque()
        # Bytes of the first chunk already returned, and bytes held after them.
        self._offset = 0
        self._size = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a PDU."""
        return self._size

    def feed(self, data: bytes) -> None:
        """Append bytes received from the transport."""
        if not data:
            return
        chunks = self._chunks
        if chunks and len(data) < _SMALL_READ:
            last = chunks[-1]
            if type(last) is bytearray:
                last += data
            else:
                chunks.append(bytearray(data))
        else:
            # Kept as it is: a buffer the transport might reuse is copied first.
            chunks.append(data if type(data) is bytes else bytes(data))
        self._size += len(data)

    def next_pdu(self) -> tuple[int, bytes] | None:
        """Return (type, whole PDU including header) when one is complete, else None."""
        if self._size < 6:
            return None
        first = self._chunks[0]
        offset = self._offset
        if len(first) - offset >= 6:
            pdu_type, length = _HEADER.unpack_from(first, offset)
        else:
            pdu_type, length = _HEADER.unpack(self._take(6, consume=False))
        self._check_header(pdu_type, length)
        end = 6 + length
        if self._size < end:
            return None
        if offset == 0 and len(first) == end and type(first) is bytes:
            # The usual case, one read = one PDU: no copy at all.
            self._chunks.popleft()
            self._size -= end
            return pdu_type, first
        return pdu_type, self._take(end)

    def _take(self, count: int, consume: bool = True) -> bytes:
        """The next `count` held bytes (there are that many), copied once; consumed if asked."""
        chunks = self._chunks
        offset = self._offset
        parts: list[memoryview] = []
        needed = count
        index = 0
        while True:
            chunk = chunks[index]
            available = len(chunk) - offset
            if available >= needed:
                end = offset + needed
                parts.append(memoryview(chunk)[offset:end])
                break
            parts.append(memoryview(chunk)[offset:])
            needed -= available
            offset = 0
            index += 1
        # The one copy: a slice within one chunk, the join across several.
        data = b"".join(parts) if index else bytes(parts[0])
        for part in parts:
            # A bytearray chunk still being appended to must not stay exported.
            part.release()
        if consume:
            for _ in range(index):
                chunks.popleft()
            first = chunks[0]
            if end == len(first):
                chunks.popleft()
                end = 0
            elif type(first) is bytearray:
                # Still growing: what was taken must not stay held in front of it.
                del first[:end]
                end = 0
            self._offset = end
            self._size -= count
        return data

    def _check_header(self, pdu_type: int, length: int) -> None:
        if pdu_type not in PDU_NAMES:
            raise PduError(f"unrecognised PDU type 0x{pdu_type:02x}", ABORT_REASON_UNRECOGNIZED_PDU)
        if pdu_type == P_DATA_TF:
            limit = self.max_pdata_length
        elif pdu_type in _FIXED_LENGTH_PDUS:
            if length != 4:
                raise PduError(f"{PDU_NAMES[pdu_type]} with length {length}, must be 4")
            return
        else:
            limit = self.max_associate_length
        if length > limit:
            raise PduTooLarge(
                f"{PDU_NAMES[pdu_type]} announces {length} bytes, limit is {limit}",
                ABORT_REASON_INVALID_PARAMETER,
            )


def parse_pdata(pdu: bytes) -> list[Pdv]:
    """Split a P-DATA-TF PDU into its PDV items (PS3.8 9.3.5), checking every length."""
    view = memoryview(pdu)
    end = len(pdu)
    offset = 6
    items: list[Pdv] = []
    while offset < end:
        if end - offset < 6:
            raise PduError("P-DATA-TF item header truncated")
        item_length, context_id, header = _PDV_HEADER.unpack_from(pdu, offset)
        if item_length < 2 or offset + 4 + item_length > end:
            raise PduError(f"P-DATA-TF item length {item_length} does not fit the PDU")
        if context_id % 2 == 0:
            raise PduError(f"presentation context ID {context_id} is not odd")
        if header & 0xFC:
            raise PduError(f"message control header 0x{header:02x} has reserved bits set")
        data = view[offset + 6 : offset + 4 + item_length]
        items.append(Pdv(context_id, bool(header & 0x01), bool(header & 0x02), data))
        offset += 4 + item_length
    if not items:
        raise PduError("P-DATA-TF with no PDV item")
    return items


def pdata_header(context_id: int, is_command: bool, is_last: bool, length: int) -> bytes:
    """Return the 12 header bytes of a P-DATA-TF PDU holding one PDV of `length` bytes."""
    control = (0x01 if is_command else 0x00) | (0x02 if is_last else 0x00)
    return _PDATA_HEADER.pack(P_DATA_TF, length + 6, length + 2, context_id, control)


def encode_reject(result: int, source: int, reason: int) -> bytes:
    """Encode an A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return struct.pack(">BxLxBBB", ASSOCIATE_RJ, 4, result, source, reason)


def encode_abort(source: int, reason: int) -> bytes:
    """Encode an A-ABORT PDU (PS3.8 9.3.8); the reason is only meaningful from a provider."""
    return struct.pack(">BxLxxBB", ABORT, 4, source, reason if source == 2 else 0)


RELEASE_RQ_PDU: Final = struct.pack(">BxLL", RELEASE_RQ, 4, 0)
RELEASE_RP_PDU: Final = struct.pack(">BxLL", RELEASE_RP, 4, 0)


def decode_fixed(pdu: bytes) -> tuple[int, int, int]:
    """Return the three result/source/reason bytes of an A-ASSOCIATE-RJ or A-ABORT."""
    return pdu[7], pdu[8], pdu[9]


# Items of A-ASSOCIATE-RQ/AC (PS3.8 9.3.2, 9.3.3): type -> bytes before nested sub-items.
_NESTED_ITEMS: Final = {0x20: 4, 0x21: 4, 0x50: 0}


def _check_items(pdu: bytes, start: int, end: int, nested: bool) -> None:
    """Walk a run of (type, reserved, 2-byte length) items; each must fit its parent."""
    offset = start
    while offset < end:
        if end - offset < 4:
            raise PduError("association item header truncated")
        item_type = pdu[offset]
        (length,) = struct.unpack_from(">H", pdu, offset + 2)
        body = offset + 4
        if body + length > end:
            raise PduError(f"association item 0x{item_type:02x} overruns its parent")
        if not nested and item_type in _NESTED_ITEMS:
            skip = _NESTED_ITEMS[item_type]
            if length < skip:
                raise PduError(f"association item 0x{item_type:02x} too short")
            _check_items(pdu, body + skip, body + length, nested=True)
        offset = body + length


def _check_associate(pdu: bytes) -> None:
    # Fixed fields take 68 bytes after the 6-byte header (PS3.8 Table 9-11).
    if len(pdu) < 74:
        raise PduError("A-ASSOCIATE PDU shorter than its fixed fields")
    _check_items(pdu, 74, len(pdu), nested=False)


# Only requests up to this size are cached, so the cache's memory stays bounded (256 x).
CACHEABLE_ASSOCIATE_LENGTH: Final = 64 * 1024


def decode_associate_rq(pdu: bytes) -> A_ASSOCIATE:
    """Decode an A-ASSOCIATE-RQ into pynetdicom's primitive (shared: treat as read-only).

    pynetdicom takes ~250 us per context to decode; a peer sends the same bytes on every
    association, so decoded requests are cached by their bytes.
    """
    if len(pdu) <= CACHEABLE_ASSOCIATE_LENGTH:
        return _decode_associate_rq_cached(pdu)
    return _decode_associate_rq(pdu)


@functools.lru_cache(maxsize=256)
def _decode_associate_rq_cached(pdu: bytes) -> A_ASSOCIATE:
    return _decode_associate_rq(pdu)


def _decode_associate_rq(pdu: bytes) -> A_ASSOCIATE:
    _check_associate(pdu)
    try:
        decoded = A_ASSOCIATE_RQ()
        decoded.decode(pdu)
        return decoded.to_primitive()
    except (ValueError, AssertionError, struct.error, IndexError, KeyError, TypeError) as exc:
        raise PduError(f"malformed A-ASSOCIATE-RQ: {exc}") from exc


def decode_associate_ac(pdu: bytes) -> A_ASSOCIATE:
    """Decode an A-ASSOCIATE-AC into pynetdicom's primitive (shared: treat as read-only)."""
    if len(pdu) <= CACHEABLE_ASSOCIATE_LENGTH:
        return _decode_associate_ac_cached(pdu)
    return _decode_associate_ac(pdu)


@functools.lru_cache(maxsize=256)
def _decode_associate_ac_cached(pdu: bytes) -> A_ASSOCIATE:
    return _decode_associate_ac(pdu)


def _decode_associate_ac(pdu: bytes) -> A_ASSOCIATE:
    _check_associate(pdu)
    try:
        decoded = A_ASSOCIATE_AC()
        decoded.decode(pdu)
        return decoded.to_primitive()
    except (ValueError, AssertionError, struct.error, IndexError, KeyError, TypeError) as exc:
        raise PduError(f"malformed A-ASSOCIATE-AC: {exc}") from exc


def encode_associate_ac(primitive: A_ASSOCIATE) -> bytes:
    """Encode an A-ASSOCIATE-AC from pynetdicom's primitive."""
    encoded = A_ASSOCIATE_AC()
    encoded.from_primitive(primitive)
    return encoded.encode()


def encode_associate_rq(primitive: A_ASSOCIATE) -> bytes:
    """Encode an A-ASSOCIATE-RQ from pynetdicom's primitive."""
    encoded = A_ASSOCIATE_RQ()
    encoded.from_primitive(primitive)
    return encoded.encode()
