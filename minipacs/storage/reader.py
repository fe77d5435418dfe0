"""Stored instances read back as their data set, in chunks, for C-STORE sub-operations.

Blocking: each call is one trip to an executor thread. The first chunk comes with the
open, so an instance smaller than a chunk costs one trip; larger ones never sit whole in
memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from minipacs import dataset as dicom

CHUNK_SIZE = 4 * 1024 * 1024  # even: fragments must be even (PS3.8 9.3.5.1, DCMTK)


class DatasetReader:
    """The data set of a Part 10 file (File Meta Information skipped), chunk by chunk."""

    def __init__(self, path: Path, chunk_size: int = CHUNK_SIZE) -> None:
        """Open the file and position it at its data set (blocking)."""
        self.path = path
        self.chunk_size = chunk_size
        self._handle: BinaryIO | None = open(path, "rb")  # noqa: SIM115 - closed by read/close
        try:
            dicom.read_file_meta(self._handle)
            self.remaining = os.fstat(self._handle.fileno()).st_size - self._handle.tell()
        except BaseException:
            self.close()
            raise
        # PS3.5 7.1: a data set is even; an odd file (a deflated stream) gets one pad byte.
        self._pad = self.remaining % 2 == 1

    @classmethod
    def open(cls, path: Path) -> tuple[DatasetReader, tuple[bytes, bool]]:
        """Open a file and read its first chunk: one executor trip for most instances."""
        reader = cls(path)
        return reader, reader.read()

    def read(self) -> tuple[bytes, bool]:
        """The next chunk and whether it is the last; the file is closed after the last."""
        assert self._handle is not None, "read past the end"
        data = self._handle.read(min(self.chunk_size, self.remaining))
        if not data and self.remaining:
            self.close()
            raise OSError(f"{self.path} shrank while being read")
        self.remaining -= len(data)
        last = self.remaining == 0
        if last:
            self.close()
            if self._pad:
                data += b"\0"
        return data, last

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
