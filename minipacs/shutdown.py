"""SIGTERM and SIGINT for `minipacs serve`, caught from the command's first line to its exit.

A stop signal must never meet the default disposition while the server starts, runs or
stops: as PID 1 in a container the kernel drops a signal that has no handler (the server
then ignores `docker stop` and never logs `server.signal`), and anywhere else it kills
the process before the index writer has committed. So a plain handler records signals
from the start (`install`, before the ~0.5 s of imports); once the event loop runs, loop
handlers take over and act on what was recorded (`attach`); at the end the plain handler
comes back until the process exits (`detach`). The first signal asks for a graceful stop
(`requested`), any later one for an immediate one (`hurried`).
"""

from __future__ import annotations

import contextlib
import signal
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """The process's SIGTERM/SIGINT: recorded before the event loop, handled on it after."""

    def __init__(self) -> None:
        self.received: list[signal.Signals] = []
        self.requested: asyncio.Event | None = None
        self.hurried: asyncio.Event | None = None
        self._early: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> None:
        """Record stop signals from now on (no event loop needed); idempotent."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._record)

    def attach(self, loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Event, asyncio.Event]:
        """Handle stop signals on the running loop; return (requested, hurried)."""
        # asyncio is imported by now; importing it at the top would delay install().
        import asyncio

        self.requested, self.hurried = asyncio.Event(), asyncio.Event()
        self._loop = loop
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, self._on_signal, signum)
        early, self._early = self._early, []
        for signum in early:
            self._on_signal(signum)
        return self.requested, self.hurried

    def detach(self) -> None:
        """Take the signals off the loop (before it closes) and record them again."""
        if self._loop is not None:
            for signum in STOP_SIGNALS:
                with contextlib.suppress(Exception):
                    self._loop.remove_signal_handler(signum)
            self._loop = None
        # remove_signal_handler restored the default disposition: not while we still run.
        self.install()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self._early.append(signum)

    def _on_signal(self, signum: int) -> None:
        self.received.append(signal.Signals(signum))
        assert self.requested is not None and self.hurried is not None
        if self.requested.is_set():
            self.hurried.set()
        else:
            self.requested.set()


stop_signals = StopSignals()
