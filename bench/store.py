"""C-STORE benchmark: instances/s and MB/s into minipacs (SQLite, PostgreSQL), storescp, Orthanc.

Run: .venv/bin/python -m bench.store [--rounds 3] [--small 1000] [--ct 200] [--only a,b]
         [--set MINIPACS_STORAGE_FSYNC=false ...]
Clients are DCMTK storescu processes: one association sending every file, or 8 concurrent
associations (8 processes), each sending its own files. Every round starts each server
fresh with an empty store, and no store is deleted before the end (peers.kept_stores);
rounds alternate servers; the table shows medians and the ratios minipacs / Orthanc and
minipacs / DCMTK (higher is better). A probe then measures
minipacs' event-loop responsiveness (C-ECHO latency every 20 ms) during the 8-association
small-instance store.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench import datasets
from bench.peers import (
    Peer,
    dcmtk_env,
    echo_probe,
    kept_stores,
    minipacs,
    minipacs_pg,
    orthanc,
    storescp,
)
from bench.rounds import alternate

SERVERS = ["minipacs", "minipacs-pg", "dcmtk", "orthanc"]
CLIENT_TIMEOUT = 1800.0


@dataclass(frozen=True)
class Scenario:
    """What is sent: a file set over one or several concurrent associations."""

    name: str
    files: datasets.FileSet
    associations: int

    def client_dirs(self) -> list[list[Path]]:
        """The folders each storescu process sends."""
        if self.associations == 1:
            return [self.files.parts]
        return [[part] for part in self.files.parts]


class Servers:
    """Starts a fresh server by name; owns the shared PostgreSQL cluster if one is needed."""

    def __init__(self, names: list[str], minipacs_env: dict[str, str] | None = None) -> None:
        # Settings for both minipacs servers (MINIPACS_... environment variables).
        self.minipacs_env = minipacs_env or {}
        self.postgres = None
        if "minipacs-pg" in names:
            from tests.pgserver import start_postgres

            # The goal is a store durable before its success: PostgreSQL's own commits
            # included, so it flushes them (fsync on) as a deployment does.
            self.postgres = start_postgres(durable=True)

    @contextlib.contextmanager
    def start(self, name: str, associations: int) -> Iterator[Peer]:
        """A fresh server with an empty store."""
        if name == "minipacs":
            with minipacs(**self.minipacs_env) as peer:
                yield peer
        elif name == "minipacs-pg":
            assert self.postgres is not None
            with minipacs_pg(self.postgres, **self.minipacs_env) as peer:
                yield peer
        elif name == "dcmtk":
            with storescp(*(["--fork"] if associations > 1 else [])) as peer:
                yield peer
        elif name == "orthanc":
            with orthanc() as peer:
                yield peer
        else:
            raise SystemExit(f"unknown server {name!r}; choose from {', '.join(SERVERS)}")

    def close(self) -> None:
        """Stop the PostgreSQL cluster, if any."""
        if self.postgres is not None:
            self.postgres.stop()


def storescu_args(peer: Peer, dirs: list[Path]) -> list[str]:
    """A storescu command line sending every file of `dirs` over one association."""
    return [
        "storescu",
        "-aec",
        peer.ae_title,
        "127.0.0.1",
        str(peer.port),
        "+sd",
        *(str(d) for d in dirs),
    ]


def _check(peer: Peer, returncode: int | None, stderr: bytes) -> None:
    """Abort the benchmark when a client failed or reported an error."""
    text = stderr.decode(errors="replace")
    errors = [line for line in text.splitlines() if line.startswith(("E:", "F:"))]
    if returncode != 0 or errors:
        raise SystemExit(f"storescu against {peer.name} exited {returncode}:\n{text[-4000:]}")


def store(peer: Peer, scenario: Scenario) -> float:
    """Seconds from starting the storescu processes until all have exited successfully."""
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            storescu_args(peer, dirs),
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for dirs in scenario.client_dirs()
    ]
    outputs = [p.communicate(timeout=CLIENT_TIMEOUT)[1] for p in processes]
    elapsed = time.perf_counter() - started
    for process, stderr in zip(processes, outputs, strict=True):
        _check(peer, process.returncode, stderr)
    return elapsed


async def _probed_store(peer: Peer, scenario: Scenario, idle: float) -> tuple[list[float], ...]:
    stop = asyncio.Event()
    probe = asyncio.create_task(echo_probe(peer, stop))
    await asyncio.sleep(idle)
    stop.set()
    idle_latencies = await probe
    stop = asyncio.Event()
    probe = asyncio.create_task(echo_probe(peer, stop))
    started = time.perf_counter()
    processes = [
        await asyncio.create_subprocess_exec(
            *storescu_args(peer, dirs),
            env=dcmtk_env(),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        for dirs in scenario.client_dirs()
    ]
    outputs = await asyncio.gather(*(p.communicate() for p in processes))
    elapsed = time.perf_counter() - started
    stop.set()
    loaded = await probe
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        _check(peer, process.returncode, stderr)
    return idle_latencies, loaded, [elapsed]


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def probe_report(servers: Servers, name: str, scenario: Scenario) -> None:
    """Print minipacs' C-ECHO latency idle and during a store."""
    with servers.start(name, scenario.associations) as peer:
        idle, loaded, (elapsed,) = asyncio.run(_probed_store(peer, scenario, 3.0))
    print(
        f"{name:12s} probe during '{scenario.name}' ({scenario.files.count / elapsed:.0f} inst/s):"
        f" idle median {statistics.median(idle):6.2f} ms p99 {_p99(idle):6.2f} ms (n={len(idle)});"
        f" loaded median {statistics.median(loaded):6.2f} ms p99 {_p99(loaded):6.2f} ms"
        f" max {max(loaded):6.1f} ms (n={len(loaded)})"
    )


