"""bench.proctime: a server's CPU seconds include those of its worker processes."""

from __future__ import annotations

import subprocess
import sys
import time

from bench.proctime import tree_cpu

# Half a second of CPU, then idle long enough to be read while alive.
BUSY = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\n"
IDLE = "time.sleep(3)\n"


def test_a_process_tree_s_cpu_counts_every_busy_descendant() -> None:
    child = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {BUSY + IDLE!r}])\n"
    parent = subprocess.Popen([sys.executable, "-c", child + BUSY + IDLE])
    try:
        deadline = time.monotonic() + 10
        used = tree_cpu(parent.pid)
        while used < 0.9 and time.monotonic() < deadline:
            time.sleep(0.1)
            used = tree_cpu(parent.pid)
        # Both burned 0.5 s: one process alone cannot reach 0.9.
        assert used >= 0.9
    finally:
        parent.kill()
        parent.wait(10)
