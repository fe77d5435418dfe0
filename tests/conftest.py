"""Shared fixtures: a real minipacs server process on a free loopback port."""

from __future__ import annotations

import pytest

from tests.servers import MinipacsProcess, start_minipacs

pytest_plugins = ["tests.fixtures_db"]


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory) -> MinipacsProcess:
    """A minipacs daemon with default settings, SQLite and a temp store."""
    process = start_minipacs(tmp_path_factory.mktemp("minipacs"))
    yield process
    process.stop()
