"""Group flushes: one syncfs serves every caller that asked before it began."""

from __future__ import annotations

import ctypes
import errno
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from minipacs.storage import groupflush
from minipacs.storage.filestore import FileStore
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


def test_a_leader_that_raises_fails_its_waiters_too(tmp_path: Path) -> None:
    group = GroupFlush(tmp_path)

    def broken(fd: int) -> int:
        time.sleep(0.05)
        raise RuntimeError("simulated crash inside the flush")

    group._syncfs = broken  # type: ignore[assignment]
    outcomes: list[str] = []

    def flush() -> None:
        try:
            group.flush()
            outcomes.append("ok")
        except (OSError, RuntimeError) as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=flush) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert "ok" not in outcomes and len(outcomes) == 4
    group.close()


def test_group_flushes_are_refused_where_syncfs_cannot_be_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(groupflush, "_kernel", lambda: (5, 4))
    assert "5.8" in str(groupflush.unsupported(tmp_path))
    monkeypatch.setattr(groupflush, "_kernel", lambda: (6, 1))
    monkeypatch.setattr(groupflush, "filesystem_type", lambda folder: "fuse.sshfs")
    assert "fuse.sshfs" in str(groupflush.unsupported(tmp_path))
    # The store then flushes file by file, and says so.
    store = FileStore(tmp_path / "store", tmp_path / "spool", 0, flush="filesystem")
    assert store._group is None


def _fails_since_mark(group: GroupFlush, mark: int | None, flush: Callable[..., None]) -> None:
    """A flush failing after `mark` fails a later flush(since=mark), not a plain flush()."""
    calls: list[float] = []
    group._syncfs = _slow_syncfs(calls, fail=True)  # type: ignore[assignment]
    with pytest.raises(OSError):
        flush()
    group._syncfs = _slow_syncfs(calls)  # type: ignore[assignment]
    flush()  # a caller that wrote after the failure is fine
    with pytest.raises(OSError):
        flush(since=mark)


def test_a_failure_since_a_file_was_written_fails_its_flush(tmp_path: Path) -> None:
    # Writeback of the file may fail during an earlier group's flush, which reports it.
    group = GroupFlush(tmp_path)
    _fails_since_mark(group, group.mark(), group.flush)
    group.close()


def test_the_stores_flush_all_reports_failures_since_its_mark(tmp_path: Path) -> None:
    # A commit's WAL pages may be written back, and fail, in a flush already running.
    store = FileStore(tmp_path / "store", tmp_path / "spool", 0, True, "filesystem")
    if store._group is None:
        pytest.skip("no group flush on this filesystem")
    _fails_since_mark(store._group, store.flush_mark(), store.flush_all)
    store.close()
    with pytest.raises(OSError):
        store.flush_all()  # closed: no group flush, an error the store service reports
