"""The association acceptor: accept loop, association policy, limits, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pynetdicom.pdu_primitives import A_ASSOCIATE

from minipacs.logs import log_event
from minipacs.net import negotiation as neg
from minipacs.net.association import AssociateRequested, Association, Limits
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
    allowed_calling_aes: Sequence[str] = ()
    max_associations: int = 400
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
    ) -> None:
        self.config = config
        self.services = services
        self.observer = observer or Observer()
        self.policy = neg.AcceptorPolicy()
        self.sessions: set[Session] = set()
        # Sessions whose association was accepted and has not ended: the limit's count.
        self._established: set[Session] = set()
        self.accepted_total = 0
        self.rejected: dict[str, int] = {}
        self._server: asyncio.Server | None = None
        self._draining = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._ac_cache: dict[bytes, bytes] = {}

    @property
    def accepting(self) -> bool:
        """True while the listener is up and not draining for shutdown."""
        return self._server is not None and self._server.is_serving() and not self._draining

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind and start accepting."""
        self._server = await asyncio.start_server(
            self._on_connection,
            self.config.host,
            self.config.port,
            reuse_address=True,
            backlog=1024,
            limit=2 * 1024 * 1024,
        )
        log_event(
            log,
            "server.listening",
            ae_title=self.config.ae_title,
            host=self.config.host,
            port=self.port,
        )

    async def shutdown(self, grace: float, hurry: asyncio.Event | None = None) -> None:
        """Stop accepting, let associations finish for `grace` seconds, abort the rest.

        Setting `hurry` (a second stop signal) ends the grace period at once.
        """
        self._draining = True
        if self._server is not None:
            self._server.close()
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
        if self._server is not None:
            await self._server.wait_closed()
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

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # No setsockopt(TCP_NODELAY) here: asyncio and uvloop both set it on every TCP
        # transport they create (test_server_sockets_have_nodelay checks it).
        peername = writer.get_extra_info("peername") or ("?", 0)
        peer = f"{peername[0]}:{peername[1]}"
        association = Association(requestor=False, limits=self.config.limits)
        association.connection_made()
        session = Session(
            association,
            reader,
            writer,
            services=self.services,
            timeouts=self.config.timeouts,
            spool_dir=self.config.spool_dir,
            peer=peer,
            on_associate=self._on_associate,
            observer=self.observer,
        )
        started = time.perf_counter()
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            if session in self._established:
                self._established.discard(session)
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

    def _refuse(self, session: Session, why: str, result: tuple[int, int, int]) -> None:
        self.rejected[why] = self.rejected.get(why, 0) + 1
        self.observer.association_rejected(why)
        session.outcome = f"rejected: {why}"
        session.association.reject(*result)
        log_event(
            log,
            "association.rejected",
            level=logging.WARNING,
            peer=session.peer,
            calling_ae=session.calling_ae,
            called_ae=session.called_ae,
            reason=why,
            result=result,
        )

    async def _on_associate(self, session: Session, event: AssociateRequested) -> None:
        request = event.request
        config = self.config
        if not event.protocol_version & 0x0001:
            # PS3.8 9.3.2: bit 0 of the Protocol Version is version 1, the only one.
            return self._refuse(session, "protocol version", neg.REJECT_PROTOCOL_VERSION)
        if str(request.application_context_name) != neg.APPLICATION_CONTEXT_NAME:
            return self._refuse(session, "application context", neg.REJECT_APPLICATION_CONTEXT)
        if config.check_called_ae and session.called_ae != config.ae_title:
            return self._refuse(session, "called AE title", neg.REJECT_CALLED_AE)
        if config.allowed_calling_aes and session.calling_ae not in config.allowed_calling_aes:
            return self._refuse(session, "calling AE title", neg.REJECT_CALLING_AE)
        if self._draining:
            return self._refuse(session, "shutting down", neg.REJECT_LOCAL_LIMIT)
        if len(self._established) >= config.max_associations:
            return self._refuse(session, "association limit", neg.REJECT_LOCAL_LIMIT)
        roles = neg.role_proposals(request.user_information)
        negotiated = self.policy.negotiate(request.presentation_context_definition_list, roles)
        if not negotiated.accepted:
            return self._refuse(session, "no acceptable presentation context", neg.REJECT_NO_REASON)
        session.association.accept(
            self._accept_pdu(event.raw, request, negotiated),
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
            contexts_proposed=len(request.presentation_context_definition_list),
            contexts_accepted=len(negotiated.accepted),
            abstract_syntaxes=sorted({c.abstract_syntax for c in negotiated.accepted.values()}),
        )
        return None

    def _accept_pdu(self, raw: bytes, request: A_ASSOCIATE, negotiated: neg.Negotiated) -> bytes:
        # The AC is a pure function of the RQ bytes and our (fixed) configuration.
        cached = self._ac_cache.get(raw)
        if cached is None:
            cached = encode_associate_ac(self._accept_primitive(request, negotiated))
            if len(raw) > CACHEABLE_ASSOCIATE_LENGTH:
                return cached
            if len(self._ac_cache) >= 256:
                self._ac_cache.pop(next(iter(self._ac_cache)))
            self._ac_cache[raw] = cached
        return cached

    def _accept_primitive(self, request: A_ASSOCIATE, negotiated: neg.Negotiated) -> A_ASSOCIATE:
        response = A_ASSOCIATE()
        response.application_context_name = neg.APPLICATION_CONTEXT_NAME
        response.calling_ae_title = request.calling_ae_title
        response.called_ae_title = request.called_ae_title
        response.result = 0x00
        response.result_source = 0x01
        response.presentation_context_definition_results_list = negotiated.results
        response.user_information = neg.user_information_reply(
            self.config.limits.max_pdu_length, request.user_information, negotiated.role_replies
        )
        return response
