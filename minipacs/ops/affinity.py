"""Each serving process kept on one CPU (server.pin_cpu).

On a small virtual machine a thread woken on another CPU costs tens of microseconds (an
inter-processor interrupt through the hypervisor: `perf bench sched pipe` takes ~40 us
a round trip across two CPUs, ~2.5 us on one), and a C-STORE passes from the event loop
to a store thread, to the index writer and back; with many at once the store threads
also pass the GIL to one another at every system call. The threads of one process hold
one GIL between them, so they gain little from running on several CPUs at once; kept
on one, every hand-off stays on it. Workers (server.workers > 1) spread over the CPUs.
"""

from __future__ import annotations

import os


def process_cpu(index: int, allowed: set[int]) -> int:
    """The CPU serving process `index` runs on: the CPUs this one may use, in turn."""
    ordered = sorted(allowed)
    return ordered[index % len(ordered)]


def pin_process(index: int) -> int | None:
    """Keep every thread of this process on the CPU of process `index`; None if unsupported.

    Threads started afterwards inherit the placement of the thread that starts them.
    """
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpu = process_cpu(index, os.sched_getaffinity(0))
    # On Linux the affinity is a thread's own: each thread there now is moved too.
    for thread in _threads():
        try:
            os.sched_setaffinity(thread, {cpu})
        except ProcessLookupError:
            continue  # ended meanwhile
    return cpu


def _threads() -> list[int]:
    """The ids of this process's threads; the calling one (0) alone if /proc is missing."""
    try:
        return [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:
        return [0]
