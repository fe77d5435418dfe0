"""The index writer's fast path on PostgreSQL: a batch of new instances in simple queries.

Each statement with parameters, even pipelined, cost psycopg a wait on its socket, and
each wait handed the GIL to other threads: under load one commit took ~5 ms. So values
go in as literals quoted by psycopg's own dumpers, and the statements of one simple
query run in order, in one round trip: one query for series the connection knows, two
when they must be looked up, a few more per new series. Other nodes may write the same
rows at once: advisory locks on the SOP Instance UIDs come first, new patients, studies
and series go in ON CONFLICT DO NOTHING, and rows are updated in one lock order.

The statements every batch runs are prepared once per connection (PREPARE, then EXECUTE
with literal arguments in the same simple queries), a batch's rows as one array per
column: PostgreSQL then parses and plans each once, not once per commit. Planning alone
was ~0.2 ms of the ~0.5 ms PostgreSQL spent per one-instance commit (pg_stat_statements).
A session that lost them (DISCARD ALL; psycopg's DEALLOCATE ALL at a rollback, once it
has prepared statements of its own) has them prepared again and the batch retried.
Behind a transaction-mode pooler, where PREPARE and EXECUTE may reach different server
sessions, every batch falls back to the ORM path: connect minipacs to PostgreSQL or to
a session-mode pool.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from psycopg import errors as pg_errors
from psycopg.adapt import Transformer
from psycopg.pq import TransactionStatus
from sqlalchemy import String
from sqlalchemy.dialects import postgresql

from minipacs.index.fastplan import CHAINS, COLUMNS, LEVELS, Batch, Plan, plan_batch
from minipacs.index.ingest import (
    InstanceRecord,
    lock_key,
    new_patient_values,
    new_series_values,
    new_study_values,
    recompute_modalities_sql,
)
from minipacs.index.models import Instance

# Series chains a connection keeps at most before starting afresh (PostgresCommit._chains).
_CHAINS_KEPT = 10_000
# The count columns of each level, in the order the prepared UPDATEs take them.
_COUNTS = {
    "patients": ("num_instances", "num_series", "num_studies"),
    "studies": ("num_instances", "num_series"),
    "series": ("num_instances",),
}


def _column_types() -> list[bytes]:
    """The PostgreSQL array type of each instances column, in COLUMNS order."""
    table = Instance.__table__
    dialect = postgresql.dialect()
    # Strings unbounded: a cast to varchar(n)[] would cut a longer value short, where
    # the column refuses it (value too long), as on the ORM path.
    types = [table.c[name].type for name in COLUMNS]
    unbounded = [String() if isinstance(t, String) else t for t in types]
    return [f"{t.compile(dialect=dialect)}[]".encode() for t in unbounded]


_COLUMN_TYPES = _column_types()


def _statements() -> dict[str, str]:
    """The statements every batch runs, by what they do: "(types) AS query"."""
    types = [t.decode() for t in _COLUMN_TYPES]
    n = len(COLUMNS)
    arrays = ", ".join(f"${i}" for i in range(1, n + 1))
    chains = ", ".join(f"${i}" for i in range(n + 1, n + 5))
    statements = {
        "lock": "(bigint[]) AS SELECT pg_advisory_xact_lock(k) FROM unnest($1) AS t(k) ORDER BY k",
        # Every row goes in and every (series, series UID, study, patient) chain is the
        # index's, or a division by zero aborts the transaction (_commit_known).
        "instances": f"({', '.join(types)}, bigint[], text[], bigint[], bigint[]) AS"
        f" WITH ins AS (INSERT INTO instances ({', '.join(COLUMNS)}) SELECT * FROM"
        f" unnest({arrays}) ON CONFLICT (sop_uid) DO NOTHING RETURNING 1)"
        " SELECT 1 / (count(*) / cardinality($1)) / ((SELECT count(*) FROM series"
        " JOIN studies ON studies.id = series.study_fk WHERE (series.id, series.series_uid,"
        f" series.study_fk, studies.patient_fk) IN (SELECT * FROM unnest({chains})))"
        f" / cardinality(${n + 1})) FROM ins",
        "list": "(text[], text[], text[], text) AS INSERT INTO unsynced_files"
        " (token, rel_path, sop_uid, writer) SELECT token, rel_path, sop_uid, $4"
        " FROM unnest($1, $2, $3) AS u(token, rel_path, sop_uid)",
        "settle": "(text[]) AS DELETE FROM unsynced_files WHERE token = ANY($1)",
    }
    for level, columns in _COUNTS.items():
        sets = ", ".join(f"{c} = {c} + ${i}" for i, c in enumerate(columns, start=2))
        arguments = ", ".join(["bigint", *["integer"] * len(columns)])
        statements[f"count_{level}"] = f"({arguments}) AS UPDATE {level} SET {sets} WHERE id = $1"
    return statements


# Named after their text too: a session holding another version's statement of the same
# kind (a pooled session that outlived an upgrade) prepares this one beside it.
_STATEMENTS = _statements()
_NAMES = {
    kind: f"minipacs_{kind}_{hashlib.sha1(text.encode()).hexdigest()[:10]}"
    for kind, text in _STATEMENTS.items()
}
_PREPARED = {_NAMES[kind]: text for kind, text in _STATEMENTS.items()}


def _next_result(cursor: Any) -> None:
    """Move a cursor to the next result of a multi-statement query, which must exist."""
    if not cursor.nextset():
        raise RuntimeError("fewer results than statements")


class PostgresCommit:
    """Commits batches of new instances on one psycopg connection (FastPath's, for PostgreSQL)."""

    def __init__(self, dbapi: Any, writer: str) -> None:
        """Use a psycopg connection; `writer` names unsynced rows."""
        self._dbapi = dbapi
        self._writer = writer
        # psycopg's own dumpers quote every value, for the connection's encoding.
        self._literal: Callable[[Any], bytes] = Transformer(dbapi).as_literal
        # Chains (series, study, patient) of series this connection has looked up, by
        # Series Instance UID. A series keeps its study and a study its patient, but ids
        # can go (a pruned series) or mean other rows (tables made anew under a running
        # node): _commit_known checks them in the query that uses them.
        self._chains: dict[str, tuple[int, int, int]] = {}
        # Whether this connection's session holds the _PREPARED statements.
        self._prepared = False

    def commit(self, cursor: Any, batch: Batch) -> bool:
        """The batch in as few simple queries as it allows; False, rolled back, if not for here."""
        dbapi = self._dbapi
        if (dbapi.isolation_level, dbapi.read_only, dbapi.deferrable) != (None, None, None):
            # A plain BEGIN would not honour them; psycopg's own BEGIN (the ORM path) does.
            return False
        try:
            return self._commit_batch(cursor, batch)
        except pg_errors.InvalidSqlStatementName:
            # The session lost them (DISCARD ALL, a pooler): nothing was written.
            self._prepared = False
        return self._commit_batch(cursor, batch)

    def _commit_batch(self, cursor: Any, batch: Batch) -> bool:
        """commit() once its connection may take a plain BEGIN."""
        records, unsynced, settled = batch.records, batch.unsynced, batch.settled
        literal = self._literal
        sop_uids = [r.sop_uid for r in records]
        series_uids = list({r.series_uid for r in records})
        # In autocommit psycopg sends no BEGIN of its own: ours goes with the first query.
        self._dbapi.autocommit = True
        try:
            if not self._prepared:
                self._prepare(cursor)
            if self._commit_known(cursor, batch):
                return True
            cursor.execute(
                self._lock_statement(sop_uids)
                + b"; SELECT 1 FROM instances WHERE sop_uid = ANY("
                + literal(sop_uids)
                + b"::text[]) LIMIT 1; "
                + CHAINS.encode()
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
            grown = self._create_chains(cursor, records, chains)
            wanted = [chains[uid] for uid in series_uids]
            plan = plan_batch(records, unsynced, wanted, grown)
            cursor.execute(b"; ".join([*self._writes(plan, settled, wanted), b"COMMIT"]))
            self._remember(wanted)
            return True
        finally:
            self._end(cursor)

    def _prepare(self, cursor: Any) -> None:
        """PREPARE the _PREPARED statements this connection's session lacks."""
        cursor.execute(
            b"SELECT name FROM pg_prepared_statements WHERE name = ANY("
            + self._literal(list(_PREPARED))
            + b"::text[])"
        )
        held = {row[0] for row in cursor.fetchall()}
        missing = [f"PREPARE {name} {text}" for name, text in _PREPARED.items() if name not in held]
        if missing:
            cursor.execute("; ".join(missing).encode())
        self._prepared = True

    @staticmethod
    def _execute(kind: str, *arguments: bytes) -> bytes:
        """EXECUTE of a prepared statement (by _NAMES kind) with arguments already quoted."""
        return b"EXECUTE %s(%s)" % (_NAMES[kind].encode(), b", ".join(arguments))

    def _array(self, values: Sequence[Any], array_type: bytes) -> bytes:
        """An ARRAY constructor of quoted values, cast to `array_type`.

        psycopg quotes a list as one array literal, escaped twice (array, then string):
        ~10 times the cost of quoting its values, 35 us for a 3 KB header alone.
        """
        return b"ARRAY[%s]::%s" % (b", ".join(map(self._literal, values)), array_type)

    def _lock_statement(self, sop_uids: Sequence[str]) -> bytes:
        """BEGIN, then the advisory locks of the batch's instances in a statement of its own.

        First, as in ingest._lock_instances: the statements after it then see what a writer
        of the same instances committed before.
        """
        keys = sorted({lock_key(uid) for uid in sop_uids})
        return b"BEGIN; " + self._execute("lock", self._array(keys, b"bigint[]"))

    def _remember(self, chain_rows: Sequence[tuple[Any, ...]]) -> None:
        """Keep the chains a lookup found, for later batches into the same series."""
        if len(self._chains) > _CHAINS_KEPT:
            self._chains.clear()
        for uid, series, study, patient in chain_rows:
            self._chains[uid] = (series, study, patient)

    def _commit_known(self, cursor: Any, batch: Batch) -> bool:
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
        plan = plan_batch(batch.records, batch.unsynced, chains)
        writes = self._writes(plan, batch.settled, chains)
        sop_uids = [r.sop_uid for r in batch.records]
        try:
            cursor.execute(b"; ".join([self._lock_statement(sop_uids), *writes, b"COMMIT"]))
        except (pg_errors.DivisionByZero, pg_errors.ForeignKeyViolation):
            cursor.execute(b"ROLLBACK")
            for uid, *_ in chains:
                self._chains.pop(uid, None)
            return False
        return True

    def _writes(
        self, plan: Plan, settled: Sequence[str], chains: Sequence[tuple[Any, ...]]
    ) -> list[bytes]:
        """The statements that write a planned batch into its series' chains.

        `chains` are (series UID, series, study, patient): the insert raises
        division_by_zero unless every row went in and every chain is in the index.
        """
        array, execute, literal = self._array, self._execute, self._literal
        columns = map(array, zip(*plan.rows, strict=True), _COLUMN_TYPES)
        uids, series, studies, patients = zip(*chains, strict=True)
        ids = [array(series, b"bigint[]"), array(uids, b"text[]")]
        ids += [array(studies, b"bigint[]"), array(patients, b"bigint[]")]
        statements = [execute("instances", *columns, *ids)]
        for level in LEVELS:
            added = dict(plan.counts[level])
            grown = plan.grown.get(level, {})
            for row_id in sorted(added.keys() | grown.keys()):
                changes = grown.get(row_id, {})
                deltas = [added.get(row_id, 0), *(changes.get(c, 0) for c in _COUNTS[level][1:])]
                statements.append(execute(f"count_{level}", *map(literal, [row_id, *deltas])))
                if level == "studies" and changes.get("num_series"):
                    # A study with a new series: after its UPDATE, holding its row lock
                    # (ingest._Pending.flush).
                    statements.append(recompute_modalities_sql(row_id).encode())
        if plan.listed:
            listed = [array(values, b"text[]") for values in zip(*plan.listed, strict=True)]
            statements.append(execute("list", *listed, literal(self._writer)))
        if settled:
            statements.append(execute("settle", array(settled, b"text[]")))
        return statements

    def _create_chains(
        self, cursor: Any, records: Sequence[InstanceRecord], chains: dict[str, tuple[Any, ...]]
    ) -> dict[str, dict[int, dict[str, int]]]:
        """Create the series `chains` lacks (with study and patient), as ingest._chain does.

        Other nodes may create the same rows meanwhile: each insert is ON CONFLICT DO
        NOTHING, and a row it did not create is read back in a statement of its own, whose
        snapshot holds the other node's commit. Returns the count changes of the rows
        above new series, written with the instance counts in lock order (Plan.grown);
        `chains` gains the new series.
        """
        grown: dict[str, dict[int, dict[str, int]]] = {level: {} for level in LEVELS}

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
                patient = self._patient(cursor, record)
                study_id = self._insert(
                    cursor, "studies", new_study_values(record, patient), "study_uid"
                )
                if study_id is not None:
                    study = study_id
                    add("patients", patient, "num_studies")
                else:
                    # Another node's study: it keeps the patient it was first stored under.
                    study, patient = self._one(cursor, study_query)
            series = self._insert(cursor, "series", new_series_values(record, study), "series_uid")
            if series is None:
                # Another node's series: it keeps the study it was first stored under.
                row = self._one(
                    cursor,
                    CHAINS.encode()
                    + b" WHERE series.series_uid = "
                    + self._literal(record.series_uid),
                )
                chains[record.series_uid] = tuple(row)
                continue
            add("studies", study, "num_series")
            add("patients", patient, "num_series")
            chains[record.series_uid] = (record.series_uid, series, study, patient)
        return grown

    def _patient(self, cursor: Any, record: InstanceRecord) -> int:
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
        created = self._insert(cursor, "patients", new_patient_values(record), "patient_id, issuer")
        if created is not None:
            return created
        return int(self._one(cursor, where)[0])

    def _insert(self, cursor: Any, table: str, values: dict[str, Any], key: str) -> int | None:
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

    def _end(self, cursor: Any) -> None:
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
