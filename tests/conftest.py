"""Shared fixtures: real minipacs server processes on free loopback ports."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import pytest

from minipacs.index import schema
from tests.servers import MinipacsProcess, running_minipacs, start_minipacs

pytest_plugins = ["tests.fixtures_db"]


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MinipacsProcess]:
    """A minipacs daemon with default settings, SQLite and a temp store."""
    process = start_minipacs(tmp_path_factory.mktemp("minipacs"))
    yield process
    process.stop()


@pytest.fixture
def minipacs_with(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[Mapping[str, str]], MinipacsProcess]]:
    """Start daemons with extra MINIPACS_* settings; each is stopped after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda env: stack.enter_context(
            running_minipacs(tmp_path_factory.mktemp("minipacs"), env)
        )


@pytest.fixture(params=["sqlite", "postgresql"])
def archive(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MinipacsProcess]:
    """A minipacs daemon on each index backend (SQLite file, or private PostgreSQL)."""
    workdir = tmp_path_factory.mktemp(f"archive-{request.param}")
    env = {"MINIPACS_STORAGE_MIN_FREE_BYTES": "0"}
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres").create_database()
        schema.upgrade(url)
        env["MINIPACS_DATABASE_URL"] = url
    process = start_minipacs(workdir, env)

    yield process
    process.stop()
