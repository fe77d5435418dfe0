"""The association acceptor: accept loops (plain and TLS), association policy, limits,
graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pynetdicom.pdu_primitives import A_ASSOCIATE

from minipacs.logs import log_event
from minipacs.net import negotiation as neg
from minipacs.net import tls
from minipacs.net.access import (
    AccessPolicy,
    Admission,
    Gate,
    Identity,
    LocalGate,
    Refusal,
    peer_host,
    peer_identity,
)
from minipacs.net.association import AssociateRequested, Association, Limits
from minipacs.net.connection import Connection
from minipacs.net.guard import guard_services, log_refusal
from minipacs.net.observer import Observer
from minipacs.net.operations import Service
from minipacs.net.pdu import CACHEABLE_ASSOCIATE_LENGTH, encode_associate_ac
from minipacs.net.session import Session, Timeouts

log = logging.getLogger("minipacs.net")


@dataclass
class ServerConfig:
    """What the acceptor needs to know; built from Settings by the app."""

    ae_title: str = "MINIPACS"
    host: str = "127.0.0.1"
    port: int = 11112
    check_called_ae: bool = True
    access: AccessPolicy = field(default_factory=AccessPolicy)
    max_associations: int = 400
    # 0: no limit (but max_associations) / no rate limit.
    max_associations_per_ae: int = 0
    associations_per_minute: int = 0
    max_pending_connections: int = 512
    # The TLS listener, on host, when tls_port is set (0: none).
    tls_port: int = 0
    ssl_context: ssl.SSLContext | None = None
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    spool_dir: Path = Path("minipacs-data/store/.spool")


class Server:
    """Accepts associations and runs each as one Session task on the event loop."""

    def __init__(
        self,
        config: ServerConfig,
        services: Mapping[int, Service],
        observer: Observer | None = None,
        gate: Gate | None = None,
        on_closed: Callable[[], None] | None = None,
    ) -> None:
        """`gate` counts associations for several processes (worker mode); else this one.

        on_closed is called as each connection ends (worker mode: its supervisor balances).
        """
        self.config = config
        self.services = guard_services(services, config.access, config.limits.max_dataset_size)
        self.observer = observer or Observer()
        self.gate = gate or LocalGate(
            Admission(
                config.access,
                config.max_associations_per_ae,
                config.associations_per_minute,
                time.monotonic,
            ),
            config.max_associations,
        )
        self.policy = neg.AcceptorPolicy()
        self.sessions: set[Session] = set()
        # Sessions whose association was accepted and has not ended: the limit's count.
        self._established: set[Session] = set()
        # Connected sessions with no A-ASSOCIATE-RQ yet, oldest first (a dict keeps order).
        self._pending: dict[Session, None] = {}
        self.accepted_total = 0
        self.rejected: dict[str, int] = {}
        self._server: asyncio.Server | None = None
        self._tls: tls.TlsListener | None = None
        self._draining = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._ac_cache: dict[bytes, bytes] = {}
        self._on_closed = on_closed
        # Worker mode: where the supervisor's accepted connections arrive (see adopt).
        self._handoff: socket.socket | None = None

    @property
    def accepting(self) -> bool:
        """True while the listener is up and not draining for shutdown."""
        listening = self._server is not None and self._server.is_serving()
        return (listening or self._handoff is not None) and not self._draining

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def tls_port(self) -> int:
        """The bound TLS port (0: no TLS listener)."""
        return self._tls.port if self._tls is not None else 0

    async def start(self, handoff: socket.socket | None = None) -> None:
        """Bind and start accepting, on the TLS port too when configured.

        With `handoff` (worker mode) nothing is bound: connections the supervisor accepted
        arrive on it, each a descriptor with b"dicom" or b"tls" (see adopt).
        """
        config = self.config
        loop = asyncio.get_running_loop()
        if handoff is None:
            self._server = await loop.create_server(
                lambda: Connection(self._on_connection),
                config.host,
                config.port,
                reuse_address=True,
                backlog=1024,
            )
        else:
            self._handoff = handoff
            handoff.setblocking(False)
            loop.add_reader(handoff.fileno(), self._receive_handoffs)
        if config.tls_port and config.ssl_context is not None:
            self._tls = tls.TlsListener(
                self._on_connection,
                self._tls_failed,
                config.ssl_context,
                # A handshake is held no longer than ARTIM holds a silent peer (PS3.8 9.1.5).
                handshake_timeout=config.timeouts.artim,
                max_handshakes=config.max_pending_connections,
            )
            if handoff is None:
                await self._tls.start(config.host, config.tls_port)
        log_event(
            log,
            "server.listening",
            ae_title=self.config.ae_title,
            host=self.config.host,
            port=self.port if handoff is None else "supervisor",
            tls_port=self.tls_port or None,
        )

    def _receive_handoffs(self) -> None:
        """Adopt every connection waiting on the handoff socket."""
        assert self._handoff is not None
        while True:
            try:
                kind, fds, _flags, _address = socket.recv_fds(self._handoff, 16, 4)
            except BlockingIOError:
                return
            except OSError as exc:
                log.error("handoff socket failed: %s", exc)
                self._stop_handoffs()
                return
            for fd in fds:
                self.adopt(socket.socket(fileno=fd), tls=kind == b"tls")

    def adopt(self, sock: socket.socket, tls: bool = False) -> None:
        """Serve a connection accepted elsewhere (by the supervisor, in worker mode)."""
        if self._draining or (tls and self._tls is None):
            sock.close()
            self._ended()
            return
        sock.setblocking(False)
        try:
            address = sock.getpeername()
        except OSError:
            sock.close()
            self._ended()
            return
        peer = f"{address[0]}:{address[1]}"
        if tls:
            assert self._tls is not None
            self._tls.adopt(sock, peer)
            return
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(
            loop.connect_accepted_socket(lambda: Connection(self._on_connection), sock)
        )
        # Kept until the transport exists; _on_connection then tracks the session.
        self._tasks.add(task)
        task.add_done_callback(self._adopted)

    def _adopted(self, task: asyncio.Task[object]) -> None:
        """A connection's transport is made, or failed (then it never reaches a session)."""
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is not None:
            self._ended()

    def _ended(self) -> None:
        """A handed-over connection ended (worker mode: its supervisor balances on it)."""
        if self._on_closed is not None:
            self._on_closed()

    def _stop_handoffs(self) -> None:
        if self._handoff is not None:
            asyncio.get_running_loop().remove_reader(self._handoff.fileno())
            self._handoff.close()
            self._handoff = None

    async def shutdown(self, grace: float, hurry: asyncio.Event | None = None) -> None:
        """Stop accepting, let associations finish for `grace` seconds, abort the rest.

        Setting `hurry` (a second stop signal) ends the grace period at once.
        """
        self._draining = True
        self._stop_handoffs()
        listeners = [s for s in (self._server, self._tls) if s is not None]
        for listener in listeners:
            listener.close()
        log_event(log, "server.draining", active=len(self.sessions), grace_s=grace)
        if self._tasks:
            pending = await self._drain(grace, hurry)
            if self.sessions:
                log_event(
                    log,
                    "server.aborting",
                    level=logging.WARNING,
                    active=len(self.sessions),
                    reason="hurried" if hurry is not None and hurry.is_set() else "grace over",
                )
            for session in list(self.sessions):
                session.abort("server shutting down")
            if pending:
                await asyncio.wait(pending, timeout=5)
        for listener in listeners:
            await listener.wait_closed()
        log_event(log, "server.stopped", accepted_total=self.accepted_total)

    async def _drain(self, grace: float, hurry: asyncio.Event | None) -> set[asyncio.Task[None]]:
        """Wait for every session task, at most `grace` seconds or until `hurry` is set."""
        tasks = set(self._tasks)
        waiters = {asyncio.ensure_future(asyncio.wait(tasks))}
        if hurry is not None:
            waiters.add(asyncio.ensure_future(hurry.wait()))
        await asyncio.wait(waiters, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        return {task for task in tasks if not task.done()}

    async def _on_connection(self, connection: Connection) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # No setsockopt(TCP_NODELAY) here: asyncio and uvloop both set it on every TCP
        # transport they create (test_server_sockets_have_nodelay checks it).
        peername = connection.get_extra_info("peername") or ("?", 0)
        peer = f"{peername[0]}:{peername[1]}"
        association = Association(requestor=False, limits=self.config.limits)
        association.connection_made()
        session = Session(
            association,
            connection,
            services=self.services,
            timeouts=self.config.timeouts,
            spool_dir=self.config.spool_dir,
            peer=peer,
            on_associate=self._on_associate,
            observer=self.observer,
        )
        started = time.perf_counter()
        self.sessions.add(session)
        self._admit_pending(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            self._pending.pop(session, None)
            self._ended()
            if session in self._established:
                self._established.discard(session)
                self.gate.release(session.calling_ae)
                self.observer.association_ended(session.bytes_received, session.bytes_sent)
            level = logging.INFO if session.outcome == "released" else logging.WARNING
            if log.isEnabledFor(level):
                log_event(
                    log,
                    "association.end",
                    level=level,
                    peer=peer,
                    calling_ae=session.calling_ae,
                    called_ae=session.called_ae,
                    outcome=session.outcome,
                    error=association.error or None,
                    requests=session.requests_served,
                    duration_ms=round((time.perf_counter() - started) * 1000, 3),
                )

    def _tls_failed(self, peer: str, detail: str) -> None:
        """A TLS handshake failed (PS3.15 B.10): no certificate, unknown CA, not TLS..."""
        self._count_drop(peer, "TLS handshake", detail)
        self._ended()

    def _admit_pending(self, session: Session) -> None:
        """Count a new connection; past the cap, close the one that waited longest."""
        self._pending[session] = None
        if len(self._pending) <= self.config.max_pending_connections:
            return
        # A peer that associates sends its RQ at once: the oldest silent one is the
        # likeliest flood, and a flood then only ever pushes out itself.
        oldest = next(iter(self._pending))
        del self._pending[oldest]
        self._drop(oldest, "pending connection limit", None)

    def _drop(self, session: Session, why: str, detail: str | None) -> None:
        """Close a connection that never associated; log and count why."""
        session.outcome = f"closed: {why}"
        self._count_drop(session.peer, why, detail)
        if session.connection.transport is not None:
            session.connection.transport.abort()

    def _count_drop(self, peer: str, why: str, detail: str | None) -> None:
        self._count(why)
        log_refusal(log, "connection.dropped", peer, reason=why, detail=detail)

    def _count(self, why: str) -> None:
        self.rejected[why] = self.rejected.get(why, 0) + 1
        self.observer.association_rejected(why)

    def _refuse(self, session: Session, why: str, result: tuple[int, int, int]) -> None:
        self._count(why)
        session.outcome = f"rejected: {why}"
        session.association.reject(*result)
        log_refusal(
            log,
            "association.rejected",
            session.peer,
            calling_ae=session.calling_ae,
            called_ae=session.called_ae,
            reason=why,
            result=result,
        )

    async def _on_associate(self, session: Session, event: AssociateRequested) -> None:
        self._pending.pop(session, None)
        request = event.request
        config = self.config
        if not event.protocol_version & 0x0001:
            # PS3.8 9.3.2: bit 0 of the Protocol Version is version 1, the only one.
            return self._refuse(session, "protocol version", neg.REJECT_PROTOCOL_VERSION)
        if str(request.application_context_name) != neg.APPLICATION_CONTEXT_NAME:
            return self._refuse(session, "application context", neg.REJECT_APPLICATION_CONTEXT)
        if config.check_called_ae and session.called_ae != config.ae_title:
            return self._refuse(session, "called AE title", neg.REJECT_CALLED_AE)
        host = peer_host(session.peer)
        refusal = config.access.association_refusal(
            session.calling_ae, host
        ) or await self.gate.rate_refusal(host)
        if refusal is not None:
            return self._refuse(session, refusal.why, refusal.result)
        # After the rate (a flood of passcodes costs scrypt time), before the limits (the
        # check awaits: the counts must be read after it, with no await before accept).
        identity = peer_identity(request.user_information)
        refusal = await self._identity_refusal(identity)
        if refusal is not None:
            return self._refuse(session, refusal.why, refusal.result)
        if self._draining:
            return self._refuse(session, "shutting down", neg.REJECT_LOCAL_LIMIT)
        # From the gate's answer on, the association is counted: it is accepted or
        # released with no await in between.
        refusal = await self.gate.admit(session.calling_ae)
        if refusal is not None:
            return self._refuse(session, refusal.why, refusal.result)
        roles = neg.role_proposals(request.user_information)
        negotiated = self.policy.negotiate(request.presentation_context_definition_list, roles)
        if self._draining or not negotiated.accepted:
            # Shutdown may have begun while another process's gate answered.
            self.gate.release(session.calling_ae)
            if self._draining:
                return self._refuse(session, "shutting down", neg.REJECT_LOCAL_LIMIT)
            return self._refuse(session, "no acceptable presentation context", neg.REJECT_NO_REASON)
        session.association.accept(
            self._accept_pdu(event.raw, request, negotiated, identity),
            negotiated.accepted,
            neg.peer_max_pdu(request.user_information),
        )
        self.accepted_total += 1
        self._established.add(session)
        self.observer.association_accepted()
        if not log.isEnabledFor(logging.INFO):
            return None
        class_uid, version = neg.peer_implementation(request.user_information)
        log_event(
            log,
            "association.accepted",
            peer=session.peer,
            calling_ae=session.calling_ae,
            called_ae=session.called_ae,
            implementation=f"{class_uid} {version}".strip(),
            tls=session.connection.get_extra_info("ssl_object") is not None,
            user=identity.primary.decode("utf-8", "replace") if identity is not None else None,
            contexts_proposed=len(request.presentation_context_definition_list),
            contexts_accepted=len(negotiated.accepted),
            abstract_syntaxes=sorted({c.abstract_syntax for c in negotiated.accepted.values()}),
        )
        return None

    async def _identity_refusal(self, identity: Identity | None) -> Refusal | None:
        policy = self.config.access
        if identity is None or not policy.checks_identity:
            return policy.identity_refusal(identity)
        # scrypt costs ~50 ms of CPU by design: off the event loop.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, policy.identity_refusal, identity)

    def _accept_pdu(
        self,
        raw: bytes,
        request: A_ASSOCIATE,
        negotiated: neg.Negotiated,
        identity: Identity | None,
    ) -> bytes:
        # The AC is a pure function of the RQ bytes and our (fixed) configuration.
        cached = self._ac_cache.get(raw)
        if cached is None:
            confirmed = self.config.access.confirms_identity(identity)
            cached = encode_associate_ac(self._accept_primitive(request, negotiated, confirmed))
            # An RQ with a User Identity holds a passcode: never kept as a cache key.
            if len(raw) > CACHEABLE_ASSOCIATE_LENGTH or identity is not None:
                return cached
            if len(self._ac_cache) >= 256:
                self._ac_cache.pop(next(iter(self._ac_cache)))
            self._ac_cache[raw] = cached
        return cached

    def _accept_primitive(
        self, request: A_ASSOCIATE, negotiated: neg.Negotiated, confirmed: bool
    ) -> A_ASSOCIATE:
        response = A_ASSOCIATE()
        response.application_context_name = neg.APPLICATION_CONTEXT_NAME
        response.calling_ae_title = request.calling_ae_title
        response.called_ae_title = request.called_ae_title
        response.result = 0x00
        response.result_source = 0x01
        response.presentation_context_definition_results_list = negotiated.results
        response.user_information = neg.user_information_reply(
            self.config.limits.max_pdu_length,
            request.user_information,
            negotiated.role_replies,
            confirmed,
        )
        return response
