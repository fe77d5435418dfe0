"""The maintenance commands, run as a user would: db, serve on an old schema, reindex, stats."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from minipacs.index import schema
from minipacs.storage.layout import instance_path
from tests.pgserver import PostgresServer

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
SAMPLES = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm")


def run_cli(
    tmp_path: Path, url: str, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `python -m minipacs ARGS` on this index and a store under tmp_path."""
    # No MINIPACS_* from the caller's environment, and no config/minipacs.toml from cwd.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINIPACS_")}
    env["MINIPACS_DATABASE_URL"] = url
    env["MINIPACS_STORAGE_PATH"] = str(tmp_path / "store")
    return subprocess.run(
        [sys.executable, "-m", "minipacs", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=timeout,
        check=False,
    )


def test_db_upgrade_current_downgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    upgraded = run_cli(tmp_path, url, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    # alembic's INFO narration stays off stdout (and off stderr without -v).
    assert "Running upgrade" not in upgraded.stdout + upgraded.stderr

    current = run_cli(tmp_path, url, "db", "current")
    assert current.returncode == 0, current.stderr
    assert f"current: {schema.head()}" in current.stdout
    assert f"head: {schema.head()}" in current.stdout

    downgraded = run_cli(tmp_path, url, "db", "downgrade", "base")
    assert downgraded.returncode == 0, downgraded.stderr
    behind = run_cli(tmp_path, url, "db", "current")
    assert behind.returncode == 1
    assert "current: base" in behind.stdout
    assert f"head: {schema.head()}" in behind.stdout


def test_serve_on_outdated_postgres_schema_is_one_line(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    url = postgres.create_database()
    result = run_cli(tmp_path, url, "serve", timeout=90)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("minipacs: ")
    assert "minipacs db upgrade" in lines[0]


def _fill_store(store: Path) -> None:
    for name in SAMPLES:
        ds = pydicom.dcmread(TEST_FILES / name, stop_before_pixels=True)
        rel = instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        (store / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(TEST_FILES / name, store / rel)
    (store / "zz" / "zz").mkdir(parents=True)
    (store / "zz" / "zz" / "bad.dcm").write_bytes(b"not a DICOM file at all\n" * 10)


def test_reindex_and_stats(tmp_path: Path, db_url: str) -> None:
    _fill_store(tmp_path / "store")

    result = run_cli(tmp_path, db_url, "reindex", timeout=120)
    assert result.returncode == 1
    assert "indexed 3 files, 1 unreadable" in result.stdout
    assert "bad.dcm" in result.stderr
    assert "Traceback" not in result.stderr

    stats = run_cli(tmp_path, db_url, "stats")
    assert stats.returncode == 0, stats.stderr
    assert "instances: 3" in stats.stdout.splitlines()
    as_json = run_cli(tmp_path, db_url, "stats", "--json")
    values = json.loads(as_json.stdout)
    sizes = sum((TEST_FILES / name).stat().st_size for name in SAMPLES)
    assert values == {"patients": 3, "studies": 3, "series": 3, "instances": 3, "bytes": sizes}

    # Reindexing again replaces rows instead of duplicating them.
    (tmp_path / "store" / "zz" / "zz" / "bad.dcm").unlink()
    again = run_cli(tmp_path, db_url, "reindex", timeout=120)
    assert again.returncode == 0, again.stderr
    assert "indexed 3 files, 0 unreadable" in again.stdout
    assert json.loads(run_cli(tmp_path, db_url, "stats", "--json").stdout) == values


@pytest.mark.parametrize("command", ["db", "reindex", "stats"])
def test_help(tmp_path: Path, command: str) -> None:
    result = run_cli(tmp_path, "sqlite://", command, "--help")
    assert result.returncode == 0
    assert "minipacs" in result.stdout
