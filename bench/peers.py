"""Start the servers a benchmark compares: minipacs (SQLite or PostgreSQL), storescp, Orthanc."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from minipacs.net.client import ClientAssociation

if TYPE_CHECKING:
    from tests.pgserver import PostgresServer


# Where the servers' folders go while kept_stores() is in force; None: deleted at each stop.
_kept_root: Path | None = None


@contextlib.contextmanager
def kept_stores() -> Iterator[None]:
    """Keep every server's files until the benchmark ends, emptied, then delete them all.

    A store deleted between two servers slows the next one's file creates: on ext4
    without a journal (these machines' root filesystem) the inode allocator skips each
    inode freed in the last 60 s, 360 s while its inode table block is dirty, with one
    buffer lookup per inode skipped (fs/ext4/ialloc.c, recently_deleted). minipacs on
    one association of 4000 small instances: 255-288/s right after the previous store
    was deleted, 374-398/s with it kept (3 runs each, alternating); a create took
    ~1.1 ms instead of ~80 us. Every server paid it, and it counts most against the one
    that does least per store. A benchmark started within minutes of another's end
    still pays for that one's deletions. The files are emptied when their server stops
    (their inodes stay, their blocks go): with every file kept whole, CT-size stores
    went to blocks this virtual disk had never written, which were slower to write.
    BENCH_DELETE_STORES=1 in the environment deletes each store when its server stops,
    as before, to measure the difference.
    """
    global _kept_root
    if os.environ.get("BENCH_DELETE_STORES") == "1":
        yield
        return
    outer = _kept_root
    with tempfile.TemporaryDirectory(prefix="bench-stores-") as tmp:
        _kept_root = Path(tmp)
        try:
            yield
        finally:
            _kept_root = outer


@contextlib.contextmanager
def _workdir(prefix: str) -> Iterator[Path]:
    """A fresh folder for one server: kept, emptied at its stop, while kept_stores() is on."""
    if _kept_root is not None:
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir=_kept_root))
        try:
            yield folder
        finally:
            _empty_files(folder)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def _empty_files(folder: Path) -> None:
    """Truncate every file below folder to nothing: its blocks are freed, its inode kept."""
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            # A link would truncate whatever it points at, inside the folder or not.
            if not os.path.islink(path):
                with contextlib.suppress(OSError):
                    os.truncate(path, 0)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


@dataclass
class Peer:
    """A server under test: its name, port, AE title and process."""

    name: str
    port: int
    ae_title: str
    process: subprocess.Popen[bytes]

    def _processes(self) -> list[psutil.Process]:
        proc = psutil.Process(self.process.pid)
        return [proc, *proc.children(recursive=True)]

    def rss_mib(self) -> float:
        """Resident memory of the server process and its children, in MiB."""
        total = 0
        for proc in self._processes():
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total / (1024 * 1024)

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far by the server process and its live children."""
        total = 0.0
        for proc in self._processes():
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total


VERIFICATION_CONTEXT = ("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])
PROBE_INTERVAL = 0.020


async def echo_probe(peer: Peer, stop: asyncio.Event) -> list[float]:
    """C-ECHO every 20 ms on its own association until `stop`; return latencies in ms."""
    association = await ClientAssociation.connect(
        "127.0.0.1",
        peer.port,
        calling_ae="PROBE",
        called_ae=peer.ae_title,
        contexts=[VERIFICATION_CONTEXT],
    )
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    tick = loop.time()
    while not stop.is_set():
        started = time.perf_counter()
        status = await association.echo()
        latencies.append((time.perf_counter() - started) * 1000)
        if status != 0:
            raise SystemExit(f"probe C-ECHO status {status:#06x}")
        tick += PROBE_INTERVAL
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, tick - loop.time()))
    await association.release()
    return latencies


