"""CPU time of a process and its descendants, read from /proc (Linux).

A server's CPU seconds per instance usually moved less from round to round on these
machines than its instances per second (bench.ab prints both), so a change's CPU saving
can show where its throughput gain is lost in the noise. Not always: one A/A run on
PostgreSQL read CPU ratios of 0.67 and 0.97.
"""

from __future__ import annotations

import os
from pathlib import Path


def _stat(entry: Path) -> tuple[int, int] | None:
    """(parent PID, CPU ticks of the process and its reaped children), None if gone."""
    try:
        text = (entry / "stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields after it start past
    # the last ")". proc(5): ppid is field 4; utime, stime, cutime, cstime 14-17.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), sum(int(value) for value in fields[11:15])


def tree_cpu(pid: int) -> float:
    """Seconds of CPU (user and system) used so far by `pid` and its descendants."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            found = _stat(entry)
            if found is not None:
                stats[int(entry.name)] = found
    children: dict[int, list[int]] = {}
    for child, (parent, _) in stats.items():
        children.setdefault(parent, []).append(child)
    ticks = 0
    todo = [pid]
    while todo:
        current = todo.pop()
        if current in stats:
            ticks += stats[current][1]
        todo.extend(children.get(current, []))
    return ticks / os.sysconf("SC_CLK_TCK")
