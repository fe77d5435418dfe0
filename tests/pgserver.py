"""A private PostgreSQL server for tests: its own data directory and loopback port."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.servers import free_port


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError(f"PostgreSQL {name} not found: run scripts/test.sh, it installs it")
    return found[-1]


@dataclass
class PostgresServer:
    """A running PostgreSQL cluster owned by the test session."""

    directory: Path
    port: int
    as_user: list[str]
    # fsync on (PostgreSQL's default): commits survive a power loss. Tests run without.
    durable: bool = False

    def url(self, database: str) -> str:
        """SQLAlchemy URL of a database on this server."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """Create a fresh empty database; return its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        subprocess.run(
            [
                *self.as_user,
                _bin("psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-q",
                "-c",
                f"CREATE DATABASE {name}",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return self.url(name)

    def halt(self) -> None:
        """Stop the server, keeping its data (an outage; resume() ends it)."""
        self._pg_ctl("-m", "fast", "stop")

    def resume(self) -> None:
        """Start the halted server again on the same port and data."""
        _start(self.directory, self.port, self.as_user, self.durable)

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.as_user, _bin("pg_ctl"), "-D", str(self.directory / "data"), "-w", *args],
            capture_output=True,
            timeout=60,
            check=False,
        )

    def stop(self) -> None:
        """Stop the server and delete its data."""
        subprocess.run(
            [
                *self.as_user,
                _bin("pg_ctl"),
                "-D",
                str(self.directory / "data"),
                "-m",
                "immediate",
                "stop",
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(self.directory, ignore_errors=True)


def start_postgres(durable: bool = False) -> PostgresServer:
    """initdb and start a server on a free port; as user postgres when we are root.

    durable: fsync on, as a deployment runs it (benchmarks); tests run faster without.
    """
    directory = Path(tempfile.mkdtemp(prefix="minipacs-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root.
        shutil.chown(directory, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = directory / "data"
    subprocess.run(
        [
            *as_user,
            _bin("initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    _start(directory, port, as_user, durable)
    return PostgresServer(directory, port, as_user, durable)


def _start(directory: Path, port: int, as_user: list[str], durable: bool) -> None:
    subprocess.run(
        [
            *as_user,
            _bin("pg_ctl"),
            "-D",
            str(directory / "data"),
            "-w",
            "-t",
            "60",
            "-l",
            str(directory / "log"),
            "-o",
            f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={directory} "
            f"-c fsync={'on' if durable else 'off'} -c max_connections=200",
            "start",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
