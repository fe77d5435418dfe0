"""Run DCMTK command-line tools as real peers, time-bounded, with Nagle off."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def dcmtk(tool: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool; fail the test with a clear message when DCMTK is missing."""
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} not found: install DCMTK (scripts/test.sh does it)")
    # DCMTK 3.6.7 leaves Nagle on unless told; without this each message costs ~40 ms.
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run(
        [tool, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def echoscu(port: int, called: str = "MINIPACS", calling: str = "ECHOSCU") -> int:
    """Run echoscu against 127.0.0.1:port; return its exit code."""
    result = dcmtk(
        "echoscu",
        "-to",
        "10",
        "-ta",
        "10",
        "-td",
        "10",
        "-aet",
        calling,
        "-aec",
        called,
        "127.0.0.1",
        str(port),
    )
    return result.returncode
