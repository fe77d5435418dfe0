"""The index writer's usual batch at the DB-API level: new instances into known series.

SQLAlchemy's work per statement (cache keys, parameter processing, result objects, the
Session's transaction states) cost the writer more CPU than the database running the
statements: ~0.4 ms of a 0.55 ms one-instance commit on SQLite. A batch whose instances
are all new and whose series all exist runs here instead: the statements of
ingest.apply_records for that case (lock, lookup, insert, counts, unsynced listings),
written out once per dialect, on the writer's own connection. Any other batch, and any
database error, rolls back and returns None: the writer then takes the ORM path, which
handles new series, duplicates, retries and error reporting.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection

from minipacs.index.ingest import IngestOutcome, InstanceRecord, lock_key
from minipacs.index.models import Instance

log = logging.getLogger("minipacs.index")

# The instances columns a record fills, in the INSERT's order.
_COLUMNS = (
    "series_fk",
    "sop_uid",
    "sop_class_uid",
    "instance_number",
    "transfer_syntax",
    "number_of_frames",
    "rows",
    "columns",
    "rel_path",
    "size",
    "received_at",
    "calling_ae",
    "charset",
    "header",
)
# Lock order of the count updates, as in ingest._Pending: patients, studies, series.
_LEVELS = ("patients", "studies", "series")


def _values(record: InstanceRecord, series: int) -> tuple[Any, ...]:
    """A record's instances row, in _COLUMNS order."""
    return (
        series,
        record.sop_uid,
        record.sop_class_uid,
        record.instance_number,
        record.transfer_syntax,
        record.number_of_frames,
        record.rows,
        record.columns,
        record.rel_path,
        record.size,
        record.received_at,
        record.calling_ae,
        record.charset,
        record.header,
    )


