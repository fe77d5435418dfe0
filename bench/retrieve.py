"""C-MOVE and C-GET benchmark: instances/s and MB/s of one study, minipacs against Orthanc.

Run: flock /tmp/minipacs-bench.lock .venv/bin/python -m bench.retrieve [--rounds 3]
         [--count 500] [--sizes small,ct]
Each size (64x64 "small" and 512x512 "CT", 16-bit) is one study of `count` instances,
stored once into minipacs (SQLite) and into Orthanc with DCMTK storescu. Then, `rounds`
times and alternating servers, DCMTK movescu moves the study to a DCMTK storescp
(--ignore: it receives every data set and writes nothing) and DCMTK getscu gets it
(--ignore too); the time is from starting the client until it exits. Each run checks the
client's exit code and its final status (C-MOVE: Success; C-GET: every sub-operation
completed); before the timed runs one untimed C-MOVE per server with movescu --debug checks
the Completed count of the final response (movescu -v prints no counts, and Pending
responses are optional, PS3.4 C.4.2.3.1, so their number proves nothing). The table shows
medians and the ratio minipacs / Orthanc (higher is better), and what bounds each case:
the median CPU time of the server, the storescp destination (C-MOVE) and the client
(movescu or getscu), each as a share of the run's wall time (100% = one core busy the
whole run; the clock ticks at 10 ms, so short runs are coarse).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom

from bench import datasets
from bench.peers import Peer, dcmtk_env, minipacs, orthanc, storescp
from bench.rounds import alternate
from bench.store import storescu_args

SERVERS = ("minipacs", "orthanc")
CLIENT_TIMEOUT = 600.0
_COMPLETED = re.compile(r"Number of Completed Suboperations\s*:\s*(\d+)")
_MOVE_COMPLETED = re.compile(r"Completed Suboperations\s*:\s*(\d+)")


def _run(args: list[str]) -> str:
    """Run a DCMTK client; return its stderr, or stop the benchmark when it failed."""
    result = subprocess.run(
        args, env=dcmtk_env(), capture_output=True, text=True, timeout=CLIENT_TIMEOUT, check=False
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith(("E:", "F:"))]
    if result.returncode != 0 or errors:
        raise SystemExit(f"{args[0]} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result.stderr


def load(peer: Peer, files: datasets.FileSet) -> None:
    """Store the study into a server (not timed)."""
    _run(storescu_args(peer, files.parts))


def _args(peer: Peer, how: str, study_uid: str, destination: str, log: str) -> list[str]:
    common = ["-S", log, "-aet", "BENCHSCU", "-aec", peer.ae_title]
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}"]
    if how == "C-MOVE":
        args = ["movescu", *common, "-aem", destination, *keys]
    else:
        args = ["getscu", *common, "--ignore", *keys]
    return [*args, "127.0.0.1", str(peer.port)]


def verify_move(peer: Peer, study_uid: str, count: int, destination: str) -> None:
    """One untimed C-MOVE whose final response must count `count` completed sub-operations."""
    stderr = _run(_args(peer, "C-MOVE", study_uid, destination, "--debug"))
    found = _MOVE_COMPLETED.findall(stderr.partition("Received Final Move Response")[2])
    completed = int(found[0]) if found else -1
    if completed != count:
        raise SystemExit(f"C-MOVE from {peer.name}: completed {completed} of {count}")


def retrieve(peer: Peer, how: str, study_uid: str, count: int, destination: str) -> float:
    """Seconds one C-MOVE (to `destination`) or C-GET of the study takes; checks the status."""
    args = _args(peer, how, study_uid, destination, "-v")
    started = time.perf_counter()
    stderr = _run(args)
    elapsed = time.perf_counter() - started
    if how == "C-MOVE":
        # Success: no sub-operation failed (PS3.4 C.4.2.1.5); verify_move checked the count.
        completed = count if "Final Move Response (Success)" in stderr else -1
    else:
        found = _COMPLETED.findall(stderr)
        completed = int(found[-1]) if found else -1
    if completed != count:
        raise SystemExit(
            f"{how} from {peer.name}: completed {completed} of {count}\n{stderr[-2000:]}"
        )
    return elapsed


@contextlib.contextmanager
def servers(destination: Peer, config: Path) -> Iterator[dict[str, Peer]]:
    """minipacs and Orthanc, both knowing the storescp destination."""
    modalities = {destination.ae_title: ("127.0.0.1", destination.port)}
    config.write_text(
        f'[destinations]\n{destination.ae_title} = {{ host = "127.0.0.1", '
        f"port = {destination.port} }}\n"
    )
    with (
        minipacs(MINIPACS_CONFIG=str(config)) as ours,
        orthanc(modalities=modalities) as theirs,
    ):
        yield {"minipacs": ours, "orthanc": theirs}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


Results = dict[tuple[str, str], tuple[float, tuple[float, float, float]]]


def measure(
    root: Path, destination: Peer, rounds: int, count: int, size: int
) -> tuple[Results, int]:
    """One study of `count` size x size images: median seconds and CPU shares by (op, server)."""
    files = datasets.generate(
        root, count, size, parts=1, per_series=100, series_per_study=max(1, -(-count // 100))
    )
    first = next(files.parts[0].iterdir())
    study_uid = str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)
    results: Results = {}
    shares: dict[tuple[str, str], list[tuple[float, float, float]]] = {
        (how, name): [] for how in ("C-MOVE", "C-GET") for name in SERVERS
    }
    with servers(destination, root / "minipacs.toml") as peers:
        for peer in peers.values():
            load(peer, files)
            verify_move(peer, study_uid, count, destination.ae_title)
        for how in ("C-MOVE", "C-GET"):

            def run(name: str, how: str = how) -> float:
                # The client is a reaped child: its CPU is the children's usage it adds.
                before = (peers[name].cpu_seconds(), destination.cpu_seconds(), _children_cpu())
                seconds = retrieve(peers[name], how, study_uid, count, destination.ae_title)
                after = (peers[name].cpu_seconds(), destination.cpu_seconds(), _children_cpu())
                used = [(b - a) / seconds for a, b in zip(before, after, strict=True)]
                shares[how, name].append((used[0], used[1], used[2]))
                return seconds

            medians = alternate(rounds, SERVERS, f"{size}px {how}", count, run)
            for name, seconds in medians.items():
                runs = shares[how, name]
                server, to, client = (statistics.median(s) for s in zip(*runs, strict=True))
                results[how, name] = (seconds, (server, to, client))
    return results, files.total_bytes


def main() -> None:
    """Generate the studies, measure C-MOVE and C-GET on both servers, print a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=500, help="instances in the study")
    parser.add_argument("--sizes", default="small,ct", help="small (64x64), ct (512x512)")
    args = parser.parse_args()
    sizes = {"small": 64, "ct": 512}
    chosen = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if set(chosen) - set(sizes):
        parser.error(f"unknown sizes {sorted(set(chosen) - set(sizes))}")
    measured = {}
    with tempfile.TemporaryDirectory(prefix="bench-retrieve-") as tmp, storescp("--ignore") as to:
        for size in chosen:
            measured[size] = measure(Path(tmp) / size, to, args.rounds, args.count, sizes[size])
    print()
    print(
        f"{'study':22s} {'op':7s} {'server':9s} {'inst/s':>8s} {'MB/s':>8s} {'vs Orthanc':>10s}"
        f" {'CPU: server':>11s} {'storescp':>8s} {'client':>6s}"
    )
    for size in chosen:
        results, total_bytes = measured[size]
        label = f"{args.count} x {sizes[size]}x{sizes[size]}"
        for how in ("C-MOVE", "C-GET"):
            rate = {n: args.count / results[how, n][0] for n in SERVERS}
            for name in SERVERS:
                seconds, (server, to, client) = results[how, name]
                megabytes = total_bytes / 1e6 / seconds
                ratio = f"{rate[name] / rate['orthanc']:5.2f}x" if name == "minipacs" else ""
                print(
                    f"{label:22s} {how:7s} {name:9s} {rate[name]:8.1f} {megabytes:8.2f}"
                    f" {ratio:>10s} {server:11.0%} {to:8.0%} {client:6.0%}"
                )


if __name__ == "__main__":
    main()
