"""Timed rounds shared by the benchmarks: servers alternate, the median is kept."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Sequence


def alternate(
    rounds: int, names: Sequence[str], label: str, count: int, run: Callable[[str], float]
) -> dict[str, float]:
    """Time `run(name)` `rounds` times per server, servers taking turns; medians by name."""
    times = alternate_rounds(rounds, names, label, count, run)
    return {name: statistics.median(values) for name, values in times.items()}


def alternate_rounds(
    rounds: int, names: Sequence[str], label: str, count: int, run: Callable[[str], float]
) -> dict[str, list[float]]:
    """As alternate, but every round's seconds by name, in round order."""
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names:
            elapsed = run(name)
            times[name].append(elapsed)
            print(
                f"  {label:15s} round {round_ + 1} {name:12s} {count / elapsed:8.1f} inst/s",
                file=sys.stderr,
            )
    return times
