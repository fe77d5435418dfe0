"""Worker mode (server.workers > 1): one supervisor process and N worker processes.

One Python process runs its Python on one core at a time (the GIL): with many
associations storing at once it held the GIL only ~40% of the time yet spent most of
each C-STORE waiting to get it back, while the second core idled. Worker processes each
have their own. The supervisor:

- opens the archive once before any worker runs: schema check or upgrade, recovery of
  what dead writers left, temp cleanup;
- binds the DICOM (and TLS) port, starts each worker as `minipacs serve` again
  (ops.worker), and hands every connection it accepts to the worker with the fewest
  open connections (a descriptor over a Unix socket, SCM_RIGHTS). Sharing the listening
  socket instead let one worker's accept loop take a burst of connections all at once:
  eight storescu clients split 6 to 2 and two workers stored slower than one;
- listens only once every worker has started: until then a connection is refused, not
  left in the backlog while the workers open the archive (an open port means ready);
- counts associations for all of them: max_associations, the per-AE limits and the
  per-host rate hold for the node, not per worker (the workers' Gate asks it);
- serves /metrics (every worker's, labelled worker="i"), /healthz and /readyz (ready
  when every worker is);
- passes a stop on (the first graceful, a second hurried) and exits once all have;
- restarts a worker that died, after recovering what it left (its unsynced listings
  and journal, minipacs.index.recover), waiting longer each time one dies young, and
  kills one that stops answering its pings for server.worker_timeout (then restarts it).

Workers run in sessions of their own: a terminal's Ctrl-C reaches the supervisor only,
which stops them gracefully; a worker whose supervisor is gone stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Final

from minipacs.app import access_policy, prepare_archive, server_config
from minipacs.config import Settings
from minipacs.logs import log_event
from minipacs.net import negotiation as neg
from minipacs.net.access import Admission, LocalGate, Refusal
from minipacs.ops.control import Channel, ChannelClosed, Message
from minipacs.ops.http import OpsServer
from minipacs.ops.metrics import merge_expositions
from minipacs.ops.worker import WORKER_ENV, encode_refusal
from minipacs.shutdown import StopSignals

log = logging.getLogger("minipacs.ops")

# The answer to an admission asked by a worker already gone (its reply is never read).
_GONE: Final = Refusal("worker gone", neg.REJECT_LOCAL_LIMIT)
# A worker that dies sooner than this after starting is restarted after a growing pause.
_YOUNG: Final = 10.0
_MAX_PAUSE: Final = 30.0
# A worker that dies this many times in a row before serving is not started again.
_START_TRIES: Final = 5
# Seconds a worker has to answer a metrics or readiness request.
_ASK_TIMEOUT: Final = 5.0
# After the workers' own grace, how long they may take before they are killed.
_STOP_MARGIN: Final = 15.0


@dataclass(eq=False)
class _Worker:
    """One worker process and its control line."""

    index: int
    process: asyncio.subprocess.Process
    channel: Channel
    # The supervisor's end of the handoff socket (connections go to the worker on it).
    handoff: socket.socket
    started: float
    # Set when it serves (its "started" notice): it opened the archive and takes handoffs.
    serving: asyncio.Event = field(default_factory=asyncio.Event)
    # Connections handed to it and not yet ended ("closed" notices).
    connections: int = 0
    # Admission tokens the supervisor counted for it, and their calling AE titles.
    held: dict[int, str] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class Supervisor:
    """Runs settings.server.workers worker processes; accepts for them and hands over."""

    def __init__(self, settings: Settings, argv: list[str]) -> None:
        self.settings = settings
        # The command line the workers are started with: this one's.
        self.argv = argv
        server = settings.server
        self.gate = LocalGate(
            Admission(
                # Its per-AE rules; the rest of the policy is applied by the workers.
                access_policy(settings),
                server.max_associations_per_ae,
                server.associations_per_minute,
                time.monotonic,
            ),
            server.max_associations,
        )
        self.workers: dict[int, _Worker] = {}
        self.restarts = 0
        self._stopping = False
        self._sockets: list[socket.socket] = []
        self._pauses: dict[int, float] = {}
        # Deaths before serving in a row, per worker number (see _START_TRIES).
        self._failed_starts: dict[int, int] = {}
        # Set when a worker cannot be started: the node stops with exit code 1.
        self._given_up = asyncio.Event()
        self._accepting: list[asyncio.Task[None]] = []
        # Set while at least one worker serves (and can take connections).
        self._available = asyncio.Event()
        self._turn = 0

    async def run(self, stop: StopSignals) -> int:
        """Prepare the archive, start the workers, serve until stopped; the exit code."""
        loop = asyncio.get_running_loop()
        requested, hurried = stop.attach(loop)
        ops: OpsServer | None = None
        try:
            # What a worker checks only when it builds its server (TLS files, access
            # rules) fails here, as it would in one process, not in an endless restart.
            server_config(self.settings)
            await loop.run_in_executor(None, prepare_archive, self.settings)
            if requested.is_set():
                return 0
            dicom, tls_sock = self._bind()
            # The ops endpoint first: /readyz says why not while the workers start.
            if self.settings.metrics.port:
                ops = OpsServer(self._exposition, self._not_ready)
                await ops.start(self.settings.metrics.host, self.settings.metrics.port)
            for index in range(self.settings.server.workers):
                await self._start(index)
            if await self._first_start(requested):
                for sock in self._sockets:
                    sock.listen(1024)
                self._accepting = [asyncio.create_task(self._accept(dicom, b"dicom"))]
                if tls_sock is not None:
                    self._accepting.append(asyncio.create_task(self._accept(tls_sock, b"tls")))
                log_event(
                    log,
                    "supervisor.started",
                    workers=len(self.workers),
                    pids=[w.process.pid for w in self.workers.values()],
                    port=dicom.getsockname()[1],
                )
                await _first(requested, self._given_up)
                if not self._given_up.is_set():
                    log_event(log, "supervisor.signal", signal=stop.received[0].name)
            # A worker that could not be started makes the exit code 1 however they stop.
            return max(await self._stop(hurried), int(self._given_up.is_set()))
        finally:
            for task in self._accepting:
                task.cancel()
            if ops is not None:
                await ops.stop()
            for sock in self._sockets:
                sock.close()
            stop.detach()

    def _bind(self) -> tuple[socket.socket, socket.socket | None]:
        """The sockets connections are accepted from, bound (a port in use fails here)."""
        server = self.settings.server
        dicom = _bound(server.host, server.port)
        self._sockets.append(dicom)
        tls_sock = None
        if self.settings.tls.port:
            tls_sock = _bound(server.host, self.settings.tls.port)
            self._sockets.append(tls_sock)
        return dicom, tls_sock

    async def _first_start(self, requested: asyncio.Event) -> bool:
        """Wait until every worker serves; False if asked to stop (or given up) first."""
        # A worker that dies starting is restarted by _watch, with a new event to wait on.
        while not (requested.is_set() or self._given_up.is_set()):
            waiting = [w for w in self.workers.values() if not w.serving.is_set()]
            if not waiting:
                return True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await _first(requested, self._given_up, waiting[0].serving)
        return False

    async def _start(self, index: int) -> None:
        """Start worker `index` with a new control line and handoff socket."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        handoff, their_handoff = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        place = {"index": index, "control": theirs.fileno(), "handoff": their_handoff.fileno()}
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "minipacs",
                *self.argv,
                env={**os.environ, WORKER_ENV: json.dumps(place)},
                pass_fds=[theirs.fileno(), their_handoff.fileno()],
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            handoff.close()
            raise
        finally:
            theirs.close()
            their_handoff.close()
        # Never blocks the supervisor: a worker whose queue is full is passed over.
        handoff.setblocking(False)
        worker = _Worker(index, process, await Channel.over(ours), handoff, time.monotonic())
        self.workers[index] = worker
        worker.tasks = [
            asyncio.create_task(worker.channel.run(lambda m, w=worker: self._handle(w, m))),
            asyncio.create_task(self._watch(worker)),
        ]
        log_event(log, "worker.started", worker=index, pid=process.pid)

    def _live(self) -> list[_Worker]:
        """The workers that serve: one still starting gets no connection to sit on."""
        workers = self.workers.values()
        return [
            w
            for w in workers
            if w.serving.is_set() and w.process.returncode is None and not w.channel.closed
        ]

    async def _accept(self, listener: socket.socket, kind: bytes) -> None:
        """Accept connections and hand each to the live worker with the fewest open."""
        loop = asyncio.get_running_loop()
        while True:
            # With no worker up the connections wait in the listen backlog.
            await self._available.wait()
            try:
                connection, _address = await loop.sock_accept(listener)
            except OSError:
                # EMFILE and the like: the next accept may succeed once some close.
                await asyncio.sleep(0.1)
                continue
            with connection:
                self._hand_over(connection, kind)

    def _hand_over(self, connection: socket.socket, kind: bytes) -> None:
        """Send a connection to the live worker with the fewest open; it keeps a copy."""
        live = self._live()
        if not live:
            self._available.clear()
        self._turn += 1
        # Fewest open connections; ties go round the workers in turn.
        ranked = sorted(live, key=lambda w: (w.connections, (w.index - self._turn) % len(live)))
        for worker in ranked:
            try:
                socket.send_fds(worker.handoff, [kind], [connection.fileno()])
            except OSError:
                continue  # its queue is full (hung?) or it just died: the next one
            worker.connections += 1
            return
        log_event(
            log,
            "connection.dropped",
            level=logging.WARNING,
            reason="no worker took it",
            workers_live=len(live),
        )

    async def _handle(self, worker: _Worker, message: Message) -> Message | None:
        """Answer a worker's Gate request (minipacs.ops.worker.RemoteGate)."""
        op = message.get("op")
        if op == "rate":
            return encode_refusal(self.gate.admission.rate_refusal(str(message["host"])))
        if op == "admit":
            if worker.channel.closed:
                # Read after _watch released what it held: counting it would leak.
                return encode_refusal(_GONE)
            ae = str(message["ae"])
            refusal = self.gate.admit_now(ae)
            if refusal is None:
                worker.held[int(message["token"])] = ae
            return encode_refusal(refusal)
        if op == "release":
            ae_held = worker.held.pop(int(message["token"]), None)
            if ae_held is not None:
                self.gate.release(ae_held)
            return None
        if op == "started":
            worker.tasks.append(asyncio.create_task(self._watchdog(worker)))
            worker.serving.set()
            self._failed_starts.pop(worker.index, None)
            self._available.set()
            return None
        if op == "closed":
            worker.connections = max(0, worker.connections - 1)
            return None
        return {"error": f"unknown request {op!r}"}

    async def _watch(self, worker: _Worker) -> None:
        """Wait for the worker to exit; unless stopping, recover after it and restart it."""
        code = await worker.process.wait()
        worker.channel.close()
        worker.handoff.close()
        if not self._live():
            self._available.clear()
        for ae in worker.held.values():
            self.gate.release(ae)
        worker.held.clear()
        if self._stopping:
            log_event(log, "worker.stopped", worker=worker.index, exit_code=code)
            return
        lived = time.monotonic() - worker.started
        if not worker.serving.is_set():
            failed = self._failed_starts[worker.index] = (
                self._failed_starts.get(worker.index, 0) + 1
            )
            if failed >= _START_TRIES:
                log_event(
                    log,
                    "worker.cannot_start",
                    level=logging.CRITICAL,
                    worker=worker.index,
                    attempts=failed,
                    exit_code=code,
                )
                self._given_up.set()
                return
        pause = 0.0
        if lived < _YOUNG:
            pause = _longer(self._pauses.get(worker.index, 0.5))
        self._pauses[worker.index] = pause
        _report(worker, "worker.died", exit_code=code, lived_s=round(lived, 1), restart_in_s=pause)
        while True:
            await asyncio.sleep(pause)
            if self._stopping:
                return
            try:
                # What it left half done (listed unsynced rows, journalled paths) is
                # settled before anything else could trip over it; the live workers'
                # are left alone.
                await asyncio.get_running_loop().run_in_executor(
                    None, prepare_archive, self.settings
                )
                if self._stopping:
                    return
                await self._start(worker.index)
            except Exception as exc:  # the database or the store may be back in a while
                pause = _longer(pause)
                log_event(
                    log,
                    "worker.restart_failed",
                    level=logging.ERROR,
                    worker=worker.index,
                    error=f"{type(exc).__name__}: {exc}",
                    retry_in_s=pause,
                )
                continue
            self.restarts += 1
            return

    async def _watchdog(self, worker: _Worker) -> None:
        """Kill a serving worker that stops answering pings; _watch then restarts it.

        A worker stopped (SIGSTOP) or stuck would keep its connections unserved, and one
        holding the SQLite write lock would stall every other worker's writes.
        """
        timeout = self.settings.server.worker_timeout
        while not self._stopping:
            await asyncio.sleep(min(5.0, timeout / 2))
            try:
                async with asyncio.timeout(timeout):
                    await worker.channel.request("ping")
            except ChannelClosed:
                return
            except TimeoutError:
                if self._stopping:
                    return
                _report(worker, "worker.hung", silent_s=timeout)
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGKILL)
                return

    async def _stop(self, hurried: asyncio.Event) -> int:
        """Stop every worker (hurried on a second signal); the exit code."""
        self._stopping = True
        # No new connections: the listen backlog is refused once the sockets close.
        for task in self._accepting:
            task.cancel()
        for sock in self._sockets:
            sock.close()
        for worker in self.workers.values():
            worker.channel.notify("stop")
        waits = {asyncio.ensure_future(w.process.wait()): w for w in self.workers.values()}
        hurry = asyncio.ensure_future(hurried.wait())
        deadline = time.monotonic() + self.settings.server.shutdown_grace + _STOP_MARGIN
        pending = set(waits)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            done, pending = await asyncio.wait(
                pending | {hurry}, timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            if hurry in done:
                for worker in self.workers.values():
                    worker.channel.notify("stop", hurry=True)
                hurry = asyncio.ensure_future(asyncio.Event().wait())
            pending.discard(hurry)
        hurry.cancel()
        for future in pending:
            worker = waits[future]
            log_event(log, "worker.killed", level=logging.ERROR, worker=worker.index)
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGKILL)
            await worker.process.wait()
        for worker in self.workers.values():
            for task in worker.tasks:
                task.cancel()
        codes = [w.process.returncode for w in self.workers.values()]
        log_event(log, "supervisor.stopped", exit_codes=codes, restarts=self.restarts)
        return 0 if all(code == 0 for code in codes) else 1

    async def _ask(self, op: str) -> dict[int, Message | None]:
        """Ask every worker; None for one that is gone or does not answer in time."""

        async def one(worker: _Worker) -> Message | None:
            """One worker's answer, or None."""
            try:
                async with asyncio.timeout(_ASK_TIMEOUT):
                    return await worker.channel.request(op)
            except (TimeoutError, ChannelClosed):
                return None

        workers = list(self.workers.values())
        answers = await asyncio.gather(*(one(w) for w in workers))
        return {w.index: a for w, a in zip(workers, answers, strict=True)}

    async def _exposition(self) -> bytes:
        """Every worker's metrics, labelled with its number, and the supervisor's own."""
        answers = await self._ask("metrics")
        parts = [(str(i), a["text"]) for i, a in sorted(answers.items()) if a and "text" in a]
        running = sum(1 for w in self.workers.values() if w.process.returncode is None)
        return merge_expositions(parts, running, self.restarts)

    async def _not_ready(self) -> str | None:
        """Why the node should get no traffic (a worker down or not ready), or None."""
        if self._stopping:
            return "stopping"
        starting = sorted(w.index for w in self.workers.values() if not w.serving.is_set())
        if starting:
            # Its control line is not read before it serves: asking would only time out.
            return f"worker {starting[0]} is starting"
        for index, answer in sorted((await self._ask("ready")).items()):
            if answer is None:
                return f"worker {index} does not answer"
            if answer.get("problem"):
                return f"worker {index}: {answer['problem']}"
        return None


def _longer(pause: float) -> float:
    """The pause before the next restart: twice the last, from 1 s up to _MAX_PAUSE."""
    return min(_MAX_PAUSE, max(1.0, 2 * pause))


def _report(worker: _Worker, event: str, **fields: object) -> None:
    """Log an ERROR event about one worker process."""
    log_event(log, event, logging.ERROR, worker=worker.index, pid=worker.process.pid, **fields)


async def _first(*events: asyncio.Event) -> None:
    """Wait until one of the events is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def _bound(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), not listening yet, non-blocking."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def supervise(settings: Settings, stop: StopSignals, argv: list[str]) -> int:
    """Run worker mode to completion; the exit code."""
    return asyncio.run(Supervisor(settings, argv).run(stop))
