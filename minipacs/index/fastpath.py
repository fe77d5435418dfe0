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
(see _commit_postgres). A batch with an instance already indexed, and any database error
(but the one-query path's own refusals, which fall back to the lookup), rolls back and
returns None: the writer then takes the ORM path, which handles duplicates, retries and
error reporting.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg import errors as pg_errors
from psycopg.adapt import Transformer
from psycopg.pq import TransactionStatus
from sqlalchemy import Connection

from minipacs.index.ingest import (
    IngestOutcome,
    InstanceRecord,
    lock_key,
    modalities_in_study,
    new_patient_values,
    new_series_values,
    new_study_values,
)
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
# ModalitiesInStudy (0008,0061) of a study recomputed from its series, as
# ingest.modalities_in_study does (distinct, non-empty, in code point order, backslash
# joined, 160 characters at most). In a statement of its own after the study's counts
# UPDATE: it then runs holding the study's row lock, with a snapshot taken after it, so
# a node adding a series to the same study at once is seen by whichever writes last.
_MODALITIES = (
    b"UPDATE studies SET modalities = coalesce((SELECT left(string_agg(m, chr(92) ORDER BY m),"
    b' 160) FROM (SELECT DISTINCT modality COLLATE "C" AS m FROM series WHERE study_fk = %d'
    b" AND modality <> '') AS d), '') WHERE id = %d"
)
# Series chains a connection keeps at most before starting afresh (FastPath._chains).
_CHAINS_KEPT = 10_000
# The (series, study, patient) chains of series, by Series Instance UID (a WHERE follows).
_CHAINS = (
    "SELECT series.series_uid, series.id, series.study_fk, studies.patient_fk"
    " FROM series JOIN studies ON studies.id = series.study_fk"
)


@dataclass(frozen=True)
class _Batch:
    """What the writer hands over: records, their unsynced tokens, tokens to drop."""

    records: Sequence[InstanceRecord]
    unsynced: Sequence[str | None]
    settled: Sequence[str]


@dataclass
class _Plan:
    """A batch's rows, once its lookups allow this path."""

    # Instances rows in _COLUMNS order, values as the record holds them.
    rows: list[tuple[Any, ...]]
    # Per level, (row id, instances added) in id order: the lock order.
    counts: dict[str, list[tuple[int, int]]]
    # (token, rel_path, sop_uid) of the records listed as unsynced.
    listed: list[tuple[str, str, str]]
    # Per level, row id -> columns to change besides num_instances, for the rows above new
    # series (PostgreSQL): num_studies / num_series deltas; "modalities" (True) recomputes
    # the study's ModalitiesInStudy.
    grown: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)


def _plan(
    records: Sequence[InstanceRecord],
    unsynced: Sequence[str | None],
    chain_rows: Sequence[tuple[Any, ...]],
    grown: dict[str, dict[int, dict[str, Any]]] | None = None,
) -> _Plan:
    """The rows of a batch of new instances, given the chains of all its series."""
    chains = {uid: (series, study, patient) for uid, series, study, patient in chain_rows}
    rows = []
    counts: dict[str, Counter[int]] = {level: Counter() for level in _LEVELS}
    for record in records:
        series, study, patient = chains[record.series_uid]
        rows.append(_values(record, series))
        counts["series"][series] += 1
        counts["studies"][study] += 1
        counts["patients"][patient] += 1
    listed = [
        (token, r.rel_path, r.sop_uid)
        for r, token in zip(records, unsynced, strict=True)
        if token is not None
    ]
    ordered = {level: sorted(counts[level].items()) for level in _LEVELS}
    return _Plan(rows, ordered, listed, grown or {})


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
    cursor.execute(f"{_CHAINS} WHERE series.series_uid IN ({_marks(series_uids)})", series_uids)
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


def _next_result(cursor: Any) -> None:
    """Move a cursor to the next result of a multi-statement query, which must exist."""
    if not cursor.nextset():
        raise RuntimeError("fewer results than statements")


def _marks(values: Sequence[object]) -> str:
    """One SQLite parameter mark per value."""
    return ", ".join("?" * len(values))


