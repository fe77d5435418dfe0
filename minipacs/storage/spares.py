"""Empty temp files made in batches between stores, for stores to write into.

Creating the file is the costliest metadata step of a store. ext4 allocates an inode, and
when files were deleted in the last minute (a study pruned or forwarded, a store folder
cleared) it first passes over every recently freed inode of the group (recently_deleted
in fs/ext4/ialloc.c): ~0.3 ms of kernel time per file here, with a journal handle open.
One association of small instances right after such deletions stored 1000 instances in
2.33-2.44 s making each file in the store, 1.95-1.99 s into files made beforehand.

Made one at a time, between stores or by a thread of their own, spares gained nothing:
each store's flush (a syncfs, which waits for every open journal handle) then met a file
being made. So they are made many at once, when few are left and no store is in flight
(StoreService): one batch meets a few flushes, the stores after it none. Only names are
kept, not descriptors: opening an existing file allocates nothing. A spare left unused
for long is not used: another node's cleanup may have taken it for a dead writer's
leftover (filestore.STALE_SECONDS).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable

# Seconds a spare may wait to be taken; older ones are removed instead.
MAX_AGE = 600.0


class Spares:
    """Empty files made ahead in batches, each taken once, open for writing."""

    def __init__(self, make: Callable[[], str], keep: int) -> None:
        """Make up to `keep` files with `make` (refill), once fewer than an eighth are left."""
        self._make = make
        self._keep = keep
        self._low = max(1, keep // 8)
        # (made at, path), oldest first; deque ends are thread-safe.
        self._ready: deque[tuple[float, str]] = deque()
        self._refilling = threading.Lock()

    def take(self) -> tuple[str, int] | None:
        """A spare's path and a descriptor open for writing; None when none is ready."""
        while True:
            try:
                made, path = self._ready.popleft()
            except IndexError:
                return None
            if time.monotonic() - made < MAX_AGE:
                try:
                    return path, os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                except OSError:
                    continue  # gone after all: the store makes its own file
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def wanted(self) -> bool:
        """Whether refill() would make a batch now."""
        return len(self._ready) < self._low

    def refill(self) -> None:
        """Make spares until `keep` are ready (blocking); an OSError stops it, unraised."""
        # A failure (full disk, say) is the next store's to report, for itself.
        with self._refilling, contextlib.suppress(OSError):
            while len(self._ready) < self._keep:
                self._ready.append((time.monotonic(), self._make()))

    def close(self) -> None:
        """Remove the spares not taken."""
        with self._refilling:
            while self._ready:
                _, path = self._ready.popleft()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
