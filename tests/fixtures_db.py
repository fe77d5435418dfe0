"""Database fixtures: index tests run on SQLite and on a real, private PostgreSQL server.

The PostgreSQL server (tests/pgserver.py) is started once per test session: initdb into a
temp folder, a free loopback port, its socket in the same folder, fsync off since tests
need no durability; as root it runs as the `postgres` user (PostgreSQL refuses root). It
is stopped at the end. Each test gets a new database cloned from a template already
migrated to head; SQLite tests get a copy of a migrated file.
"""

from __future__ import annotations

import glob
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from minipacs.index import schema
from tests.pgserver import PostgresServer, start_postgres

_TEMPLATE = "minipacs_head"


def _admin(server: PostgresServer, sql: str) -> None:
    """Run a statement that cannot run in a transaction (CREATE/ALTER DATABASE)."""
    dsn = f"host=127.0.0.1 port={server.port} user=postgres dbname=postgres"
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(sql.encode())


def _create_database(server: PostgresServer, template: str) -> str:
    """A new database cloned from template (fast: a file copy); its URL."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    _admin(server, f"CREATE DATABASE {name} TEMPLATE {template}")
    return server.url(name)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One private PostgreSQL server for the whole test session."""
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        pytest.fail(
            "PostgreSQL server programs (initdb, pg_ctl) not found under /usr/lib/postgresql: "
            "run scripts/test.sh, which installs them",
            pytrace=False,
        )
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_template(postgres: PostgresServer) -> str:
    """Name of a database migrated to head, cloned for each test."""
    url = _create_database(postgres, "template1")
    schema.upgrade(url)
    _admin(postgres, f"ALTER DATABASE {url.rsplit('/', 1)[1]} RENAME TO {_TEMPLATE}")
    return _TEMPLATE


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite index file migrated to head, copied for each test."""
    path = tmp_path_factory.mktemp("sqlite-template") / "index.sqlite"
    schema.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh index database migrated to head, on each backend."""
    if request.param == "sqlite":
        path = tmp_path / "index.sqlite"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return _create_database(server, request.getfixturevalue("postgres_template"))
