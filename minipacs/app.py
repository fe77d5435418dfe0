"""Builds the server from Settings and runs it: start, serve until a signal, drain, stop."""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from minipacs.config import ConfigError, Settings
from minipacs.index.db import make_engine, read_engine, share_writes, sqlite_path
from minipacs.index.recover import recover
from minipacs.index.schema import ensure_schema
from minipacs.index.statistics import StatisticsKeeper
from minipacs.index.writer import IndexWriter
from minipacs.logs import label_process, log_event
from minipacs.net import tls
from minipacs.net.access import AccessPolicy, AeRule, Gate, parse_networks
from minipacs.net.association import Limits
from minipacs.net.observer import Observer
from minipacs.net.server import Server, ServerConfig
from minipacs.net.session import Timeouts
from minipacs.ops.affinity import pin_process, pin_thread, unpin_thread
from minipacs.ops.control import Channel
from minipacs.ops.http import OpsServer
from minipacs.ops.metrics import Metrics
from minipacs.ops.worker import RemoteGate, worker_handler, worker_place
from minipacs.services import build_services
from minipacs.services.find import FindOptions, FindService
from minipacs.services.get import GetService
from minipacs.services.move import MoveService
from minipacs.services.retrieve import RetrieveOptions
from minipacs.services.store import StoreService
from minipacs.shutdown import StopSignals
from minipacs.storage.filestore import FileStore

log = logging.getLogger("minipacs.app")

_READY_TIMEOUT = 2.0


def access_policy(settings: Settings) -> AccessPolicy:
    """The access rules: [access], [access.<AE>] and [users], with server.allowed_calling_aes."""
    rules = {
        title: AeRule(frozenset(rule.services), parse_networks(rule.hosts), rule.max_associations)
        for title, rule in settings.access_rules.items()
    }
    unknown_ae = settings.access.unknown_ae
    legacy = settings.server.allowed_calling_aes
    if legacy:
        # The older list: each title listed may do everything from anywhere, unless an
        # [access.<AE>] rule says otherwise, and no other title may associate.
        rules = {title: AeRule() for title in legacy} | rules
        if unknown_ae == "allow":
            unknown_ae = "refuse-association"
    return AccessPolicy(rules, unknown_ae, settings.access.user_identity, dict(settings.users))


def tls_server_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS listener's context from [tls] (None when tls.port is 0)."""
    config = settings.tls
    if not config.port:
        return None
    try:
        return tls.server_context(
            config.certificate, config.private_key, config.ca_file, config.require_client_cert
        )
    except OSError as exc:  # ssl.SSLError is one; neither names the file
        raise ConfigError(
            f"{settings.config_path}: tls: cannot load certificate {config.certificate!r}, "
            f"key {config.private_key!r} or CA bundle {config.ca_file!r}: {exc}"
        ) from None


def tls_client_context(settings: Settings) -> ssl.SSLContext:
    """The requestor's context for destinations with tls = true: [tls] CA and certificate."""
    config = settings.tls
    return tls.client_context(config.ca_file, config.certificate, config.private_key)


def server_config(settings: Settings) -> ServerConfig:
    """Translate Settings into the acceptor's configuration."""
    server = settings.server
    return ServerConfig(
        ae_title=server.ae_title,
        host=server.host,
        port=server.port,
        check_called_ae=server.check_called_ae,
        access=access_policy(settings),
        max_associations=server.max_associations,
        max_associations_per_ae=server.max_associations_per_ae,
        associations_per_minute=server.associations_per_minute,
        # Each worker holds its share, at least one: with its workers evenly loaded the node
        # holds about max_pending_connections, as one process would, and fewer otherwise
        # (the supervisor hands connections to the worker with the fewest open).
        max_pending_connections=math.ceil(server.max_pending_connections / server.workers),
        tls_port=settings.tls.port,
        ssl_context=tls_server_context(settings),
        limits=Limits(
            max_pdu_length=server.max_pdu_length,
            max_associate_length=server.max_associate_rq_length,
            spool_threshold=server.spool_threshold,
            max_dataset_size=server.max_dataset_size,
        ),
        timeouts=Timeouts(artim=server.artim_timeout, idle=server.idle_timeout),
        spool_dir=settings.spool_dir,
    )


