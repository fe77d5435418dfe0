"""File Meta Information encoder (PS3.10 7.1), written directly with struct."""

import struct

from minipacs.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME


def _pad(value: str, pad: bytes) -> bytes:
    """Encode a value as ASCII and pad it to even length (PS3.5 7.1.1)."""
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def _short(element: int, vr: bytes, value: bytes) -> bytes:
    """Encode a group 0002 element with the 2-byte length form (PS3.5 7.1.2)."""
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def encode_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str
) -> bytes:
    """Return the 128-byte preamble, b"DICM" and the File Meta Information group (PS3.10 7.1)."""
    # PS3.10 7.1: group 0002 is always Explicit VR Little Endian, whatever the data set uses.
    # OB uses the 4-byte length form with 2 reserved bytes (PS3.5 7.1.2); version is 00\01.
    body = struct.pack("<HH2s2xI", 0x0002, 0x0001, b"OB", 2) + b"\x00\x01"
    body += _short(0x0002, b"UI", _pad(sop_class_uid, b"\0"))
    body += _short(0x0003, b"UI", _pad(sop_instance_uid, b"\0"))
    body += _short(0x0010, b"UI", _pad(transfer_syntax_uid, b"\0"))
    body += _short(0x0012, b"UI", _pad(IMPLEMENTATION_CLASS_UID, b"\0"))
    body += _short(0x0013, b"SH", _pad(IMPLEMENTATION_VERSION_NAME, b" "))
    if source_ae:
        # (0002,0016) is Type 3: omitted when the sender's AE title is unknown.
        body += _short(0x0016, b"AE", _pad(source_ae, b" "))
    # (0002,0000) counts the bytes after its own value up to the end of the group.
    length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\0" * 128 + b"DICM" + length + body