class FastPath:
    """Commits batches of new instances into known series on one DB-API connection."""

    def __init__(self, connection: Connection, writer: str) -> None:
        """Use a SQLAlchemy connection's DB-API connection; `writer` names unsynced rows."""
        dialect = connection.dialect
        self._dbapi = connection.connection.dbapi_connection
        self._postgres = dialect.name == "postgresql"
        self._mark = "%s" if self._postgres else "?"
        self._writer = writer
        # Whether a batch has failed here before (see commit).
        self._failed = False
        # The column types' own conversions (a datetime as SQLite text, for one).
        table = Instance.__table__
        processors = [
            table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in _COLUMNS
        ]
        self._processors: list[tuple[int, Callable[[Any], Any]]] = [
            (i, p) for i, p in enumerate(processors) if p is not None
        ]
        marks = ", ".join([self._mark] * len(_COLUMNS))
        self._insert = f"INSERT INTO instances ({', '.join(_COLUMNS)}) VALUES ({marks})"
        self._insert_unsynced = (
            f"INSERT INTO unsynced_files (token, rel_path, sop_uid, writer)"
            f" VALUES ({self._mark}, {self._mark}, {self._mark}, {self._mark})"
        )
        self._updates = {
            level: f"UPDATE {level} SET num_instances = num_instances + {self._mark}"
            f" WHERE id = {self._mark}"
            for level in _LEVELS
        }

    def commit(
        self,
        records: Sequence[InstanceRecord],
        unsynced: Sequence[str | None],
        settled: Sequence[str],
    ) -> list[IngestOutcome] | None:
        """Commit new records (listing those with a token) and drop settled listings.

        Returns None, with nothing changed, when the batch is not for this path.
        """
        cursor, lookup = self._dbapi.cursor(), self._dbapi.cursor()
        try:
            if self._postgres:
                # Statements go out without waiting for each other's results: two round
                # trips (the lookups, then the writes with the commit) instead of nine.
                with self._dbapi.pipeline():
                    done = self._apply(cursor, lookup, records, unsynced, settled)
                    if done:
                        self._dbapi.commit()
            else:
                cursor.execute("BEGIN IMMEDIATE")
                done = self._apply(cursor, lookup, records, unsynced, settled)
                if done:
                    cursor.execute("COMMIT")
            if done:
                return [IngestOutcome(r.sop_uid, stored=True) for r in records]
            self._rollback(cursor)
        except Exception as exc:  # the ORM path runs it again and reports what fails
            # Once at WARNING: a fast path that always fails (a bug, a libpq without
            # pipelines) would otherwise slow every commit unseen.
            log.log(
                logging.DEBUG if self._failed else logging.WARNING, "fast path fell back: %r", exc
            )
            self._failed = True
            self._rollback(cursor)
        finally:
            cursor.close()
            lookup.close()
        return None

    def _apply(
        self,
        cursor: Any,
        lookup: Any,
        records: Sequence[InstanceRecord],
        unsynced: Sequence[str | None],
        settled: Sequence[str],
    ) -> bool:
        """The statements of the batch; False (to roll back) when it is not for this path."""
        sop_uids = [r.sop_uid for r in records]
        if len(set(sop_uids)) != len(sop_uids):
            return False
        if self._postgres:
            # ingest._lock_instances: the same keys, in the same order.
            cursor.execute(
                "SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) AS t(k) ORDER BY k",
                (sorted({lock_key(uid) for uid in sop_uids}),),
            )
        series_uids = list({r.series_uid for r in records})
        where, params = self._in("sop_uid", sop_uids)
        cursor.execute(f"SELECT 1 FROM instances WHERE {where} LIMIT 1", params)
        where, params = self._in("series.series_uid", series_uids)
        lookup.execute(
            "SELECT series.series_uid, series.id, series.study_fk, studies.patient_fk"
            f" FROM series JOIN studies ON studies.id = series.study_fk WHERE {where}",
            params,
        )
        if cursor.fetchone() is not None:
            return False
        chains = {uid: (series, study, patient) for uid, series, study, patient in lookup}
        if len(chains) != len(series_uids):
            return False
        rows = []
        counts: dict[str, Counter[int]] = {level: Counter() for level in _LEVELS}
        for record in records:
            series, study, patient = chains[record.series_uid]
            rows.append(self._row(record, series))
            counts["series"][series] += 1
            counts["studies"][study] += 1
            counts["patients"][patient] += 1
        cursor.executemany(self._insert, rows)
        for level in _LEVELS:
            cursor.executemany(
                self._updates[level], [(n, row_id) for row_id, n in sorted(counts[level].items())]
            )
        listed = [
            (token, r.rel_path, r.sop_uid, self._writer)
            for r, token in zip(records, unsynced, strict=True)
            if token is not None
        ]
        if listed:
            cursor.executemany(self._insert_unsynced, listed)
        if settled:
            where, params = self._in("token", settled)
            cursor.execute(f"DELETE FROM unsynced_files WHERE {where}", params)
        return True

    def _in(self, column: str, values: Sequence[str]) -> tuple[str, Sequence[Any]]:
        """SQL for `column` IN values, with its parameters."""
        # PostgreSQL: one array parameter, one statement text for any count (kept prepared).
        if self._postgres:
            return f"{column} = ANY(%s)", (list(values),)
        return f"{column} IN ({', '.join('?' * len(values))})", list(values)

    def _row(self, record: InstanceRecord, series: int) -> tuple[Any, ...]:
        values = _values(record, series)
        if not self._processors:
            return values
        converted = list(values)
        for i, process in self._processors:
            converted[i] = process(converted[i])
        return tuple(converted)

    def _rollback(self, cursor: Any) -> None:
        """End the transaction; a connection too broken for that is the ORM path's to find."""
        try:
            if self._postgres:
                self._dbapi.rollback()
            elif self._dbapi.in_transaction:
                cursor.execute("ROLLBACK")
        except Exception as exc:
            log.debug("fast path rollback failed: %s", exc)