@dataclass
class Archive:
    """The storage side: file store, index engine and writer, blocking-work executor."""

    store: FileStore
    engine: Engine
    writer: IndexWriter
    executor: ThreadPoolExecutor
    # C-FIND reads: apart from the store's threads, so queries never wait behind fsyncs.
    query_executor: ThreadPoolExecutor

    async def close(self) -> None:
        """Commit what is queued and release threads and connections."""
        await self.writer.close()
        self.executor.shutdown(wait=True)
        self.query_executor.shutdown(wait=True, cancel_futures=True)
        self.store.close()
        self.engine.dispose()


def _open_store(settings: Settings) -> FileStore:
    return FileStore(
        settings.store_dir,
        settings.spool_dir,
        settings.storage.min_free_bytes,
        settings.storage.fsync,
        settings.storage.flush,
        # Worker mode: a sender's retry often reaches another worker than its first try.
        shared_claims=settings.server.workers > 1,
    )


def _open_index(settings: Settings) -> Engine:
    """The index engine, its schema checked (upgraded where allowed); raise SchemaOutOfDate."""
    engine = make_engine(settings.database.url, settings.database.pool_size)
    if settings.server.workers > 1:
        # Worker processes share one SQLite file: they take turns without polling.
        share_writes(engine)
    try:
        ensure_schema(
            settings.database.url, settings.database.auto_upgrade, engine, settings.config_path
        )
    except BaseException:
        engine.dispose()
        raise
    return engine


def prepare_archive(settings: Settings) -> None:
    """What serve does before serving, alone (worker mode's supervisor): then close."""
    engine = _open_index(settings)
    try:
        store = _open_store(settings)
        try:
            _settle_store(store, engine)
        finally:
            store.close()
    finally:
        engine.dispose()


def _settle_store(store: FileStore, engine: Engine) -> None:
    """Recover what dead writers left, then remove their temp files."""
    # Recovery reads the journals of dead writers, so it runs before cleanup may age them out.
    report = recover(store, engine)
    if report.checked:
        log_event(
            log,
            "store.recovered",
            level=logging.WARNING,
            checked=report.checked,
            indexed=len(report.indexed),
            removed=len(report.removed),
            failed=len(report.failed),
            withdrawn=len(report.withdrawn),
        )
    removed = store.cleanup_temp()
    if removed:
        log_event(log, "store.temp_cleaned", level=logging.WARNING, files=removed)


def open_archive(settings: Settings, settle: bool = True) -> Archive:
    """Open store and index (blocking: schema check, temp cleanup); raise SchemaOutOfDate.

    settle False (a worker: its supervisor did it): no recovery, no temp cleanup.
    """
    engine = _open_index(settings)
    store = _open_store(settings)
    if settle:
        _settle_store(store, engine)
    database = sqlite_path(settings.database.url)
    writer = IndexWriter(
        engine,
        settings.storage.duplicate_policy,
        settings.database.batch_max,
        settings.database.batch_wait_ms,
        # The store's syncfs, which every C-STORE waits for, flushes the WAL as well.
        durable_commits=database is None
        or not (store.flushes(database) and store.flushes(database.parent)),
    )
    writer.start()
    # fsync-bound work: more threads than cores keeps the disk queue full.
    # Pinned explicitly (server.pin_cpu), whichever thread happens to start them.
    executor = ThreadPoolExecutor(
        max_workers=16, thread_name_prefix="store", initializer=pin_thread
    )
    query_executor = ThreadPoolExecutor(
        max_workers=settings.query.threads, thread_name_prefix="query", initializer=unpin_thread
    )
    return Archive(store, engine, writer, executor, query_executor)


async def _not_ready(server: Server, archive: Archive) -> str | None:
    """Why this node should get no traffic now (None: ready), for /readyz."""
    if not server.accepting:
        return "not accepting associations"
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(_READY_TIMEOUT):
            await loop.run_in_executor(archive.query_executor, _ping, archive.engine)
    except TimeoutError:
        return f"index did not answer within {_READY_TIMEOUT:g} s"
    except SQLAlchemyError as exc:
        return f"index unavailable: {type(exc).__name__}"
    return None


