"""Planner statistics for the SQLite index, refreshed as the archive grows.

SQLite has no autovacuum-analyze as PostgreSQL has: without statistics its planner
guesses, and with bound parameters it guessed wrong for C-FIND pages (walking the
primary key of a million-instance index instead of the StudyDate index: 2.8 ms against
0.3 ms for ten matches). Sampled statistics (analysis_limit) were not enough to fix it,
so the patient, study and series tables, where STUDY and PATIENT queries choose among
indexes, are analyzed in full (0.16 s at a million instances); instances, always
reached through their series, get sampled statistics. It runs at start and again each
time the index has doubled (or grown by MIN_GROWTH) since the last run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import Executor
from typing import Final

from sqlalchemy import Engine, func, select

from minipacs.index.db import is_sqlite, write_turn
from minipacs.index.models import Instance, Patient, Series, Study
from minipacs.logs import log_event

log = logging.getLogger("minipacs.index")

MIN_GROWTH: Final = 1_000
# Rows ANALYZE samples per index of the instances table (PRAGMA analysis_limit).
_ANALYSIS_LIMIT: Final = 1_000


def analyze(engine: Engine) -> None:
    """Recompute the planner statistics of a SQLite index (blocking)."""
    # ANALYZE writes sqlite_stat1: it takes its turn as the index writers do.
    with write_turn(engine), engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA analysis_limit=0")
        for table in (Patient, Study, Series):
            connection.exec_driver_sql(f"ANALYZE {table.__tablename__}")
        connection.exec_driver_sql(f"PRAGMA analysis_limit={_ANALYSIS_LIMIT}")
        connection.exec_driver_sql(f"ANALYZE {Instance.__tablename__}")
        connection.commit()


def _instances(engine: Engine) -> int:
    # The highest id tells growth as well as a count does, from one index probe.
    with engine.connect() as connection:
        return int(connection.execute(select(func.max(Instance.id))).scalar_one() or 0)


class StatisticsKeeper:
    """Re-analyzes a SQLite index when it has grown enough; nothing to do on PostgreSQL."""

    def __init__(self, engine: Engine, executor: Executor, interval: float = 300.0) -> None:
        self.engine = engine
        self.executor = executor
        self.interval = interval
        self.analyzed_at: int | None = None
        self._task: asyncio.Task[None] | None = None

    def refresh(self) -> bool:
        """Analyze if the index grew past the threshold since the last run (blocking)."""
        count = _instances(self.engine)
        if self.analyzed_at is not None:
            grown = count - self.analyzed_at
            if grown < max(MIN_GROWTH, self.analyzed_at):
                return False
        analyze(self.engine)
        self.analyzed_at = count
        return True

    def start(self) -> None:
        """Analyze now and then every `interval` seconds while the index grows."""
        if is_sqlite(self.engine.url.render_as_string()):
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                if await loop.run_in_executor(self.executor, self.refresh):
                    # Logged here, not in the thread: a stopped keeper says nothing more.
                    log_event(log, "index.analyzed", instances=self.analyzed_at)
            except Exception:
                # Statistics only speed queries up: a failure must not stop the server.
                log.exception("index statistics refresh failed")
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        """Stop refreshing."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
