"""Stored instances read back as their data set, in chunks, for C-STORE sub-operations.

Blocking: each call is one trip to an executor thread. The first chunk comes with the
open, so an instance smaller than a chunk costs one trip and one read of the whole file:
the File Meta Information is skipped by its group length, not decoded (the index knows
the transfer syntax). Larger instances never sit whole in memory.
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
        """Open the file and read its first chunk, the File Meta Information skipped (blocking)."""
        self.path = path
        self.chunk_size = chunk_size
        # Unbuffered: each read is one system call straight into the returned bytes.
        self._handle: BinaryIO | None = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by read/close
        try:
            size = os.fstat(self._handle.fileno()).st_size
            lead = self._read_exactly(min(size, chunk_size))
            start = dicom.data_set_offset(lead)
            if start > size:
                raise dicom.DataSetError("File Meta Information truncated")
            if start > len(lead):
                # A File Meta Information longer than a chunk: the data set starts further on.
                self._handle.seek(start)
        except BaseException:
            self.close()
            raise
        consumed = max(start, len(lead))
        self.remaining = size - consumed
        # The rest of the first read is the first chunk (empty only for an empty data set).
        self._first: memoryview | None = None
        if start < len(lead) or start == size:
            self._first = memoryview(lead)[start:]
        # PS3.5 7.1: a data set is even; an odd file (a deflated stream) gets one pad byte.
        self._pad = (size - start) % 2 == 1

    @classmethod
    def open(cls, path: Path) -> tuple[DatasetReader, tuple[bytes | memoryview, bool]]:
        """Open a file and read its first chunk: one executor trip for most instances."""
        reader = cls(path)
        return reader, reader.read()

    def _read_exactly(self, count: int) -> bytes:
        assert self._handle is not None
        data = self._handle.read(count)
        while len(data) < count:
            more = self._handle.read(count - len(data))
            if not more:
                raise OSError(f"{self.path} shrank while being read")
            data += more
        return data

    def read(self) -> tuple[bytes | memoryview, bool]:
        """The next chunk and whether it is the last; the file is closed after the last."""
        if self._first is not None:
            data, self._first = self._first, None
        else:
            assert self._handle is not None, "read past the end"
            data = self._read_exactly(min(self.chunk_size, self.remaining))
            self.remaining -= len(data)
        last = self.remaining == 0
        if last:
            self.close()
            if self._pad:
                data = bytes(data) + b"\0"
        return data, last

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
