"""Group flushes: one syncfs serves every caller that asked before it began."""

from __future__ import annotations

import ctypes
import errno
import threading
import time
from pathlib import Path

import pytest

from minipacs.storage import groupflush
from minipacs.storage.groupflush import GroupFlush

pytestmark = pytest.mark.skipif(not groupflush.available(), reason="no syncfs(2) here")


def _slow_syncfs(calls: list[float], fail: bool = False) -> object:
    real = groupflush._SYNCFS
    assert real is not None

    def syncfs(fd: int) -> int:
        calls.append(time.monotonic())
        time.sleep(0.05)  # long enough for the other threads to queue up behind it
        if fail:
            ctypes.set_errno(errno.EIO)
            return -1
        return real(fd)

    return syncfs


def test_concurrent_callers_share_flushes(tmp_path: Path) -> None:
    group = GroupFlush(tmp_path)
    calls: list[float] = []
    group._syncfs = _slow_syncfs(calls)  # type: ignore[assignment]
    threads = [threading.Thread(target=group.flush) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not any(thread.is_alive() for thread in threads)
    # The first caller's flush, then one more for everyone who queued behind it.
    assert 1 <= group.flushes <= 3
    group.close()


def test_a_caller_waits_for_a_flush_that_began_after_it_asked(tmp_path: Path) -> None:
    group = GroupFlush(tmp_path)
    calls: list[float] = []
    group._syncfs = _slow_syncfs(calls)  # type: ignore[assignment]
    first = threading.Thread(target=group.flush)
    first.start()
    time.sleep(0.01)  # the first flush is running now
    asked = time.monotonic()
    group.flush()
    first.join(10)
    assert group.flushes == 2
    assert calls[1] >= asked  # a flush already running when we asked did not count
    group.close()


def test_a_failed_flush_fails_every_caller_it_covered(tmp_path: Path) -> None:
    group = GroupFlush(tmp_path)
    group._syncfs = _slow_syncfs([], fail=True)  # type: ignore[assignment]
    errors: list[BaseException] = []

    def flush() -> None:
        try:
            group.flush()
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=flush) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(errors) == 6
    assert all(getattr(e, "errno", None) == errno.EIO for e in errors)
    group.close()


def test_files_are_readable_and_whole_after_a_real_flush(tmp_path: Path) -> None:
    group = GroupFlush(tmp_path)
    (tmp_path / "a.dcm").write_bytes(b"x" * 100_000)
    group.flush()
    assert group.flushes == 1
    assert (tmp_path / "a.dcm").stat().st_size == 100_000
    group.close()
