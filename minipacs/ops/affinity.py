"""Each serving process kept on one CPU (server.pin_cpu).

On a small virtual machine a thread woken on another CPU costs tens of microseconds (an
inter-processor interrupt through the hypervisor: `perf bench sched pipe` takes ~40 us
a round trip across two CPUs, ~2.5 us on one), and a C-STORE passes from the event loop
to a store thread, to the index writer and back; with many at once the store threads
also pass the GIL to one another at every system call. The threads of one process hold
one GIL between them, so they gain little from running on several CPUs at once; kept
on one, every hand-off stays on it. Workers (server.workers > 1) spread over the CPUs.

The query threads are let go again (unpin_thread): a C-FIND spends most of its time in
SQLite, without the GIL, and several of them run side by side on other CPUs while the
pinned threads store.
"""

from __future__ import annotations

import contextlib
import os

# The CPUs this process could run on before pin_process; None while it is not pinned.
_unpinned: set[int] | None = None


def process_cpu(index: int, allowed: set[int]) -> int:
    """The CPU serving process `index` runs on: the CPUs this one may use, in turn."""
    ordered = sorted(allowed)
    return ordered[index % len(ordered)]


def pin_process(index: int) -> int:
    """Keep every thread of this process on the CPU of process `index`; return that CPU.

    Threads started afterwards inherit the placement of the thread that starts them.
    Raises OSError where the system refuses it or has no CPU affinity.
    """
    if not hasattr(os, "sched_setaffinity"):
        raise OSError("this system has no CPU affinity (sched_setaffinity)")
    global _unpinned
    allowed = os.sched_getaffinity(0)
    cpu = process_cpu(index, allowed)
    # On Linux the affinity is a thread's own: each thread there now is moved too.
    for thread in _threads():
        try:
            os.sched_setaffinity(thread, {cpu})
        except ProcessLookupError:
            continue  # ended meanwhile
    _unpinned = allowed
    return cpu


def unpin_thread() -> None:
    """Let the calling thread run on every CPU the process had before pin_process."""
    if _unpinned is not None:
        # Refused, the thread stays on the pinned CPU: slower queries, nothing worse.
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, _unpinned)


def _threads() -> list[int]:
    """The ids of this process's threads; the calling one (0) alone if /proc is missing."""
    try:
        return [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:
        return [0]
