"""A/B C-STORE benchmark: two builds or settings of minipacs, interleaved round by round.

Run: .venv/bin/python -m bench.ab A B [--rounds 6] [--scenarios small:1,small:8]
         [--db sqlite|pg] [--small 3000] [--ct 300]
A side is a git revision, optionally with settings: "HEAD", "main~2",
"HEAD,MINIPACS_STORAGE_FLUSH=file". Each revision is checked out in a temporary worktree
and served from it (PYTHONPATH); each PostgreSQL database is upgraded by the revision
that serves it, so the two sides may differ by a migration.

The same code reads ±10% from one run to the next on these machines, so one run each
decides nothing: the sides alternate (A, B, A, B...) with the system's dirty pages
synced before each, and the report gives every round's B/A ratio besides the median.
A change is worth believing when the lowest ratio is above 1, or the highest below it.
Each round also reads the minipacs processes' CPU seconds (bench.proctime; not
PostgreSQL's), and the report gives the CPU per instance and its B/A ratios, which
usually straddle 1 less than the throughput's (bench.proctime says how far to trust them).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench import datasets
from bench.peers import kept_stores
from bench.proctime import tree_cpu
from bench.rounds import alternate_rounds
from bench.store import Scenario, Servers, store

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Side:
    """One side of the comparison: a revision and the settings it runs with."""

    label: str
    revision: str
    env: dict[str, str]


def parse_side(text: str) -> Side:
    """ "REV[,MINIPACS_X=V...]" as a Side."""
    revision, *settings = text.split(",")
    env = dict(item.split("=", 1) for item in settings if "=" in item)
    if len(env) != len(settings) or any(not name.startswith("MINIPACS_") for name in env):
        raise SystemExit(f"{text!r}: settings are MINIPACS_NAME=VALUE after the revision")
    return Side(text, revision, env)


@contextlib.contextmanager
def worktree(revision: str, parent: Path) -> Iterator[Path]:
    """A detached checkout of `revision` under `parent`, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="ab-", dir=parent))
    git = ["git", "-C", str(REPO)]
    subprocess.run([*git, "worktree", "add", "--detach", str(path), revision], check=True)
    try:
        yield path
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(path)], check=False)


def main() -> None:
    """Measure both sides on every scenario, alternating; print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("a", help="baseline: REV[,MINIPACS_X=V...]")
    parser.add_argument("b", help="candidate: REV[,MINIPACS_X=V...]")
    parser.add_argument("--rounds", type=int, default=6, choices=range(1, 101), metavar="N")
    parser.add_argument("--scenarios", default="small:1,small:8", help="kind:associations,...")
    parser.add_argument("--db", choices=("sqlite", "pg"), default="sqlite")
    parser.add_argument("--small", type=int, default=3000, help="number of small instances")
    parser.add_argument("--ct", type=int, default=300, help="number of CT-size instances")
    args = parser.parse_args()
    sides = [parse_side(args.a), parse_side(args.b)]
    wanted = []
    for item in args.scenarios.split(","):
        kind, _, count = item.partition(":")
        if kind not in ("small", "ct") or not count.isdigit():
            parser.error(f"scenario {item!r}: small:N or ct:N (N associations)")
        wanted.append((kind, int(count)))
    server = "minipacs-pg" if args.db == "pg" else "minipacs"

    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-ab-")))
        stack.enter_context(kept_stores())
        revisions = {side.revision for side in sides}
        trees = {rev: stack.enter_context(worktree(rev, root)) for rev in revisions}
        kinds = {kind for kind, _ in wanted}
        files = {}
        if "small" in kinds:
            files["small"] = datasets.small(root / "small", args.small)
        if "ct" in kinds:
            files["ct"] = datasets.ct(root / "ct", args.ct)
        servers = Servers([server])
        stack.callback(servers.close)
        # Named by position too: an A/A run ("HEAD HEAD") measures the noise.
        named = {f"{key} {side.label}": side for key, side in zip("AB", sides, strict=True)}
        for kind, associations in wanted:
            scenario = Scenario(f"{kind}, {associations} assoc", files[kind], associations)
            # Server CPU seconds per instance, by side, in round order.
            cpu: dict[str, list[float]] = {name: [] for name in named}

            def run(
                name: str, scenario: Scenario = scenario, cpu: dict[str, list[float]] = cpu
            ) -> float:
                side = named[name]
                servers.minipacs_env = {"PYTHONPATH": str(trees[side.revision]), **side.env}
                os.sync()
                with servers.start(server, scenario.associations) as peer:
                    before = tree_cpu(peer.process.pid)
                    elapsed = store(peer, scenario)
                    used = tree_cpu(peer.process.pid) - before
                cpu[name].append(used / scenario.files.count)
                return elapsed

            times = alternate_rounds(
                args.rounds, list(named), scenario.name, scenario.files.count, run
            )
            a, b = ([scenario.files.count / t for t in times[name]] for name in named)
            print(_report(f"{scenario.name:15s} {args.db:6s}", "/s", a, b))
            a, b = ([seconds * 1e6 for seconds in cpu[name]] for name in named)
            print(_report(f"{'':15s} {'cpu':6s}", " us", a, b))


def _report(label: str, unit: str, a: list[float], b: list[float]) -> str:
    """One line: both sides' medians, and the B/A ratio of each round, sorted."""
    ratios = sorted(y / x for x, y in zip(a, b, strict=True))
    return (
        f"{label} A {statistics.median(a):7.1f}{unit}  B {statistics.median(b):7.1f}{unit}"
        f"  B/A median {statistics.median(ratios):.3f}"
        f"  rounds {' '.join(f'{r:.2f}' for r in ratios)}"
    )


if __name__ == "__main__":
    main()
