"""The index writer's usual batch at the DB-API level: new instances.

SQLAlchemy's work per statement (cache keys, parameter processing, result objects, the
Session's transaction states) cost the writer more CPU than the database running the
statements: ~0.4 ms of a 0.55 ms one-instance commit on SQLite, and ~1.9 ms (SQLite) to
~4 ms (PostgreSQL) for a first instance of a new series. A batch whose instances are all
new runs here instead: the statements of ingest.apply_records for that case (lock,
lookup, the patients, studies and series the batch is the first of, insert, counts,
unsynced listings), on the writer's own connection. On SQLite the one writer holds the
database for the transaction. On PostgreSQL, where other nodes write too, values are
quoted in by psycopg and statements go as few simple queries as the case allows: one for
series the connection knows, two when they must be looked up, a few more per new series
(see index.fastpath_postgres). A batch with an instance already indexed, and any database error
(but the one-query path's own refusals, which fall back to the lookup), rolls back and
returns None: the writer then takes the ORM path, which handles duplicates, retries and
error reporting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from psycopg import errors as pg_errors
from sqlalchemy import Connection

from minipacs.index.fastpath_postgres import PostgresCommit
from minipacs.index.fastplan import CHAINS, COLUMNS, LEVELS, Batch, plan_batch
from minipacs.index.ingest import (
    IngestOutcome,
    InstanceRecord,
    modalities_in_study,
    new_patient_values,
    new_series_values,
    new_study_values,
)
from minipacs.index.models import Instance

log = logging.getLogger("minipacs.index")


def _insert_sqlite(cursor: Any, table: str, values: dict[str, Any]) -> int:
    """INSERT one row into a SQLite table; its new id."""
    columns = ", ".join(values)
    cursor.execute(
        f"INSERT INTO {table} ({columns}) VALUES ({_marks(values)})", list(values.values())
    )
    return int(cursor.lastrowid)


def _chains_sqlite(cursor: Any, records: Sequence[InstanceRecord]) -> list[tuple[Any, ...]]:
    """The (series UID, series, study, patient) of every record's series, made if new.

    As ingest._chain does: the first record of a new series creates it (and its study,
    and that study's patient, unless they exist), with that record's values; a series
    keeps its study, a study its patient.
    """
    series_uids = list({r.series_uid for r in records})
    cursor.execute(f"{CHAINS} WHERE series.series_uid IN ({_marks(series_uids)})", series_uids)
    chains: dict[str, tuple[Any, ...]] = {row[0]: tuple(row) for row in cursor.fetchall()}
    grown: set[int] = set()
    for record in records:
        if record.series_uid in chains:
            continue
        cursor.execute(
            "SELECT id, patient_fk FROM studies WHERE study_uid = ?", (record.study_uid,)
        )
        found = cursor.fetchone()
        if found is not None:
            study, patient = found
        else:
            cursor.execute(
                "SELECT id FROM patients WHERE patient_id = ? AND issuer = ?",
                (record.patient_id, record.issuer),
            )
            row = cursor.fetchone()
            if row is not None:
                patient = row[0]
            else:
                patient = _insert_sqlite(cursor, "patients", new_patient_values(record))
            study = _insert_sqlite(cursor, "studies", new_study_values(record, patient))
            cursor.execute(
                "UPDATE patients SET num_studies = num_studies + 1 WHERE id = ?", (patient,)
            )
        series = _insert_sqlite(cursor, "series", new_series_values(record, study))
        cursor.execute("UPDATE studies SET num_series = num_series + 1 WHERE id = ?", (study,))
        cursor.execute("UPDATE patients SET num_series = num_series + 1 WHERE id = ?", (patient,))
        chains[record.series_uid] = (record.series_uid, series, study, patient)
        grown.add(study)
    for study in sorted(grown):
        cursor.execute("SELECT modality FROM series WHERE study_fk = ?", (study,))
        value = modalities_in_study(row[0] for row in cursor.fetchall())
        cursor.execute("UPDATE studies SET modalities = ? WHERE id = ?", (value, study))
    return list(chains.values())


def _marks(values: Sequence[object]) -> str:
    """One SQLite parameter mark per value."""
    return ", ".join("?" * len(values))


class FastPath:
    """Commits batches of new instances on one DB-API connection."""

    def __init__(self, connection: Connection, writer: str) -> None:
        """Use a SQLAlchemy connection's DB-API connection; `writer` names unsynced rows."""
        dialect = connection.dialect
        self._dbapi = connection.connection.dbapi_connection
        self._writer = writer
        # Whether a batch has failed here before (see commit).
        self._failed = False
        postgres = dialect.name == "postgresql"
        self.postgres = PostgresCommit(self._dbapi, writer) if postgres else None
        # The column types' own conversions (a datetime as SQLite text, for one).
        table = Instance.__table__
        processors = [
            table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in COLUMNS
        ]
        self._processors: list[tuple[int, Callable[[Any], Any]]] = [
            (i, p) for i, p in enumerate(processors) if p is not None
        ]

    def commit(
        self,
        records: Sequence[InstanceRecord],
        unsynced: Sequence[str | None],
        settled: Sequence[str],
    ) -> list[IngestOutcome] | None:
        """Commit new records (listing those with a token) and drop settled listings.

        Returns None, with nothing changed, when the batch is not for this path.
        """
        sop_uids = [r.sop_uid for r in records]
        if len(set(sop_uids)) != len(sop_uids):
            return None
        run = self._commit_sqlite if self.postgres is None else self.postgres.commit
        cursor = self._dbapi.cursor()
        try:
            done = run(cursor, Batch(records, unsynced, settled))
        except pg_errors.OperationalError as exc:
            # A deadlock with another node creating the same rows, a serialization
            # failure, a lost connection: passing trouble, which the ORM path retries.
            log.info("fast path fell back: %r", exc)
            done = False
        except Exception as exc:  # the ORM path runs it again and reports what fails
            # Once at WARNING: a fast path that always fails (a bug, say) would otherwise
            # slow every commit unseen.
            level = logging.DEBUG if self._failed else logging.WARNING
            log.log(level, "fast path fell back: %r", exc)
            self._failed = True
            done = False
        finally:
            cursor.close()
        return [IngestOutcome(r.sop_uid, stored=True) for r in records] if done else None

    def _commit_sqlite(self, cursor: Any, batch: Batch) -> bool:
        """The batch in one SQLite transaction; False, rolled back, if it is not for here."""
        records, unsynced, settled = batch.records, batch.unsynced, batch.settled
        cursor.execute("BEGIN IMMEDIATE")
        try:
            sop_uids = [r.sop_uid for r in records]
            cursor.execute(
                f"SELECT 1 FROM instances WHERE sop_uid IN ({_marks(sop_uids)}) LIMIT 1", sop_uids
            )
            taken = cursor.fetchone() is not None
            if taken:
                cursor.execute("ROLLBACK")
                return False
            plan = plan_batch(records, unsynced, _chains_sqlite(cursor, records))
            columns = ", ".join(COLUMNS)
            cursor.executemany(
                f"INSERT INTO instances ({columns}) VALUES ({_marks(COLUMNS)})",
                [self._converted(row) for row in plan.rows],
            )
            for level in LEVELS:
                cursor.executemany(
                    f"UPDATE {level} SET num_instances = num_instances + ? WHERE id = ?",
                    [(n, row_id) for row_id, n in plan.counts[level]],
                )
            if plan.listed:
                cursor.executemany(
                    "INSERT INTO unsynced_files (token, rel_path, sop_uid, writer)"
                    " VALUES (?, ?, ?, ?)",
                    [(*listed, self._writer) for listed in plan.listed],
                )
            if settled:
                cursor.execute(
                    f"DELETE FROM unsynced_files WHERE token IN ({_marks(settled)})", list(settled)
                )
            cursor.execute("COMMIT")
            return True
        except BaseException:
            if self._dbapi.in_transaction:
                cursor.execute("ROLLBACK")
            raise

    def _converted(self, values: tuple[Any, ...]) -> tuple[Any, ...]:
        """An instances row with the column types' conversions applied (SQLite)."""
        if not self._processors:
            return values
        converted = list(values)
        for i, process in self._processors:
            converted[i] = process(converted[i])
        return tuple(converted)