def _ratio(ours: float, theirs: float | None) -> str:
    return f"{ours / theirs:5.2f}x" if theirs else "    -"


def main() -> None:
    """Generate the data, measure every scenario and server, print a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small", type=int, default=1000, help="number of small instances")
    parser.add_argument("--ct", type=int, default=200, help="number of CT-size instances")
    parser.add_argument("--only", default=",".join(SERVERS), help="comma-separated servers")
    parser.add_argument("--no-probe", action="store_true", help="skip the latency probe")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="VAR=VALUE",
        help="environment setting for minipacs, e.g. MINIPACS_STORAGE_FSYNC=false (repeatable)",
    )
    args = parser.parse_args()
    minipacs_env = dict(item.split("=", 1) for item in args.set if "=" in item)
    if len(minipacs_env) != len(args.set) or any(
        not name.startswith("MINIPACS_") for name in minipacs_env
    ):
        parser.error("--set takes MINIPACS_NAME=VALUE")
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - set(SERVERS)
    if unknown:
        parser.error(f"unknown servers {sorted(unknown)}; choose from {', '.join(SERVERS)}")

    with tempfile.TemporaryDirectory(prefix="bench-store-data-") as tmp, kept_stores():
        root = Path(tmp)
        started = time.perf_counter()
        small = datasets.small(root / "small", args.small)
        ct = datasets.ct(root / "ct", args.ct)
        print(
            f"generated {small.count} small ({small.total_bytes / small.count / 1024:.1f} KiB)"
            f" and {ct.count} CT-size ({ct.total_bytes / ct.count / 1024:.1f} KiB) files"
            f" in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
        scenarios = [
            Scenario("small, 1 assoc", small, 1),
            Scenario("small, 8 assoc", small, 8),
            Scenario("CT, 1 assoc", ct, 1),
            Scenario("CT, 8 assoc", ct, 8),
        ]
        servers = Servers(names, minipacs_env)
        try:
            results: dict[tuple[str, str], float] = {}
            for scenario in scenarios:

                def run(name: str, scenario: Scenario = scenario) -> float:
                    # Every server starts with nothing dirty left by the one before (data
                    # files PostgreSQL has not checkpointed, say): whoever flushes the
                    # whole filesystem (syncfs) would otherwise pay for another's writes.
                    os.sync()
                    with servers.start(name, scenario.associations) as peer:
                        return store(peer, scenario)

                medians = alternate(args.rounds, names, scenario.name, scenario.files.count, run)
                for name in names:
                    results[scenario.name, name] = medians[name]

            print()
            print(
                f"{'scenario':16s} {'server':12s} {'inst/s':>9s} {'MB/s':>8s}"
                f" {'vs Orthanc':>10s} {'vs DCMTK':>9s}"
            )
            for scenario in scenarios:
                rate = {n: scenario.files.count / results[scenario.name, n] for n in names}
                for name in names:
                    megabytes = scenario.files.total_bytes / 1e6 / results[scenario.name, name]
                    ratios = ("", "")
                    if name.startswith("minipacs"):
                        ratios = (
                            _ratio(rate[name], rate.get("orthanc")),
                            _ratio(rate[name], rate.get("dcmtk")),
                        )
                    print(
                        f"{scenario.name:16s} {name:12s} {rate[name]:9.1f} {megabytes:8.2f}"
                        f" {ratios[0]:>10s} {ratios[1]:>9s}"
                    )
            print()
            if not args.no_probe:
                for name in names:
                    if name.startswith("minipacs"):
                        probe_report(servers, name, scenarios[1])
        finally:
            servers.close()


if __name__ == "__main__":
    main()