def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK tools: Nagle off, or each message waits ~40 ms."""
    return {**os.environ, "TCP_NODELAY": "1"}


@contextlib.contextmanager
def minipacs(workdir: Path | None = None, **env: str) -> Iterator[Peer]:
    """Run `python -m minipacs serve` on a free port with a temporary store."""
    with _workdir("bench-minipacs-") as tmp:
        root = workdir or Path(tmp)
        port = free_port()
        environ = {
            **os.environ,
            "MINIPACS_SERVER_HOST": "127.0.0.1",
            "MINIPACS_SERVER_PORT": str(port),
            "MINIPACS_STORAGE_PATH": str(root / "store"),
            "MINIPACS_DATABASE_URL": f"sqlite:///{root / 'index.sqlite'}",
            "MINIPACS_LOG_LEVEL": "WARNING",
            **env,
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "minipacs", "serve"],
            cwd=root,
            env=environ,
            stdout=subprocess.DEVNULL,
            stderr=open(root / "server.log", "wb"),  # noqa: SIM115
        )
        try:
            _wait_port(port, process)
            yield Peer("minipacs", port, "MINIPACS", process)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def storescp(*extra: str) -> Iterator[Peer]:
    """Run DCMTK storescp (an echo and storage SCP) on a free port."""
    if shutil.which("storescp") is None:
        raise SystemExit("storescp not found: apt-get install dcmtk")
    with _workdir("bench-storescp-") as tmp:
        port = free_port()
        process = subprocess.Popen(
            ["storescp", "-aet", "STORESCP", "-od", str(tmp), *extra, str(port)],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_port(port, process)
            yield Peer("dcmtk-storescp", port, "STORESCP", process)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def minipacs_pg(server: PostgresServer, **env: str) -> Iterator[Peer]:
    """Run minipacs on a fresh database of a running PostgreSQL server, upgraded by it."""
    url = server.create_database()
    # By the minipacs that serves it (env may name another tree, bench.ab): a revision
    # refuses a schema newer than its own. Not from this folder, which `-m` would put
    # before PYTHONPATH.
    subprocess.run(
        [sys.executable, "-m", "minipacs", "db", "upgrade"],
        env={**os.environ, **env, "MINIPACS_DATABASE_URL": url, "MINIPACS_LOG_LEVEL": "WARNING"},
        cwd=tempfile.gettempdir(),
        stdout=subprocess.DEVNULL,
        check=True,
        timeout=120,
    )
    with minipacs(MINIPACS_DATABASE_URL=url, **env) as peer:
        peer.name = "minipacs-pg"
        yield peer


@contextlib.contextmanager
def orthanc(
    *, timeout: float = 60.0, modalities: dict[str, tuple[str, int]] | None = None
) -> Iterator[Peer]:
    """Run Debian's Orthanc with a generated config: free ports, temporary SQLite store.

    `modalities` are the C-MOVE destinations it knows: AE title -> (host, port).
    """
    binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not Path(binary).exists():
        raise SystemExit("Orthanc not found: apt-get install orthanc")
    with _workdir("bench-orthanc-") as tmp:
        root = Path(tmp)
        port = free_port()
        config = {
            "Name": "bench",
            "DicomAet": "ORTHANC",
            "DicomPort": port,
            "HttpPort": free_port(),
            "DicomCheckCalledAet": False,
            # Unknown calling AEs may query and retrieve, as they may store by default.
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowGet": True,
            "RemoteAccessAllowed": False,
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "index"),
            "Plugins": [],
            "DicomModalities": {
                ae: [ae, host, port] for ae, (host, port) in (modalities or {}).items()
            },
        }
        (root / "config.json").write_text(json.dumps(config, indent=2))
        log = root / "orthanc.log"
        # Orthanc speaks DICOM through DCMTK, which leaves Nagle on unless told.
        process = subprocess.Popen(
            [binary, str(root / "config.json")],
            cwd=root,
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=open(log, "wb"),  # noqa: SIM115
        )
        try:
            try:
                _wait_port(port, process, timeout)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"{exc}\n{log.read_text(errors='replace')[-3000:]}") from exc
            yield Peer("orthanc", port, "ORTHANC", process)
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
