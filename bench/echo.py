"""C-ECHO benchmark: round trips on one association and association set-ups per second.

Run: flock /tmp/minipacs-bench.lock .venv/bin/python -m bench.echo [--rounds 3] [--cpu N|-1]
Every figure is measured for minipacs and DCMTK's storescp in the same run, alternating
rounds, and reported as a median with the ratio minipacs / DCMTK (higher is better),
beside the server's CPU time per operation (lower is better).

What each line measures:
- RTT (echoscu): `echoscu --repeat N` sends N C-ECHOs on ONE association (DCMTK's
  echoscu loops echoSCU() over the same association; it never re-associates). A
  `--repeat 1` run is subtracted, so process start, set-up and release are not counted.
- set-ups (echoscu): one echoscu process per association (associate, one C-ECHO,
  release), one after another. echoscu's own start-up (~15 ms) dominates the wall time,
  so this ratio stays near 1; the server CPU per association is the telling figure.
- RTT and set-ups (asyncio SCU): the same with our requestor, in-process, no exec.

Placement: by default the bench, both servers and every client run on one CPU (`--cpu`,
the last one unless told). Unpinned (`--cpu -1`), a ping-pong on this 2-vCPU VM is
bimodal: when the scheduler keeps client and server on one CPU a round trip is ~25 us,
across CPUs the wake-up alone is ~200 us, and which one a run gets is luck, so medians
of unpinned runs swing from 0.4x to 0.8x between identical runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.peers import Peer, dcmtk_env, minipacs, storescp
from minipacs.net.client import ClientAssociation
from minipacs.net.negotiation import UNCOMPRESSED_TRANSFER_SYNTAXES, VERIFICATION

CONTEXTS = [(VERIFICATION, UNCOMPRESSED_TRANSFER_SYNTAXES)]
IDLE_ASSOCIATIONS = 200
CLIENT_TIMEOUT = 600.0


@dataclass(frozen=True)
class Run:
    """One timed run: operations done, wall seconds, server CPU seconds."""

    count: int
    seconds: float
    server_cpu: float

    @property
    def rate(self) -> float:
        """Operations per second."""
        return self.count / self.seconds

    @property
    def cpu_us(self) -> float:
        """Server CPU microseconds per operation."""
        return self.server_cpu / self.count * 1e6


def _timed(peer: Peer, count: int, work: Callable[[], object]) -> Run:
    cpu = peer.cpu_seconds()
    started = time.perf_counter()
    work()
    return Run(count, time.perf_counter() - started, peer.cpu_seconds() - cpu)


def _echoscu(peer: Peer, repeat: int) -> None:
    args = ["echoscu", "--repeat", str(repeat), "-aec", peer.ae_title, "127.0.0.1", str(peer.port)]
    process = subprocess.Popen(args, env=dcmtk_env())
    # Not subprocess.run(timeout=...): Popen.wait(timeout) polls with sleeps of 1, 2, 4, 8,
    # 16 ms..., so a ~15 ms echoscu run was timed as 15 or 31 ms depending on which side of
    # a poll it ended, halving the set-up rate of whichever server was a hair slower. A
    # blocking wait returns when the child exits; the timer only guards against a hang.
    guard = threading.Timer(CLIENT_TIMEOUT, process.kill)
    guard.start()
    try:
        returncode = process.wait()
    finally:
        guard.cancel()
    if returncode != 0:
        raise subprocess.CalledProcessError(returncode, args)


def echoscu_rtt(peer: Peer, count: int) -> Run:
    """C-ECHOs over one association, DCMTK echoscu as the client, set-up subtracted."""
    base = _timed(peer, 1, lambda: _echoscu(peer, 1))
    full = _timed(peer, count, lambda: _echoscu(peer, count))
    return Run(count - 1, full.seconds - base.seconds, full.server_cpu - base.server_cpu)


def echoscu_setups(peer: Peer, count: int) -> Run:
    """echoscu processes one after another, each: associate, one C-ECHO, release."""

    def work() -> None:
        for _ in range(count):
            _echoscu(peer, 1)

    return _timed(peer, count, work)


async def _connect(peer: Peer) -> ClientAssociation:
    return await ClientAssociation.connect(
        "127.0.0.1", peer.port, calling_ae="BENCH", called_ae=peer.ae_title, contexts=CONTEXTS
    )


def client_rtt(peer: Peer, count: int) -> Run:
    """C-ECHOs over one association, our asyncio requestor as the client."""

    async def run() -> Run:
        association = await _connect(peer)
        cpu = peer.cpu_seconds()
        started = time.perf_counter()
        for _ in range(count):
            await association.echo()
        result = Run(count, time.perf_counter() - started, peer.cpu_seconds() - cpu)
        await association.release()
        return result

    return asyncio.run(run())


def client_setups(peer: Peer, count: int) -> Run:
    """Associate + C-ECHO + release cycles, one after another, our asyncio requestor."""

    async def cycles() -> None:
        for _ in range(count):
            association = await _connect(peer)
            await association.echo()
            await association.release()

    return _timed(peer, count, lambda: asyncio.run(cycles()))


def idle_rss(peer: Peer, count: int) -> tuple[float, float]:
    """Server RSS (MiB) idle, then with `count` idle associations open."""

    async def run() -> tuple[float, float]:
        before = peer.rss_mib()
        associations = await asyncio.gather(*(_connect(peer) for _ in range(count)))
        await asyncio.sleep(0.5)
        during = peer.rss_mib()
        await asyncio.gather(*(a.release() for a in associations))
        return before, during

    return asyncio.run(run())


def measure(name: str, fn: Callable[[Peer], Run], rounds: int) -> None:
    """Alternate minipacs and storescp for `rounds` rounds; print medians and the ratio."""
    ours: list[Run] = []
    theirs: list[Run] = []
    for _ in range(rounds):
        with minipacs() as peer:
            ours.append(fn(peer))
        with storescp() as peer:
            theirs.append(fn(peer))
    mine = statistics.median(r.rate for r in ours)
    dcmtk = statistics.median(r.rate for r in theirs)
    mine_cpu = statistics.median(r.cpu_us for r in ours)
    dcmtk_cpu = statistics.median(r.cpu_us for r in theirs)
    print(
        f"{name:34s} minipacs {mine:8.1f}/s  dcmtk {dcmtk:8.1f}/s  ratio {mine / dcmtk:4.2f}x"
        f"  | server CPU/op minipacs {mine_cpu:6.1f} us  dcmtk {dcmtk_cpu:6.1f} us",
        flush=True,
    )


def main() -> None:
    """Run every C-ECHO measurement and print a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    # Long runs: with 5000 echoes a ~12 ms start-up cost per run (both servers) remained
    # even after the --repeat 1 subtraction and pulled both rates down by ~8%.
    parser.add_argument("--echoes", type=int, default=20000)
    parser.add_argument("--setups", type=int, default=500)
    parser.add_argument("--echoscu-setups", type=int, default=200)
    parser.add_argument("--cpu", type=int, default=max(os.sched_getaffinity(0)))
    args = parser.parse_args()
    if args.cpu >= 0:
        # Inherited by every server and client process started from here.
        os.sched_setaffinity(0, {args.cpu})
    print("placement:", f"all on CPU {args.cpu}" if args.cpu >= 0 else "unpinned")
    rounds = args.rounds
    measure("C-ECHO RTT, 1 assoc (echoscu)", lambda p: echoscu_rtt(p, args.echoes), rounds)
    measure(
        "set-ups (echoscu: assoc+echo+rel)",
        lambda p: echoscu_setups(p, args.echoscu_setups),
        rounds,
    )
    measure("C-ECHO RTT, 1 assoc (asyncio SCU)", lambda p: client_rtt(p, args.echoes), rounds)
    measure("set-ups (asyncio SCU)", lambda p: client_setups(p, args.setups), rounds)
    with minipacs() as peer:
        idle, loaded = idle_rss(peer, IDLE_ASSOCIATIONS)
    with storescp() as peer:
        dcmtk_idle = peer.rss_mib()
    print(
        f"RSS: minipacs idle {idle:.1f} MiB, with {IDLE_ASSOCIATIONS} idle associations "
        f"{loaded:.1f} MiB; storescp idle {dcmtk_idle:.1f} MiB (it serves one at a time)"
    )


if __name__ == "__main__":
    main()
