"""Start and stop real server processes for tests: minipacs itself and DCMTK peers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

STARTUP_TIMEOUT = 20.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait until something accepts on 127.0.0.1:port, or fail if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


@dataclass
class MinipacsProcess:
    """A running `minipacs serve` child process."""

    process: subprocess.Popen[bytes]
    port: int
    workdir: Path
    log_path: Path
    ae_title: str = "MINIPACS"
    database_url: str = ""

    def log_text(self) -> str:
        """Everything the server logged so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the server and wait; return its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


def spawn_minipacs(
    workdir: Path, port: int, env: Mapping[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Path, dict[str, str]]:
    """Launch `python -m minipacs serve` in `workdir` without waiting for it.

    Returns the process, its log file (JSON lines) and the environment it got.
    """
    environ = {
        **os.environ,
        "MINIPACS_SERVER_HOST": "127.0.0.1",
        "MINIPACS_SERVER_PORT": str(port),
        "MINIPACS_STORAGE_PATH": str(workdir / "store"),
        "MINIPACS_DATABASE_URL": f"sqlite:///{workdir / 'index.sqlite'}",
        "MINIPACS_LOG_FORMAT": "json",
        **(env or {}),
    }
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "minipacs", "serve"],
            cwd=workdir,
            env=environ,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    return process, log_path, environ


def start_minipacs(workdir: Path, env: Mapping[str, str] | None = None) -> MinipacsProcess:
    """Start `python -m minipacs serve` in `workdir` on a free port with a temp store."""
    port = free_port()
    process, log_path, environ = spawn_minipacs(workdir, port, env)
    try:
        wait_for_port(port, process, STARTUP_TIMEOUT)
    except Exception:
        process.kill()
        process.wait(5)
        raise RuntimeError(f"minipacs did not start:\n{log_path.read_text()}") from None
    url = environ["MINIPACS_DATABASE_URL"]
    return MinipacsProcess(process, port, workdir, log_path, database_url=url)


@contextlib.contextmanager
def running_minipacs(
    workdir: Path, env: Mapping[str, str] | None = None
) -> Iterator[MinipacsProcess]:
    """start_minipacs, stopped (SIGTERM) when the block ends."""
    process = start_minipacs(workdir, env)
    try:
        yield process
    finally:
        process.stop()
