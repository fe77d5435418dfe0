"""The command line as a user runs it: configuration errors, --version, --help, usage.

Starting a real server is tested elsewhere (tests/test_lifecycle.py and others).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from minipacs import cli


def run_minipacs(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m minipacs ARGS` in cwd with no MINIPACS_* but those in env."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MINIPACS_")}
    return subprocess.run(
        [sys.executable, "-m", "minipacs", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**environ, **(env or {})},
        timeout=60,
        check=False,
    )


def assert_config_error(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    """Exit 2 with one line on stderr, no traceback, naming each expected string."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("minipacs: configuration error: ")
    for text in expected:
        assert text in lines[0]
    assert result.stdout == ""


def test_bad_config_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nport = -1\n")
    result = run_minipacs(tmp_path, "serve", "--config", str(path))
    assert_config_error(result, f"{path}: server.port: must be an integer 1-65535, got -1")


def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server\nport = 1\n")
    assert_config_error(run_minipacs(tmp_path, "serve", "--config", str(path)), "invalid TOML")


def test_missing_config_file(tmp_path: Path) -> None:
    result = run_minipacs(tmp_path, "serve", "--config", "nowhere.toml")
    assert_config_error(result, "nowhere.toml: file not found")


def test_bad_environment_variable(tmp_path: Path) -> None:
    result = run_minipacs(tmp_path, "serve", env={"MINIPACS_SERVER_MAX_PDU_LENGTH": "0"})
    assert_config_error(result, "MINIPACS_SERVER_MAX_PDU_LENGTH: server.max_pdu_length: ")


def test_config_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "from-env.toml"
    path.write_text("[server]\nbogus = 1\n")
    result = run_minipacs(tmp_path, "serve", env={"MINIPACS_CONFIG": str(path)})
    assert_config_error(result, f"{path}: server.bogus: unknown key")


def test_config_option_wins_over_the_environment(tmp_path: Path) -> None:
    (tmp_path / "env.toml").write_text("[server]\nbogus = 1\n")
    (tmp_path / "option.toml").write_text("[storage]\nbogus = 1\n")
    result = run_minipacs(
        tmp_path, "serve", "--config", "option.toml", env={"MINIPACS_CONFIG": "env.toml"}
    )
    assert_config_error(result, "option.toml: storage.bogus: unknown key")


def test_default_config_is_read_from_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "minipacs.toml").write_text('[log]\nformat = "yaml"\n')
    result = run_minipacs(tmp_path, "serve")
    assert_config_error(result, "config/minipacs.toml: log.format: must be one of")


def test_default_config_path_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MINIPACS_CONFIG", raising=False)
    assert cli._config_path(None) is None
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "minipacs.toml").write_text("")
    assert cli._config_path(None) == Path("config/minipacs.toml")
    monkeypatch.setenv("MINIPACS_CONFIG", "/etc/minipacs.toml")
    assert cli._config_path(None) == Path("/etc/minipacs.toml")
    assert cli._config_path("mine.toml") == Path("mine.toml")


def test_version(tmp_path: Path) -> None:
    result = run_minipacs(tmp_path, "--version")
    assert result.returncode == 0
    assert result.stdout.startswith("minipacs ")
    assert result.stdout.split()[1][0].isdigit()


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"]])
def test_help(tmp_path: Path, args: list[str]) -> None:
    result = run_minipacs(tmp_path, *args)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: minipacs")
    assert "--config" in result.stdout or "serve" in result.stdout


@pytest.mark.parametrize("args", [[], ["nonsense"], ["serve", "--bogus"]])
def test_usage_errors_exit_2(tmp_path: Path, args: list[str]) -> None:
    result = run_minipacs(tmp_path, *args)
    assert result.returncode == 2
    assert "usage: minipacs" in result.stderr
    assert "Traceback" not in result.stderr
