"""The operator commands as ops run them: `check`, and the echo/store/find smoke clients."""

from __future__ import annotations

import json
from pathlib import Path

from pydicom.data import get_testdata_file

from tests.pgserver import PostgresServer
from tests.servers import MinipacsProcess, free_port
from tests.test_cli import run_minipacs


def test_check_passes_on_the_embedded_default(tmp_path: Path) -> None:
    result = run_minipacs(tmp_path, "check", env={"MINIPACS_STORAGE_MIN_FREE_BYTES": "0"})
    assert result.returncode == 0, result.stdout + result.stderr
    names = [line.split()[1].rstrip(":") for line in result.stdout.splitlines()]
    assert names == ["database", "schema", "store", "spool", "free"]
    assert all(line.startswith("ok") for line in result.stdout.splitlines())


def _failures(result_stdout: str) -> list[str]:
    return [line for line in result_stdout.splitlines() if line.startswith("FAIL")]


def test_check_fails_on_an_unwritable_store(tmp_path: Path) -> None:
    # A file where the store's parent folder should be: not even root can create it.
    (tmp_path / "blocked").write_text("not a folder")
    env = {"MINIPACS_STORAGE_PATH": str(tmp_path / "blocked" / "store")}
    result = run_minipacs(tmp_path, "check", env=env)
    assert result.returncode == 1
    failures = _failures(result.stdout)
    assert any(line.startswith("FAIL  store:") and "not writable" in line for line in failures)


def test_check_fails_on_an_unreachable_database(tmp_path: Path) -> None:
    url = f"postgresql://minipacs:secret@127.0.0.1:{free_port()}/minipacs"
    result = run_minipacs(tmp_path, "check", env={"MINIPACS_DATABASE_URL": url})
    assert result.returncode == 1
    failures = _failures(result.stdout)
    assert len(failures) == 1 and failures[0].startswith("FAIL  database: cannot reach")
    assert "secret" not in result.stdout + result.stderr


def test_check_fails_on_an_out_of_date_schema(tmp_path: Path, postgres: PostgresServer) -> None:
    url = postgres.create_database()  # empty: never upgraded
    result = run_minipacs(tmp_path, "check", env={"MINIPACS_DATABASE_URL": url})
    assert result.returncode == 1
    failures = _failures(result.stdout)
    assert len(failures) == 1 and failures[0].startswith("FAIL  schema:")
    assert "minipacs db upgrade" in failures[0]


def test_smoke_clients_echo_store_find(server: MinipacsProcess, tmp_path: Path) -> None:
    port = str(server.port)
    echo = run_minipacs(tmp_path, "echo", "127.0.0.1", port)
    assert echo.returncode == 0 and "0x0000" in echo.stdout
    ct = get_testdata_file("CT_small.dcm")
    junk = tmp_path / "junk.dcm"
    junk.write_text("not DICOM")
    store = run_minipacs(tmp_path, "store", "127.0.0.1", port, ct)
    assert store.returncode == 0, store.stdout + store.stderr
    assert store.stdout.startswith("0x0000 ")
    mixed = run_minipacs(tmp_path, "store", "127.0.0.1", port, ct, str(junk))
    assert mixed.returncode == 1 and "not a DICOM file" in mixed.stdout
    find = run_minipacs(
        tmp_path, "find", "127.0.0.1", port, "-k", "PatientID=1CT1", "-k", "StudyInstanceUID"
    )
    assert find.returncode == 0, find.stderr
    lines = [json.loads(line) for line in find.stdout.splitlines()]
    assert len(lines) == 1 and lines[0]["00100020"]["Value"] == ["1CT1"]
    assert "1 matches, final status 0x0000" in find.stderr
    refused = run_minipacs(tmp_path, "echo", "127.0.0.1", port, "--aec", "NOBODY")
    assert refused.returncode == 1 and "rejected" in refused.stderr
    bad_key = run_minipacs(tmp_path, "find", "127.0.0.1", port, "-k", "NoSuchKey=1")
    assert bad_key.returncode == 2 and "NoSuchKey" in bad_key.stderr
