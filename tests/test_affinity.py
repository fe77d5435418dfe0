"""server.pin_cpu: every thread of a serving process stays on one CPU, the stores work."""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from minipacs.ops.affinity import pin_process, process_cpu
from tests.servers import MinipacsProcess, start_minipacs
from tests.test_workers import (
    PER_CLIENT,
    _events,
    _study_counts,
    _worker_pids,
    _write_series,
    send_folders,
)

TIMEOUT = 60.0

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this system"
)


def _allowed_list(status_path: str) -> str:
    """The Cpus_allowed_list of a /proc status file."""
    return Path(status_path).read_text().split("Cpus_allowed_list:")[1].split()[0]


def _cpus_of_threads(pid: int) -> Counter[str]:
    """How many threads of a process have each Cpus_allowed_list."""
    found: Counter[str] = Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            found[_allowed_list(f"/proc/{pid}/task/{tid}/status")] += 1
    return found


def _unpinned_threads(pid: int, cpu: int) -> int:
    """Check every thread of `pid` runs on `cpu` or anywhere; return how many run anywhere."""
    placed = _cpus_of_threads(pid)
    everywhere = _allowed_list("/proc/self/status")
    unpinned = placed.pop(everywhere, 0) if everywhere != str(cpu) else 0
    assert set(placed) == {str(cpu)}
    assert placed[str(cpu)] > 3  # the event loop, the store threads, the index writer...
    return unpinned


def _store_two_series(tmp_path: Path, env: dict[str, str]) -> tuple[MinipacsProcess, str]:
    """A server started with `env` that has stored two series over two associations."""
    study_uid = generate_uid()
    (tmp_path / "data").mkdir()
    folders = _write_series(tmp_path / "data", study_uid)[:2]
    workdir = tmp_path / "server"
    workdir.mkdir()
    process = start_minipacs(workdir, {**env, "MINIPACS_STORAGE_MIN_FREE_BYTES": "0"})

    try:
        assert [code for code, _ in send_folders(process.port, folders, TIMEOUT)] == [0, 0]
    except BaseException:
        process.stop()
        raise
    return process, study_uid


def test_serving_processes_are_given_the_cpus_in_turn() -> None:
    assert [process_cpu(i, {2, 0, 5}) for i in range(4)] == [0, 2, 5, 0]


def test_pinning_without_cpu_affinity_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_setaffinity")
    with pytest.raises(OSError, match="no CPU affinity"):
        pin_process(0)


def test_one_pinned_process_keeps_every_thread_to_one_cpu(tmp_path: Path) -> None:
    env = {"MINIPACS_SERVER_PIN_CPU": "true", "MINIPACS_QUERY_THREADS": "1"}
    process, study_uid = _store_two_series(tmp_path, env)
    try:
        # The stores started the store threads and the index writer: they follow too.
        assert _study_counts(process.port, study_uid) == (2, 2 * PER_CLIENT)
        expected = process_cpu(0, os.sched_getaffinity(0))
        pinned = _events(process, "server.pinned")
        assert [r["cpu"] for r in pinned] == [expected]
        # Threads there before serve() (native ones of imported libraries) are moved too.
        assert pinned[0]["threads"] >= 1
        unpinned = _unpinned_threads(process.process.pid, expected)
        if len(os.sched_getaffinity(0)) > 1:
            assert unpinned == 1  # the one query thread, which answered the C-FIND
    finally:
        assert process.stop() == 0


def test_pinned_workers_spread_over_the_cpus(tmp_path: Path) -> None:
    env = {
        "MINIPACS_SERVER_WORKERS": "2",
        "MINIPACS_SERVER_PIN_CPU": "true",
        "MINIPACS_QUERY_THREADS": "1",
    }
    process, study_uid = _store_two_series(tmp_path, env)
    try:
        assert _study_counts(process.port, study_uid) == (2, 2 * PER_CLIENT)
        allowed = os.sched_getaffinity(0)
        pinned = {int(r["worker"]): r["cpu"] for r in _events(process, "server.pinned")}  # type: ignore[call-overload]
        assert pinned == {0: process_cpu(0, allowed), 1: process_cpu(1, allowed)}
        unpinned = {
            worker: _unpinned_threads(pid, pinned[worker])
            for worker, pid in _worker_pids(process).items()
        }
        if len(allowed) > 1:
            # Worker 0 keeps the index statistics, with its query thread; the C-FIND went
            # to one of the two.
            assert unpinned[0] == 1 and unpinned[1] in (0, 1)
        # The supervisor only hands connections on: it stays where it was.
        assert os.sched_getaffinity(process.process.pid) == allowed
    finally:
        assert process.stop() == 0


def test_a_refused_pin_is_logged_and_the_server_serves_on(tmp_path: Path) -> None:
    # The server's interpreter loads this first: sched_setaffinity refuses every call.
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import os\n"
        "def _refuse(pid, cpus):\n"
        "    raise PermissionError(1, 'Operation not permitted')\n"
        "os.sched_setaffinity = _refuse\n"
    )
    path = os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH", "")) if p)
    env = {"MINIPACS_SERVER_PIN_CPU": "true", "PYTHONPATH": path}
    process, study_uid = _store_two_series(tmp_path, env)
    try:
        assert _study_counts(process.port, study_uid) == (2, 2 * PER_CLIENT)
        failed = _events(process, "server.pin_failed")
        assert [(r["level"], "not permitted" in str(r["error"])) for r in failed] == [
            ("WARNING", True)
        ]
        assert not _events(process, "server.pinned")
    finally:
        assert process.stop() == 0


def test_without_the_setting_nothing_is_pinned(tmp_path: Path) -> None:
    process, _ = _store_two_series(tmp_path, {})
    try:
        assert not _events(process, "server.pinned")
        everywhere = _allowed_list("/proc/self/status")
        assert set(_cpus_of_threads(process.process.pid)) == {everywhere}
    finally:
        assert process.stop() == 0
