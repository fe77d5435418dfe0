"""What making one new instance file durable costs on a filesystem: the C-STORE floor.

Run: .venv/bin/python -m bench.flush [--folder DIR] [--count 300] [--size 14336]
Each way is timed over `count` files of `size` bytes in a temporary folder under DIR
(default: the current folder, which should be on the store's filesystem), one at a time,
as one association stores: a new file fsynced with its folder (storage.flush = "file"),
a new file linked into place and made durable by syncfs (storage.flush = "filesystem"),
as the device's own floor, an overwrite of preallocated space with fdatasync; then,
taking turns file by file, a linked file with `--work-us` of CPU work before its syncfs
(the index commit a lone store makes there), without and with its writeback started
first (as storage.writeback does for such a store).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from minipacs.storage import groupflush, writeback


def _timed(count: int, step: Callable[[int], None]) -> tuple[float, float]:
    """Median and 90th percentile of `step(i)` over count calls, in ms."""
    return _alternating(count, [step])[0]


def _alternating(count: int, steps: list[Callable[[int], None]]) -> list[tuple[float, float]]:
    """_timed for several ways taking turns file by file, so that drift hits each alike."""
    times: list[list[float]] = [[] for _ in steps]
    for i in range(count):
        for way, step in enumerate(steps):
            started = time.perf_counter()
            step(i)
            times[way].append((time.perf_counter() - started) * 1000)
    for values in times:
        values.sort()
    return [(statistics.median(v), v[int(len(v) * 0.9)]) for v in times]


def main() -> None:
    """Time each way of flushing a new file; print a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folder", default=".", help="where to write (the store's filesystem)")
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--size", type=int, default=14 * 1024, help="bytes per file")
    parser.add_argument(
        "--work-us", type=int, default=400, help="CPU work before the syncfs (index commit)"
    )
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

        def staged(name: str, work: bool = False, early: bool = False) -> Callable[[int], None]:
            """Write, link, optionally work (and start the writeback first), then syncfs."""

            def step(i: int) -> None:
                temp = root / "tmp" / f"{name}{i}"
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, data)
                if early:
                    writeback.start(fd)
                os.link(temp, root / "dest" / f"{name}{i}")
                os.unlink(temp)
                if work:
                    until = time.perf_counter() + args.work_us / 1e6
                    while time.perf_counter() < until:
                        pass
                assert group is not None
                group.flush()
                os.close(fd)

            return step

        preallocated = os.open(root / "preallocated", os.O_RDWR | os.O_CREAT, 0o644)
        os.write(preallocated, bytes(args.size * args.count))
        os.fsync(preallocated)

        def overwrite_and_fdatasync(i: int) -> None:
            os.pwrite(preallocated, data, i * args.size)
            os.fdatasync(preallocated)

        ways: list[tuple[str, Callable[[int], None] | None]] = [
            ("new file: fsync file + folder", fsync_file_and_folder),
            ("new file: link + syncfs", staged("s") if group else None),
            ("device floor: overwrite + fdatasync", overwrite_and_fdatasync),
        ]
        print(f"{args.count} files of {args.size} bytes in {root.parent.resolve()}")
        for name, step in ways:
            if step is None:
                print(f"{name:38s} not here: {groupflush.unsupported(root)}")
                continue
            median, p90 = _timed(args.count, step)
            print(f"{name:38s} median {median:6.3f} ms   p90 {p90:6.3f} ms")
        if group is not None:
            names = [
                f"link, {args.work_us} us work, syncfs",
                "the same, writeback started first",
            ]
            paired = _alternating(args.count, [staged("w", True), staged("e", True, True)])
            for name, (median, p90) in zip(names, paired, strict=True):
                print(f"{name:38s} median {median:6.3f} ms   p90 {p90:6.3f} ms")
        os.close(preallocated)
        os.close(folder_fd)
        if group is not None:
            group.close()


if __name__ == "__main__":
    main()
