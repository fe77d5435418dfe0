"""What making one new instance file durable costs on a filesystem: the C-STORE floor.

Run: .venv/bin/python -m bench.flush [--folder DIR] [--count 300] [--size 14336]
Each way is timed over `count` files of `size` bytes in a temporary folder under DIR
(default: the current folder, which should be on the store's filesystem), one at a time,
as one association stores: a new file fsynced with its folder (storage.flush = "file"),
a new file linked into place and made durable by syncfs (storage.flush = "filesystem"),
and, as the device's own floor, an overwrite of preallocated space with fdatasync.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from minipacs.storage import groupflush


def _timed(count: int, step: Callable[[int], None]) -> tuple[float, float]:
    """Median and 90th percentile of `step(i)` over count calls, in ms."""
    times = []
    for i in range(count):
        started = time.perf_counter()
        step(i)
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.9)]


def main() -> None:
    """Time each way of flushing a new file; print a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folder", default=".", help="where to write (the store's filesystem)")
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--size", type=int, default=14 * 1024, help="bytes per file")
    args = parser.parse_args()
    data = os.urandom(args.size)
    with tempfile.TemporaryDirectory(prefix="bench-flush-", dir=args.folder) as tmp:
        root = Path(tmp)
        (root / "tmp").mkdir()
        (root / "dest").mkdir()
        folder_fd = os.open(root / "dest", os.O_RDONLY | os.O_DIRECTORY)

        def fsync_file_and_folder(i: int) -> None:
            fd = os.open(root / "dest" / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            os.fsync(folder_fd)

        group = None if groupflush.unsupported(root) else groupflush.GroupFlush(root)

        def link_and_syncfs(i: int) -> None:
            temp = root / "tmp" / f"s{i}"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.link(temp, root / "dest" / f"s{i}")
            os.unlink(temp)
            assert group is not None
            group.flush()
            os.close(fd)

        preallocated = os.open(root / "preallocated", os.O_RDWR | os.O_CREAT, 0o644)
        os.write(preallocated, bytes(args.size * args.count))
        os.fsync(preallocated)

        def overwrite_and_fdatasync(i: int) -> None:
            os.pwrite(preallocated, data, i * args.size)
            os.fdatasync(preallocated)

        ways: list[tuple[str, Callable[[int], None] | None]] = [
            ("new file: fsync file + folder", fsync_file_and_folder),
            ("new file: link + syncfs", link_and_syncfs if group is not None else None),
            ("device floor: overwrite + fdatasync", overwrite_and_fdatasync),
        ]
        print(f"{args.count} files of {args.size} bytes in {root.parent.resolve()}")
        for name, step in ways:
            if step is None:
                print(f"{name:38s} not here: {groupflush.unsupported(root)}")
                continue
            median, p90 = _timed(args.count, step)
            print(f"{name:38s} median {median:6.3f} ms   p90 {p90:6.3f} ms")
        os.close(preallocated)
        os.close(folder_fd)
        if group is not None:
            group.close()


if __name__ == "__main__":
    main()
