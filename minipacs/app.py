"""Builds the server from Settings and runs it: start, serve until a signal, drain, stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy import Engine

from minipacs.config import Settings
from minipacs.index.db import make_engine
from minipacs.index.recover import recover
from minipacs.index.schema import ensure_schema
from minipacs.index.writer import IndexWriter
from minipacs.logs import log_event
from minipacs.net.association import Limits
from minipacs.net.server import Server, ServerConfig
from minipacs.net.session import Timeouts
from minipacs.services import build_services
from minipacs.services.find import FindOptions, FindService
from minipacs.services.get import GetService
from minipacs.services.move import MoveService
from minipacs.services.retrieve import RetrieveOptions
from minipacs.services.store import StoreService
from minipacs.storage.filestore import FileStore

log = logging.getLogger("minipacs.app")


def server_config(settings: Settings) -> ServerConfig:
    """Translate Settings into the acceptor's configuration."""
    server = settings.server
    return ServerConfig(
        ae_title=server.ae_title,
        host=server.host,
        port=server.port,
        check_called_ae=server.check_called_ae,
        allowed_calling_aes=tuple(server.allowed_calling_aes),
        max_associations=server.max_associations,
        limits=Limits(
            max_pdu_length=server.max_pdu_length,
            max_associate_length=server.max_associate_rq_length,
            spool_threshold=server.spool_threshold,
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


def open_archive(settings: Settings) -> Archive:
    """Open store and index (blocking: schema check, temp cleanup); raise SchemaOutOfDate."""
    engine = make_engine(settings.database.url, settings.database.pool_size)
    ensure_schema(
        settings.database.url, settings.database.auto_upgrade, engine, settings.config_path
    )
    store = FileStore(
        settings.store_dir,
        settings.spool_dir,
        settings.storage.min_free_bytes,
        settings.storage.fsync,
    )
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
        )
    removed = store.cleanup_temp()
    if removed:
        log_event(log, "store.temp_cleaned", level=logging.WARNING, files=removed)
    writer = IndexWriter(
        engine,
        settings.storage.duplicate_policy,
        settings.database.batch_max,
        settings.database.batch_wait_ms,
    )
    writer.start()
    # fsync-bound work: more threads than cores keeps the disk queue full.
    executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="store")
    query_executor = ThreadPoolExecutor(
        max_workers=settings.query.threads, thread_name_prefix="query"
    )
    return Archive(store, engine, writer, executor, query_executor)


async def serve(settings: Settings, started: asyncio.Event | None = None) -> None:
    """Run the server until SIGTERM or SIGINT, then shut down gracefully."""
    loop = asyncio.get_running_loop()
    archive = await loop.run_in_executor(None, open_archive, settings)
    store_service = StoreService(
        archive.store,
        archive.writer,
        archive.engine,
        archive.executor,
        settings.storage.duplicate_policy,
    )
    find_service = FindService(
        archive.engine,
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
    server = Server(server_config(settings), services)
    try:
        await server.start()
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        if started is not None:
            started.set()
        try:
            await stop.wait()
            log_event(log, "server.signal", active=len(server.sessions))
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(signum)
            await server.shutdown(settings.server.shutdown_grace)
    finally:
        await archive.close()


def run(settings: Settings) -> int:
    """Run the server to completion on uvloop when installed; return the exit code."""
    if settings.server.use_uvloop:
        try:
            import uvloop
        except ImportError:
            uvloop = None
        if uvloop is not None:
            uvloop.run(serve(settings))
            return 0
    asyncio.run(serve(settings))
    return 0
