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
from dataclasses import dataclass


@dataclass(frozen=True)
class _Placement:
    """Where this process was pinned, and the CPUs it could use before."""

    cpu: int
    allowed: frozenset[int]


_placement: _Placement | None = None


def process_cpu(index: int, allowed: set[int] | frozenset[int]) -> int:
    """The CPU serving process `index` runs on: the CPUs this one may use, in turn."""
    ordered = sorted(allowed)
    return ordered[index % len(ordered)]


def pin_process(index: int) -> tuple[int, int]:
    """Keep every thread of this process on the CPU of process `index`.

    Returns (that CPU, the number of threads moved). Threads started afterwards inherit
    the placement of the thread that starts them; pin_thread pins one explicitly.
    Raises OSError where the system refuses it (nothing is left moved) or has no CPU
    affinity.
    """
    global _placement
    if not hasattr(os, "sched_setaffinity"):
        raise OSError("this system has no CPU affinity (sched_setaffinity)")
    allowed = _placement.allowed if _placement else frozenset(os.sched_getaffinity(0))
    cpu = process_cpu(index, allowed)
    moved: list[int] = []
    # On Linux the affinity is a thread's own: each thread there now is moved too.
    for thread in _threads():
        try:
            os.sched_setaffinity(thread, {cpu})
        except ProcessLookupError:
            continue  # ended meanwhile
        except OSError:
            # Half pinned would be neither setting: put back the ones already moved.
            for done in moved:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(done, allowed)
            raise
        moved.append(thread)
    _placement = _Placement(cpu, allowed)
    return cpu, len(moved)


def pin_thread() -> None:
    """Keep the calling thread on this process's CPU, if pin_process placed it."""
    if _placement is not None:
        # Refused, the thread runs anywhere: slower hand-offs, nothing worse.
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {_placement.cpu})


def unpin_thread() -> None:
    """Let the calling thread run on every CPU the process had before pin_process."""
    if _placement is not None:
        # Refused, the thread stays on the pinned CPU: slower queries, nothing worse.
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, _placement.allowed)


def _threads() -> list[int]:
    """The ids of this process's threads; the calling one (0) alone if /proc is missing."""
    try:
        return [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:
        return [0]
