"""Configuration: the shipped file equals the defaults; bad values give one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from minipacs.config import ConfigError, Destination, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_is_the_defaults() -> None:
    assert load_settings(ROOT / "config" / "minipacs.toml", environ={}) == Settings()


def test_environment_overrides_with_types() -> None:
    settings = load_settings(
        None,
        environ={
            "MINIPACS_SERVER_PORT": "4242",
            "MINIPACS_SERVER_CHECK_CALLED_AE": "false",
            "MINIPACS_SERVER_ALLOWED_CALLING_AES": "CT1, MR2",
            "MINIPACS_SERVER_ARTIM_TIMEOUT": "1.5",
            "MINIPACS_DATABASE_URL": "postgresql://x/y",
        },
    )
    assert settings.server.port == 4242
    assert settings.server.check_called_ae is False
    assert settings.server.allowed_calling_aes == ["CT1", "MR2"]
    assert settings.server.artim_timeout == 1.5
    assert settings.database.url == "postgresql://x/y"


def test_destinations(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[destinations]\nWS1 = { host = "10.0.0.1", port = 104 }\n')
    assert load_settings(path, environ={}).destinations == {"WS1": Destination("10.0.0.1", 104)}


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ('[server]\nport = "abc"\n', {}, "server.port: must be an integer"),
        ("[server]\nport = 70000\n", {}, "server.port: must be between 1 and 65535"),
        ('[server]\nae_title = "A\\\\B"\n', {}, "server.ae_title: must be printable"),
        ('[server]\nae_title = "WAY_TOO_LONG_AE_TITLE"\n', {}, "server.ae_title"),
        ("[server]\nbogus = 1\n", {}, "server.bogus: unknown key"),
        ("[nonsense]\n", {}, "unknown section [nonsense]"),
        ('[storage]\nduplicate_policy = "maybe"\n', {}, "must be one of keep-first"),
        ("[server\n", {}, "invalid TOML"),
        ("", {"MINIPACS_SERVER_PORT": "x"}, "MINIPACS_SERVER_PORT: must be an integer"),
        ("", {"MINIPACS_SERVER_USE_UVLOOP": "maybe"}, "MINIPACS_SERVER_USE_UVLOOP"),
        ('[destinations]\nWS = { host = "h", port = 0 }\n', {}, "destinations.WS.port"),
    ],
)
def test_bad_values_are_one_line_errors(
    tmp_path: Path, text: str, env: dict[str, str], expected: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_settings(path, environ=env)
    message = str(error.value)
    assert expected in message
    assert "\n" not in message


def test_cli_reports_bad_config_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nport = -1\n")
    result = subprocess.run(
        [sys.executable, "-m", "minipacs", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "server.port" in result.stderr


def test_cli_help_and_version() -> None:
    for args in (["--help"], ["serve", "--help"], ["--version"]):
        result = subprocess.run(
            [sys.executable, "-m", "minipacs", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0
        assert "minipacs" in result.stdout
