"""Empty temp files made in batches between stores, for stores to write into.

Creating the file is the costliest metadata step of a store. ext4 allocates an inode, and
when files were deleted in the last minute (a study pruned or forwarded, a store folder
cleared) it first passes over every recently freed inode of the group (recently_deleted
in fs/ext4/ialloc.c): ~0.3 ms of kernel time per file here, with a journal handle open.
One association of small instances right after such deletions stored 1000 instances in
2.33-2.44 s making each file in the store, 1.95-1.99 s into files made beforehand.

Made one at a time, between stores or by a thread of their own, spares gained nothing:
each store's flush (a syncfs, which waits for every open journal handle) then met a file
being made. So they are made many at once, in a batch started when few are left and no
store is in flight (StoreService), one batch at a time: it meets a few flushes, the
stores after it none. Only names are kept, not descriptors: opening an existing file
allocates nothing. Another node's cleanup takes temp files untouched for an hour for a
dead writer's (filestore.STALE_SECONDS), so a spare that waited long is touched before
it is written into rather than removed, which would free inodes again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger("minipacs.store")

# Seconds after which a spare is touched before it is used (well below STALE_SECONDS).
TOUCH_AFTER = 600.0
# Seconds without a batch after one failed (a full disk, an unwritable folder).
_FAILED_PAUSE = 60.0


class Spares:
    """Empty files made ahead in batches, each taken once, open for writing."""

    def __init__(self, make: Callable[[], str], keep: int) -> None:
        """Make up to `keep` files with `make` (refill), once fewer than an eighth are left."""
        self._make = make
        self._keep = keep
        self._low = max(1, keep // 8)
        # (made or touched at, path), oldest first; deque ends are thread-safe.
        self._ready: deque[tuple[float, str]] = deque()
        self._lock = threading.Lock()
        # A batch is due or being made; then no other is asked for.
        self._queued = False
        self._closed = False
        self._failed_at = -_FAILED_PAUSE

    def take(self) -> tuple[str, int] | None:
        """A spare's path and a descriptor open for writing; None when none is ready."""
        while True:
            try:
                made, path = self._ready.popleft()
            except IndexError:
                return None
            try:
                if time.time() - made >= TOUCH_AFTER:
                    os.utime(path)
                return path, os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # removed after all: the next one
            except OSError:
                # Out of descriptors, say: the store's own file would fail the same way.
                self._ready.appendleft((made, path))
                return None

    def batch_due(self) -> bool:
        """Whether a refill should be run now; True once, until that refill has run."""
        with self._lock:
            due = (
                not self._queued
                and not self._closed
                and len(self._ready) < self._low
                and time.monotonic() - self._failed_at >= _FAILED_PAUSE
            )
            self._queued = self._queued or due
            return due

    def refill(self) -> None:
        """Make spares until `keep` are ready (blocking); a failure is logged, not raised."""
        try:
            while len(self._ready) < self._keep and not self._closed:
                self._ready.append((time.time(), self._make()))
        except OSError as exc:
            # The stores make their own files meanwhile, and report what fails for them.
            self._failed_at = time.monotonic()
            log.warning("cannot make spare files for the stores: %s", exc)
        finally:
            with self._lock:
                self._queued = False

    def close(self) -> None:
        """Remove the spares not taken; no batch is made after this."""
        with self._lock:
            self._closed = True
        while self._ready:
            _, path = self._ready.popleft()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
