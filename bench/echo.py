"""C-ECHO benchmark: round trips on one association and association set-ups per second.

Run: .venv/bin/python -m bench.echo [--rounds 3]
Every figure is measured for minipacs and DCMTK's storescp in the same run, alternating
rounds, and reported as a median with the ratio minipacs / DCMTK (higher is better).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import time
from collections.abc import Callable

from bench.peers import Peer, dcmtk_env, minipacs, storescp
from minipacs.net.client import ClientAssociation
from minipacs.net.negotiation import UNCOMPRESSED_TRANSFER_SYNTAXES, VERIFICATION

CONTEXTS = [(VERIFICATION, UNCOMPRESSED_TRANSFER_SYNTAXES)]


def echoscu_rtt(peer: Peer, count: int) -> float:
    """C-ECHOs per second over one association, DCMTK echoscu as the client."""
    started = time.perf_counter()
    subprocess.run(
        ["echoscu", "--repeat", str(count), "-aec", peer.ae_title, "127.0.0.1", str(peer.port)],
        env=dcmtk_env(),
        check=True,
        timeout=600,
    )
    return count / (time.perf_counter() - started)


async def _connect(peer: Peer) -> ClientAssociation:
    return await ClientAssociation.connect(
        "127.0.0.1", peer.port, calling_ae="BENCH", called_ae=peer.ae_title, contexts=CONTEXTS
    )


def client_rtt(peer: Peer, count: int) -> float:
    """C-ECHOs per second over one association, our asyncio requestor as the client."""

    async def run() -> float:
        association = await _connect(peer)
        started = time.perf_counter()
        for _ in range(count):
            await association.echo()
        elapsed = time.perf_counter() - started
        await association.release()
        return count / elapsed

    return asyncio.run(run())


def setups(peer: Peer, count: int) -> float:
    """Associate + C-ECHO + release cycles per second, one after another."""

    async def run() -> float:
        started = time.perf_counter()
        for _ in range(count):
            association = await _connect(peer)
            await association.echo()
            await association.release()
        return count / (time.perf_counter() - started)

    return asyncio.run(run())


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


def measure(name: str, fn: Callable[[Peer], float], rounds: int) -> None:
    """Alternate minipacs and storescp for `rounds` rounds; print medians and the ratio."""
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(rounds):
        with minipacs() as peer:
            ours.append(fn(peer))
        with storescp() as peer:
            theirs.append(fn(peer))
    mine, dcmtk = statistics.median(ours), statistics.median(theirs)
    print(f"{name:42s} minipacs {mine:9.1f}/s  dcmtk {dcmtk:9.1f}/s  ratio {mine / dcmtk:5.2f}x")


def main() -> None:
    """Run every C-ECHO measurement and print a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--echoes", type=int, default=5000)
    parser.add_argument("--setups", type=int, default=500)
    args = parser.parse_args()
    measure(
        "C-ECHO RTT, one association (echoscu)", lambda p: echoscu_rtt(p, args.echoes), args.rounds
    )
    measure(
        "C-ECHO RTT, one association (asyncio SCU)",
        lambda p: client_rtt(p, args.echoes),
        args.rounds,
    )
    measure(
        "association set-ups (assoc+echo+release)", lambda p: setups(p, args.setups), args.rounds
    )
    with minipacs() as peer:
        idle, loaded = idle_rss(peer, 200)
    print(f"minipacs RSS: idle {idle:.1f} MiB, with 200 idle associations {loaded:.1f} MiB")


if __name__ == "__main__":
    main()
