"""Deployment as ops meet it: the README's start command on a clean checkout, compose, image."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.dicom_tools import echoscu
from tests.servers import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> list[str]:
    """The compose command on this machine: `docker compose` (v2) or `docker-compose`."""
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, timeout=30, check=False
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("no docker compose: scripts/test.sh installs Debian's docker-compose")


def test_compose_file_is_valid() -> None:
    result = subprocess.run(
        [*_compose(), "config"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    config = result.stdout
    # The schema is migrated by a one-shot service before the server starts.
    assert "db" in config and "upgrade" in config
    assert "service_completed_successfully" in config
    for volume in ("pgdata", "store"):
        assert f"{volume}:" in config
    assert "MINIPACS_DATABASE_URL" in config


def test_dockerfile_runs_as_pid_1_non_root_with_a_health_check() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    assert any(line.startswith("USER ") and line != "USER root" for line in lines)
    # Exec form: minipacs itself is PID 1 and receives SIGTERM from `docker stop`.
    assert 'ENTRYPOINT ["minipacs"]' in lines
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    assert 'VOLUME ["/data"]' in lines


# A new machine's first run installs every dependency from the package registry.
@pytest.mark.timeout(900)
def test_readme_start_command_on_a_clean_checkout(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    assert "./scripts/serve.sh" in readme
    checkout = tmp_path / "minipacs"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(checkout)], check=True, timeout=120)
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MINIPACS_", "VIRTUAL_ENV"))},
        "MINIPACS_SERVER_PORT": str(port),
        "MINIPACS_SERVER_HOST": "127.0.0.1",
        "MINIPACS_STORAGE_MIN_FREE_BYTES": "0",
    }
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["./scripts/serve.sh"], cwd=checkout, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        # The first run creates .venv and installs minipacs and its dependencies.
        wait_for_port(port, process, timeout=600)
        assert echoscu(port) == 0
        assert (checkout / "minipacs-data" / "index.sqlite").is_file()
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
    assert code == 0, log.read_text()
