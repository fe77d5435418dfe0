"""Stored instances re-encoded for a peer that accepts none of their transfer syntax.

Blocking and CPU-bound (pixel decoding): callers run it in an executor. Compressed pixel
data is decoded by pydicom's pixel backend with the pylibjpeg plugins (JPEG, JPEG-LS,
JPEG 2000, RLE); the instance keeps its SOP Instance UID: a change of transfer syntax
does not make a new instance (PS3.5 Section 10, PS3.4 B.4.1).
"""

from __future__ import annotations

from pathlib import Path

import pydicom

from minipacs import dataset as dicom


class TranscodeError(Exception):
    """An instance that cannot be decoded or re-encoded in the wanted transfer syntax."""


def transcode(path: Path, transfer_syntax: str) -> bytes:
    """A Part 10 file's data set, decompressed if need be, encoded in `transfer_syntax`."""
    try:
        ds = pydicom.dcmread(path)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            # as_rgb: YBR pixel data decodes to RGB, and Photometric Interpretation says so.
            ds.decompress(generate_instance_uid=False)
        del ds.file_meta
        return dicom.encode(ds, transfer_syntax)
    except Exception as exc:
        # Plugins raise anything from ValueError to RuntimeError on data they cannot decode.
        raise TranscodeError(f"{path.name}: cannot re-encode in {transfer_syntax}: {exc}") from exc