class FastPath:
    """Commits batches of new instances on one DB-API connection."""

    def __init__(self, connection: Connection, writer: str) -> None:
        """Use a SQLAlchemy connection's DB-API connection; `writer` names unsynced rows."""
        dialect = connection.dialect
        self._dbapi = connection.connection.dbapi_connection
        self._postgres = dialect.name == "postgresql"
        self._writer = writer
        # Whether a batch has failed here before (see commit).
        self._failed = False
        # Chains (series, study, patient) of series this connection has looked up, by
        # Series Instance UID. A series keeps its study and a study its patient, but ids
        # can go (a pruned series) or mean other rows (tables made anew under a running
        # node): _commit_known_postgres checks them in the query that uses them.
        self._chains: dict[str, tuple[int, int, int]] = {}
        if self._postgres:
            # psycopg's own dumpers quote every value, for the connection's encoding.
            self._literal: Callable[[Any], bytes] = Transformer(self._dbapi).as_literal
        # The column types' own conversions (a datetime as SQLite text, for one).
        table = Instance.__table__
        processors = [
            table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in _COLUMNS
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
        run = self._commit_postgres if self._postgres else self._commit_sqlite
        cursor = self._dbapi.cursor()
        try:
            done = run(cursor, _Batch(records, unsynced, settled))
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

    def _commit_sqlite(self, cursor: Any, batch: _Batch) -> bool:
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
            plan = _plan(records, unsynced, _chains_sqlite(cursor, records))
            columns = ", ".join(_COLUMNS)
            cursor.executemany(
                f"INSERT INTO instances ({columns}) VALUES ({_marks(_COLUMNS)})",
                [self._converted(row) for row in plan.rows],
            )
            for level in _LEVELS:
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

    def _commit_postgres(self, cursor: Any, batch: _Batch) -> bool:
        """The batch in one simple query to PostgreSQL, two when its series must be looked
        up, and a few more per new series; False, rolled back, if it is not for here.

        Each statement with parameters, even pipelined, cost psycopg a wait on its socket,
        and each wait handed the GIL to other threads: under load one commit took ~5 ms.
        Values go in as literals quoted by psycopg's own dumpers; the statements of one
        simple query run in order, in one round trip.
        """
        dbapi = self._dbapi
        if (dbapi.isolation_level, dbapi.read_only, dbapi.deferrable) != (None, None, None):
            # A plain BEGIN would not honour them; psycopg's own BEGIN (the ORM path) does.
            return False
        records, unsynced, settled = batch.records, batch.unsynced, batch.settled
        literal = self._literal
        sop_uids = [r.sop_uid for r in records]
        series_uids = list({r.series_uid for r in records})
        # In autocommit psycopg sends no BEGIN of its own: ours goes with the first query.
        self._dbapi.autocommit = True
        try:
            if self._commit_known_postgres(cursor, batch):
                return True
            cursor.execute(
                self._lock_statement(sop_uids)
                + b"; SELECT 1 FROM instances WHERE sop_uid = ANY("
                + literal(sop_uids)
                + b"::text[]) LIMIT 1; "
                + _CHAINS.encode()
                + b" WHERE series.series_uid = ANY("
                + literal(series_uids)
                + b"::text[])"
            )
            _next_result(cursor)  # past BEGIN
            _next_result(cursor)  # past the lock
            taken = cursor.fetchone() is not None
            _next_result(cursor)
            chains = {row[0]: tuple(row) for row in cursor.fetchall()}
            if taken:
                cursor.execute(b"ROLLBACK")
                return False
            grown = self._create_chains_postgres(cursor, records, chains)
            plan = _plan(records, unsynced, list(chains.values()), grown)
            cursor.execute(b"; ".join([*self._postgres_writes(plan, settled), b"COMMIT"]))
            self._remember(list(chains.values()))
            return True
        finally:
            self._end_postgres(cursor)

    def _lock_statement(self, sop_uids: Sequence[str]) -> bytes:
        """BEGIN, then the advisory locks of the batch's instances in a statement of its own.

        First, as in ingest._lock_instances: the statements after it then see what a writer
        of the same instances committed before.
        """
        keys = sorted({lock_key(uid) for uid in sop_uids})
        return (
            b"BEGIN; SELECT pg_advisory_xact_lock(k) FROM unnest("
            + self._literal(keys)
            + b"::bigint[]) AS t(k) ORDER BY k"
        )

    def _remember(self, chain_rows: Sequence[tuple[Any, ...]]) -> None:
        """Keep the chains a lookup found, for later batches into the same series."""
        if len(self._chains) > _CHAINS_KEPT:
            self._chains.clear()
        for uid, series, study, patient in chain_rows:
            self._chains[uid] = (series, study, patient)

    def _commit_known_postgres(self, cursor: Any, batch: _Batch) -> bool:
        """The batch in one simple query if this connection knows all its series; else False.

        With the chains known, the lookup's round trip is not needed: the instances go in
        with ON CONFLICT DO NOTHING, and a guard divides by zero unless every row went in
        and every chain is still what the index holds, which aborts the transaction. A
        series deleted meanwhile fails the foreign key instead. Either way nothing is
        written, the batch's chains are forgotten, and the two-query path looks it up.
        """
        try:
            chains = [(uid, *self._chains[uid]) for uid in {r.series_uid for r in batch.records}]
        except KeyError:
            return False
        plan = _plan(batch.records, batch.unsynced, chains)
        writes = self._postgres_writes(plan, batch.settled, checked=chains)
        sop_uids = [r.sop_uid for r in batch.records]
        try:
            cursor.execute(b"; ".join([self._lock_statement(sop_uids), *writes, b"COMMIT"]))
        except (pg_errors.DivisionByZero, pg_errors.ForeignKeyViolation):
            cursor.execute(b"ROLLBACK")
            for uid, *_ in chains:
                self._chains.pop(uid, None)
            return False
        return True

    def _postgres_writes(
        self, plan: _Plan, settled: Sequence[str], checked: Sequence[tuple[Any, ...]] = ()
    ) -> list[bytes]:
        """The statements that write a planned batch, values quoted in.

        With `checked` chains (series UID, series, study, patient), the instances insert
        raises division_by_zero unless every row went in and every chain is in the index.
        """
        literal = self._literal

        def tuples(rows: Sequence[tuple[Any, ...]]) -> bytes:
            return b", ".join(b"(" + b", ".join(map(literal, row)) + b")" for row in rows)

        insert = (
            b"INSERT INTO instances ("
            + ", ".join(_COLUMNS).encode()
            + b") VALUES "
            + tuples(plan.rows)
        )
        if checked:
            chains = tuples(
                [(series, uid, study, patient) for uid, series, study, patient in checked]
            )
            found = (
                b"(SELECT count(*) FROM series JOIN studies ON studies.id = series.study_fk"
                b" WHERE (series.id, series.series_uid, series.study_fk, studies.patient_fk)"
                b" IN (VALUES " + chains + b"))"
            )
            insert = (
                b"WITH ins AS (" + insert + b" ON CONFLICT (sop_uid) DO NOTHING RETURNING 1)"
                b" SELECT 1 / (count(*) / " + str(len(plan.rows)).encode() + b")"
                b" / (" + found + b" / " + str(len(checked)).encode() + b") FROM ins"
            )
        statements = [insert]
        for level in _LEVELS:
            added = dict(plan.counts[level])
            grown = plan.grown.get(level, {})
            for row_id in sorted(added.keys() | grown.keys()):
                sets = (
                    [b"num_instances = num_instances + %d" % added[row_id]]
                    if row_id in added
                    else []
                )
                changes = grown.get(row_id, {})
                sets.extend(
                    b"%s = %s + %d" % (column.encode(), column.encode(), delta)
                    for column, delta in sorted(changes.items())
                    if column != "modalities"
                )
                statements.append(
                    b"UPDATE %s SET %s WHERE id = %d" % (level.encode(), b", ".join(sets), row_id)
                )
                if changes.get("modalities"):
                    statements.append(_MODALITIES % (row_id, row_id))
        if plan.listed:
            statements.append(
                b"INSERT INTO unsynced_files (token, rel_path, sop_uid, writer) VALUES "
                + tuples([(*listed, self._writer) for listed in plan.listed])
            )
        if settled:
            statements.append(
                b"DELETE FROM unsynced_files WHERE token = ANY("
                + literal(list(settled))
                + b"::text[])"
            )
        return statements

    def _create_chains_postgres(
        self, cursor: Any, records: Sequence[InstanceRecord], chains: dict[str, tuple[Any, ...]]
    ) -> dict[str, dict[int, dict[str, Any]]]:
        """Create the series `chains` lacks (with study and patient), as ingest._chain does.

        Other nodes may create the same rows meanwhile: each insert is ON CONFLICT DO
        NOTHING, and a row it did not create is read back in a statement of its own, whose
        snapshot holds the other node's commit. Returns the rows' other changes, written
        with the counts in lock order (_Plan.grown); `chains` gains the new series.
        """
        grown: dict[str, dict[int, dict[str, Any]]] = {level: {} for level in _LEVELS}

        def add(level: str, row_id: int, column: str) -> None:
            columns = grown[level].setdefault(row_id, {})
            columns[column] = columns.get(column, 0) + 1

        for record in records:
            if record.series_uid in chains:
                continue
            study_query = b"SELECT id, patient_fk FROM studies WHERE study_uid = " + self._literal(
                record.study_uid
            )
            found = self._one(cursor, study_query)
            if found is not None:
                study, patient = found
            else:
                patient = self._patient_postgres(cursor, record)
                study_id = self._insert_postgres(
                    cursor, "studies", new_study_values(record, patient), "study_uid"
                )
                if study_id is not None:
                    study = study_id
                    add("patients", patient, "num_studies")
                else:
                    # Another node's study: it keeps the patient it was first stored under.
                    study, patient = self._one(cursor, study_query)
            series = self._insert_postgres(
                cursor, "series", new_series_values(record, study), "series_uid"
            )
            if series is None:
                # Another node's series: it keeps the study it was first stored under.
                row = self._one(
                    cursor,
                    _CHAINS.encode()
                    + b" WHERE series.series_uid = "
                    + self._literal(record.series_uid),
                )
                chains[record.series_uid] = tuple(row)
                continue
            add("studies", study, "num_series")
            add("patients", patient, "num_series")
            grown["studies"][study]["modalities"] = True
            chains[record.series_uid] = (record.series_uid, series, study, patient)
        return grown

    def _patient_postgres(self, cursor: Any, record: InstanceRecord) -> int:
        """The patient of a new study, found or created (ingest._patient)."""
        where = (
            b"SELECT id FROM patients WHERE patient_id = "
            + self._literal(record.patient_id)
            + b" AND issuer = "
            + self._literal(record.issuer)
        )
        found = self._one(cursor, where)
        if found is not None:
            return int(found[0])
        created = self._insert_postgres(
            cursor, "patients", new_patient_values(record), "patient_id, issuer"
        )
        if created is not None:
            return created
        return int(self._one(cursor, where)[0])

    def _insert_postgres(
        self, cursor: Any, table: str, values: dict[str, Any], key: str
    ) -> int | None:
        """INSERT a row unless its unique `key` is taken; its new id, or None."""
        cursor.execute(
            b"INSERT INTO %s (%s) VALUES (%s) ON CONFLICT (%s) DO NOTHING RETURNING id"
            % (
                table.encode(),
                ", ".join(values).encode(),
                b", ".join(map(self._literal, values.values())),
                key.encode(),
            )
        )
        row = cursor.fetchone()
        return None if row is None else int(row[0])

    @staticmethod
    def _one(cursor: Any, query: bytes) -> Any:
        """The first row of a query, or None."""
        cursor.execute(query)
        return cursor.fetchone()

    def _end_postgres(self, cursor: Any) -> None:
        """Leave the connection as the ORM path expects it: idle, not in autocommit."""
        try:
            if self._dbapi.info.transaction_status != TransactionStatus.IDLE:
                cursor.execute(b"ROLLBACK")
            self._dbapi.autocommit = False
        except Exception:
            # Left in autocommit, the ORM's transactions would not be atomic: close it, and
            # the writer connects afresh.
            self._dbapi.close()
            raise

    def _converted(self, values: tuple[Any, ...]) -> tuple[Any, ...]:
        """An instances row with the column types' conversions applied (SQLite)."""
        if not self._processors:
            return values
        converted = list(values)
        for i, process in self._processors:
            converted[i] = process(converted[i])
        return tuple(converted)
