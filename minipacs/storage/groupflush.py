"""One syncfs(2) of the store's filesystem makes the new files of many threads durable.

Flushing a new file one by one takes two device flushes (the file, then its folder's
entry), and with several associations storing at once the disk spends its time on
flushes. A group flush serves every thread that asked before it began: whoever asks
while none is running leads and calls syncfs, the others wait for the first flush that
starts after they asked (the group commit of databases). syncfs writes back every dirty
file and folder of the filesystem and flushes the device cache (Linux 2.6.39 and later;
errors are reported since 5.8), so it covers data and entries alike. Where it is
missing, the store flushes file by file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable

# Failed flushes are remembered this many generations back, for the waiters they cover.
_FAILURES_KEPT = 64


def _load_syncfs() -> Callable[[int], int] | None:
    """libc's syncfs, or None where there is none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        function = libc.syncfs
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_SYNCFS = _load_syncfs()


def available() -> bool:
    """Whether this system has syncfs(2)."""
    return _SYNCFS is not None


class GroupFlush:
    """Group flushes of the filesystem holding one folder."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        """Open the folder whose filesystem is flushed (needs available())."""
        if _SYNCFS is None:
            raise OSError("syncfs(2) is not available")
        self._syncfs = _SYNCFS
        self._fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._cond = threading.Condition()
        self._started = 0
        self._done = 0
        self._running = False
        self._failures: dict[int, OSError] = {}
        # syncfs calls made: under load far fewer than flush() calls.
        self.flushes = 0

    def flush(self) -> None:
        """Return once a flush that began after this call has ended; raise if it failed."""
        with self._cond:
            wanted = self._started + 1
            while self._done < wanted:
                if not self._running:
                    self._running = True
                    self._started += 1
                    generation = self._started
                    break
                self._cond.wait()
            else:
                # Generations start one at a time: exactly `wanted` was the first to begin
                # after this call, so its outcome is this call's.
                failure = self._failures.get(wanted)
                if failure is not None:
                    raise failure
                return
        error = None
        try:
            # ctypes lets the GIL go for the call: the other threads go on meanwhile.
            if self._syncfs(self._fd) != 0:
                code = ctypes.get_errno()
                error = OSError(code, f"syncfs: {os.strerror(code)}")
        finally:
            with self._cond:
                self._running = False
                self._done = generation
                self.flushes += 1
                if error is not None:
                    self._failures[generation] = error
                for old in [g for g in self._failures if g <= generation - _FAILURES_KEPT]:
                    del self._failures[old]
                self._cond.notify_all()
        if error is not None:
            raise error

    def close(self) -> None:
        """Release the folder."""
        os.close(self._fd)
