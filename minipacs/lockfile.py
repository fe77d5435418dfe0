"""A lock file that processes of one host take in turn, and this process's threads too."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path


class LockFile:
    """A lock file, held by one thread of this process and one process at a time.

    One descriptor, kept open: flock excludes open files, not the threads sharing one,
    so this process's threads take a thread lock first.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        self._threads = threading.Lock()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lock for the block."""
        # Both waits let the GIL go; the kernel wakes the next process in line.
        with self._threads:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the descriptor, once; the lock must not be held."""
        os.close(self._fd)