def _ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def build_server(
    settings: Settings,
    archive: Archive,
    observer: Observer | None = None,
    gate: Gate | None = None,
    on_closed: Callable[[], None] | None = None,
) -> Server:
    """The acceptor with every service, on an opened archive."""
    store_service = StoreService(
        archive.store,
        archive.writer,
        archive.engine,
        archive.executor,
        settings.storage.duplicate_policy,
    )
    find_service = FindService(
        read_engine(archive.engine),
        archive.store,
        archive.query_executor,
        FindOptions(
            ae_title=settings.server.ae_title,
            pn_case_insensitive=settings.query.pn_case_insensitive,
            max_results=settings.query.max_results,
        ),
    )
    retrieve_options = RetrieveOptions(
        ae_title=settings.server.ae_title,
        destinations=settings.destinations,
        connect_timeout=settings.retrieve.connect_timeout,
        response_timeout=settings.retrieve.response_timeout,
        pending_interval=settings.retrieve.pending_interval,
        tls_context=(
            tls_client_context(settings)
            if any(destination.tls for destination in settings.destinations.values())
            else None
        ),
    )
    retrieve_args = (
        archive.engine,
        archive.store,
        archive.query_executor,
        archive.executor,
        retrieve_options,
    )
    move_service = MoveService(*retrieve_args)
    get_service = GetService(*retrieve_args)
    services = build_services(store_service, find_service, move_service, get_service)
    return Server(server_config(settings), services, observer, gate, on_closed)


async def serve(
    settings: Settings, stop: StopSignals, started: asyncio.Event | None = None
) -> None:
    """Run the server until SIGTERM or SIGINT, then shut down gracefully.

    As a worker (ops.worker, started by ops.supervisor) it serves the supervisor's sockets,
    its admission and ops requests go through the supervisor, and it stops with it.
    """
    loop = asyncio.get_running_loop()
    # Signals first: one that arrives while the archive opens must stop us, not kill us.
    requested, hurried = stop.attach(loop)
    place = worker_place()
    if place is not None:
        # The workers share one log stream: each line says whose it is.
        label_process(worker=place.index)
    if settings.server.pin_cpu:
        # Before the archive's threads start: they inherit the main thread's CPU.
        try:
            cpu, threads = pin_process(0 if place is None else place.index)
        except OSError as exc:
            # A placement refused costs speed, not service: serve unpinned, and say so.
            log_event(log, "server.pin_failed", level=logging.WARNING, error=str(exc))
        else:
            log_event(log, "server.pinned", cpu=cpu, threads=threads)
    try:
        archive = await loop.run_in_executor(None, open_archive, settings, place is None)
        # Index size and free space are the node's: one worker reports them.
        archive_wide = place is None or place.index == 0
        metrics = Metrics(archive.engine, settings.store_dir) if archive_wide else Metrics()
        statistics = StatisticsKeeper(archive.engine, archive.query_executor)
        ops: OpsServer | None = None
        control: Channel | None = None
        try:
            if place is not None:
                control = await Channel.over(place.control)
            server = build_server(
                settings,
                archive,
                metrics,
                RemoteGate(control) if control else None,
                (lambda: control.notify("closed")) if control else None,
            )

            async def exposition() -> bytes:
                """The metrics text, made off the event loop."""
                return await loop.run_in_executor(archive.query_executor, metrics.exposition)

            # Asked to stop during start-up: the port is never opened.
            if not requested.is_set():
                if archive_wide:
                    statistics.start()
                # The ops endpoint first: once the DICOM port answers, /readyz does too.
                if place is None and settings.metrics.port:
                    ops = OpsServer(exposition, lambda: _not_ready(server, archive))
                    await ops.start(settings.metrics.host, settings.metrics.port)
                if place is not None and control is not None:
                    await server.start(place.handoff)
                    handler = worker_handler(
                        exposition, lambda: _not_ready(server, archive), requested, hurried
                    )
                    # The supervisor gone (its end of the line closed): stop as if told.
                    listening = asyncio.create_task(control.run(handler))
                    listening.add_done_callback(lambda _: requested.set())
                    control.notify("started")
                else:
                    await server.start()
                if started is not None:
                    started.set()
            await requested.wait()
            log_event(
                log,
                "server.signal",
                # A worker is told to stop by its supervisor, or stops when it is gone.
                signal=stop.received[0].name if stop.received else "supervisor",
                active=len(server.sessions),
            )
            # A second signal cuts the grace period short (PS3.8 7.3: A-ABORT the rest).
            await server.shutdown(settings.server.shutdown_grace, hurry=hurried)
        finally:
            if ops is not None:
                await ops.stop()
            if control is not None:
                control.close()
            await statistics.stop()
            await archive.close()
    finally:
        stop.detach()


def run(settings: Settings, stop: StopSignals) -> int:
    """Run the server to completion on uvloop when installed; return the exit code."""
    if settings.server.use_uvloop:
        try:
            import uvloop
        except ImportError:
            uvloop = None
        if uvloop is not None:
            uvloop.run(serve(settings, stop))
            return 0
    asyncio.run(serve(settings, stop))
    return 0
