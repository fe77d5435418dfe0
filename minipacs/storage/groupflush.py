"""One syncfs(2) of the store's filesystem makes the new files of many threads durable.

Flushing a new file one by one takes two device flushes (the file, then its folder's
entry), and with several associations storing at once the disk spends its time on
flushes. A group flush serves every thread that asked before it began: whoever asks
while none is running leads and calls syncfs, the others wait for the first flush that
starts after they asked (the group commit of databases). syncfs writes back every dirty
file and folder of the filesystem and flushes the device cache, so it covers data and
entries alike; but it reports writeback errors only since Linux 5.8, and on some
filesystems (FUSE without FUSE_SYNCFS, SMB) it does not make data durable at all. So it
is used only on Linux 5.8+ and on filesystems known to honour it (`unsupported` says
why not); elsewhere the store flushes file by file.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import threading

from minipacs.storage import libc

# Failed flushes are remembered this many generations back, for the waiters they cover.
_FAILURES_KEPT = 64
# syncfs reports writeback errors since Linux 5.8.
_MIN_KERNEL = (5, 8)
# Filesystems whose syncfs writes back data and metadata and flushes the device cache.
# overlay forwards it to its upper filesystem (container layers); nfs commits to the
# server. tmpfs holds nothing durable anyway.
_TRUSTED = frozenset({"ext4", "ext3", "xfs", "btrfs", "zfs", "f2fs", "nfs", "nfs4", "overlay"})


_SYNCFS = libc.function("syncfs", [ctypes.c_int])


def available() -> bool:
    """Whether this system has syncfs(2)."""
    return _SYNCFS is not None


def _kernel() -> tuple[int, int]:
    """The running kernel's (major, minor) version; (0, 0) when unknown."""
    match = re.match(r"(\d+)\.(\d+)", platform.release())
    return (int(match[1]), int(match[2])) if match else (0, 0)


def filesystem_type(folder: str | os.PathLike[str]) -> str:
    """The type of the filesystem a folder is on, from /proc/self/mounts ("" if unknown)."""
    path = os.path.realpath(folder)
    best, kind = "", ""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                # Mount points escape spaces as \040.
                point = fields[1].replace("\\040", " ")
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        return ""
    return kind


def unsupported(folder: str | os.PathLike[str]) -> str | None:
    """Why group flushes cannot be trusted for the folder's filesystem, or None."""
    if _SYNCFS is None:
        return "no syncfs(2) on this system"
    if _kernel() < _MIN_KERNEL:
        return f"Linux {platform.release()} does not report syncfs errors (5.8+ does)"
    kind = filesystem_type(folder)
    if kind not in _TRUSTED:
        return f"syncfs on a {kind or 'unknown'} filesystem may not make data durable"
    return None


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

    def mark(self) -> int:
        """The generation now: pass it to flush(since=) for data written after this call."""
        with self._cond:
            return self._started

    def flush(self, since: int | None = None) -> None:
        """Return once a flush that began after this call has ended; raise if it failed.

        With `since` (a mark() taken before the data was written), also raise if any flush
        running at or after the mark failed: writeback of the data may have failed in one, and
        syncfs reports an error to the first flush after it only.
        """
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
                self._raise_failure(wanted if since is None else since, wanted)
                return
        # Failed until the call says otherwise: a leader that raises fails its waiters too.
        error: OSError | None = OSError("syncfs did not complete")
        try:
            # ctypes lets the GIL go for the call: the other threads go on meanwhile.
            if self._syncfs(self._fd) == 0:
                error = None
            else:
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
        if since is not None:
            with self._cond:
                self._raise_failure(since, generation)

    def _raise_failure(self, first: int, last: int) -> None:
        """Raise the error of a failed generation in [first, last] (holding the lock)."""
        # Generations start one at a time: `last` was the first to begin after the call.
        for generation in range(max(first, last - _FAILURES_KEPT + 1), last + 1):
            failure = self._failures.get(generation)
            if failure is not None:
                raise failure

    def close(self) -> None:
        """Release the folder."""
        os.close(self._fd)
