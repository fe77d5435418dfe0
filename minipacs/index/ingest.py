"""Ingest: records become index rows under a duplicate policy, with the counts kept.

Patient, study and series rows take their values from the first instance stored in them;
an instance stored again under the "replace" policy is taken as a correction, and its
values overwrite those of the series, study and patient it lands in.

`apply_records` runs inside the caller's transaction. It never leaves two rows for one
SOP Instance UID, also with several nodes writing to one PostgreSQL: each transaction
first takes a transaction-scoped advisory lock per SOP Instance UID (in one global order,
so two batches cannot deadlock on them), and patients, studies and series are created
with INSERT ... ON CONFLICT DO NOTHING so that concurrent creators end up sharing a row.
On SQLite the writer holds the database lock for the whole transaction (db.write_session).
"""

from __future__ import annotations

import functools
import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import (
    ColumnElement,
    Connection,
    Integer,
    Update,
    bindparam,
    cast,
    delete,
    exists,
    insert,
    literal,
    null,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from minipacs.index.models import Base, Instance, Patient, Series, Study, UnsyncedFile
from minipacs.index.records import (
    IngestError,
    InstanceRecord,
    normalise_name,
    record_from_dataset,
)

__all__ = [
    "DUPLICATE_POLICIES",
    "IngestError",
    "IngestOutcome",
    "InstanceRecord",
    "apply_record",
    "apply_records",
    "drop_unsynced",
    "instance_path_of",
    "lock_key",
    "normalise_name",
    "record_from_dataset",
    "withdraw",
]

DUPLICATE_POLICIES: Final = ("keep-first", "replace", "reject")
_MODALITIES_MAX = 160  # the studies.modalities column


@dataclass(frozen=True)
class IngestOutcome:
    """What happened to a record: stored, a kept duplicate, replaced, or rejected."""

    sop_uid: str
    stored: bool
    duplicate: bool = False
    rejected: bool = False
    # "replace": the replaced instance's file when it lives at another path; the caller
    # deletes it once the transaction has committed.
    stale_path: str | None = None
    # "keep-first"/"reject": the file of the instance the index keeps.
    existing_path: str | None = None


class _Pending:
    """Changes to patient, study and series rows, gathered over a batch and written at the end.

    Rows are written once each, patients then studies then series, each level by id: every
    writer takes its row locks in that one order, so concurrent writers (several nodes on
    one PostgreSQL) do not deadlock on them.
    """

    def __init__(self) -> None:
        self._deltas: defaultdict[tuple[type[Base], int], defaultdict[str, int]] = defaultdict(
            lambda: defaultdict(int)
        )
        self._values: defaultdict[tuple[type[Base], int], dict[str, Any]] = defaultdict(dict)
        self._modalities: set[int] = set()

    def add(self, model: type[Base], row_id: int, column: str, delta: int) -> None:
        """Add delta to a count column of one row."""
        self._deltas[(model, row_id)][column] += delta

    def instance(self, chain: tuple[int, int, int], delta: int) -> None:
        """One instance more or less in a (series, study, patient) chain."""
        series, study, patient = chain
        self.add(Series, series, "num_instances", delta)
        self.add(Study, study, "num_instances", delta)
        self.add(Patient, patient, "num_instances", delta)

    def set(self, model: type[Base], row_id: int, values: dict[str, Any]) -> None:
        """Overwrite attribute columns of one row."""
        self._values[(model, row_id)].update(values)

    def refresh_modalities(self, study: int) -> None:
        """Recompute a study's ModalitiesInStudy (0008,0061) from its series."""
        self._modalities.add(study)

    def _modalities_of(self, session: Session, study: int) -> str:
        rows = session.execute(select(Series.id, Series.modality).where(Series.study_fk == study))
        found = {self._values.get((Series, sid), {}).get("modality", mod) for sid, mod in rows}
        return modalities_in_study(found)

    def flush(self, session: Session) -> None:
        """Write everything gathered, in lock order."""
        connection = session.connection()
        postgres = connection.dialect.name == "postgresql"
        if not postgres:
            # One writer (SQLite): what the series say now is what they say at commit.
            for study in self._modalities:
                self.set(Study, study, {"modalities": self._modalities_of(session, study)})
        if postgres and not self._values:
            self._flush_counts(connection)
        else:
            self._flush_rows(connection)
        if postgres:
            # After the study's own UPDATE (its new series' count), holding its row lock:
            # a statement of its own sees every series committed before it (READ
            # COMMITTED), so of two nodes adding series at once, whoever writes last
            # writes them all. A value read before the lock could miss the other's.
            for study in sorted(self._modalities):
                connection.execute(text(recompute_modalities_sql(study)))
        self._deltas.clear()
        self._values.clear()
        self._modalities.clear()

    def _flush_rows(self, connection: Connection) -> None:
        """Every UPDATE gathered, level by level in lock order."""
        for model in (Patient, Study, Series):
            rows = {r for m, r in self._deltas if m is model} | {
                r for m, r in self._values if m is model
            }
            # Consecutive rows needing the same statement go in one executemany, still in
            # id order (the lock order).
            statement: Update | None = None
            params: list[dict[str, Any]] = []
            for row_id in sorted(rows):
                added = {c: d for c, d in self._deltas.get((model, row_id), {}).items() if d}
                values = {
                    c: v for c, v in self._values.get((model, row_id), {}).items() if c not in added
                }
                if not added and not values:
                    continue
                row_statement = _update_statement(model, tuple(values), tuple(added))
                if row_statement is not statement:
                    if statement is not None:
                        connection.execute(statement, params)
                    statement, params = row_statement, []
                params.append(
                    {
                        "row_id": row_id,
                        **{f"set_{c}": v for c, v in values.items()},
                        **{f"add_{c}": d for c, d in added.items()},
                    }
                )
            if statement is not None:
                connection.execute(statement, params)

    def _flush_counts(self, connection: Connection) -> None:
        """Only counts changed: every UPDATE, in lock order, in one query (PostgreSQL).

        Three levels cost three round trips otherwise, each a GIL hand-off for the writer.
        The SQL holds only our own table and column names and integers: nothing to quote.
        """
        statements = []
        for model in (Patient, Study, Series):
            for row_id in sorted(r for m, r in self._deltas if m is model):
                added = self._deltas[(model, row_id)]
                sets = ", ".join(f"{c} = {c} + {int(d)}" for c, d in sorted(added.items()) if d)
                if sets:
                    statements.append(
                        f"UPDATE {model.__tablename__} SET {sets} WHERE id = {int(row_id)}"
                    )
        if statements:
            # Without parameters psycopg sends a simple query, which may hold several.
            connection.execution_options(no_parameters=True).exec_driver_sql("; ".join(statements))


@functools.cache
def _update_statement(
    model: type[Base], set_columns: tuple[str, ...], added: tuple[str, ...]
) -> Update:
    """UPDATE of one row by id (row_id) setting columns (set_<c>) and adding to counts (add_<c>).

    Built once per shape: building and caching statements anew cost more CPU than running
    them. The column sets come from this module, so there are few shapes.
    """
    table = model.__table__
    values: dict[str, Any] = {c: bindparam(f"set_{c}") for c in set_columns}
    values.update({c: table.c[c] + bindparam(f"add_{c}") for c in added})
    return update(table).where(table.c.id == bindparam("row_id")).values(values)


# The statements of every batch, built once: on the hot path, building a statement and its
# cache key, and the ORM's handling of it, cost more CPU than SQLite running it. They run
# on the session's connection, as Core: the ORM has no objects here to keep in step.
_INSTANCES = Instance.__table__
_SERIES = Series.__table__
_STUDIES = Study.__table__
# One round trip tells which of a batch's instances are indexed ("i" rows) and the chains
# of the series it names that exist ("s" rows: series, study, patient).
_LOOKUP = union_all(
    select(
        literal("i"),
        _INSTANCES.c.sop_uid,
        cast(null(), Integer),
        cast(null(), Integer),
        cast(null(), Integer),
    ).where(_INSTANCES.c.sop_uid.in_(bindparam("sop_uids", expanding=True))),
    select(
        literal("s"), _SERIES.c.series_uid, _SERIES.c.id, _SERIES.c.study_fk, _STUDIES.c.patient_fk
    )
    .join(_STUDIES, _STUDIES.c.id == _SERIES.c.study_fk)
    .where(_SERIES.c.series_uid.in_(bindparam("series_uids", expanding=True))),
)
_INSERT_INSTANCES = insert(_INSTANCES)
_UNSYNCED = UnsyncedFile.__table__
_DELETE_UNSYNCED = delete(_UNSYNCED).where(
    _UNSYNCED.c.token.in_(bindparam("tokens", expanding=True))
)
# Volatile functions in the select list run after ORDER BY: locks are taken in key order.
_LOCK_KEYS = text(
    "SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(:keys AS bigint[])) AS t(k) ORDER BY k"
)


def lock_key(sop_uid: str) -> int:
    """A signed 64-bit advisory lock key for a SOP Instance UID."""
    digest = hashlib.sha1(sop_uid.encode("ascii"), usedforsecurity=False).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _lock_instances(session: Session, sop_uids: Iterable[str]) -> None:
    """Serialise writers of the same SOP Instance UIDs across connections (PostgreSQL)."""
    if session.get_bind().dialect.name != "postgresql":
        return
    keys = sorted({lock_key(uid) for uid in sop_uids})
    session.connection().execute(_LOCK_KEYS, {"keys": keys})


def _insert_or_get(
    session: Session, model: type[Base], values: dict[str, Any], key: ColumnElement[bool]
) -> tuple[int, bool]:
    """Insert a row unless its unique key exists; return (id, whether we created it)."""
    builder = (
        postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    )
    created = session.scalar(
        builder(model).values(**values).on_conflict_do_nothing().returning(model.id)
    )
    if created is not None:
        return created, True
    return session.scalars(select(model.id).where(key)).one(), False


def _refresh_modalities(session: Session, study: int) -> None:
    """Recompute ModalitiesInStudy (0008,0061) from the study's series."""
    modalities = session.scalars(
        select(Series.modality).where(Series.study_fk == study, Series.modality != "").distinct()
    ).all()
    value = modalities_in_study(modalities)
    session.execute(update(Study).where(Study.id == study).values(modalities=value))


def modalities_in_study(modalities: Iterable[str]) -> str:
    """ModalitiesInStudy (0008,0061) as stored: the distinct non-empty ones, sorted."""
    return "\\".join(sorted({m for m in modalities if m}))[:_MODALITIES_MAX]


def recompute_modalities_sql(study: int) -> str:
    """PostgreSQL's UPDATE of a study's ModalitiesInStudy from its series.

    The value modalities_in_study gives: code point order is COLLATE "C", and chr(92) is
    the backslash whatever standard_conforming_strings says.
    """
    study = int(study)
    return (
        "UPDATE studies SET modalities = coalesce((SELECT left(string_agg(m, chr(92)"
        f' ORDER BY m), {_MODALITIES_MAX}) FROM (SELECT DISTINCT modality COLLATE "C" AS m'
        f" FROM series WHERE study_fk = {study} AND modality <> '') AS d), '') WHERE id = {study}"
    )


# The counts of a patient or study row when created: its series and instances come after.
_NO_SERIES: Final = {"num_series": 0, "num_instances": 0}


def new_patient_values(record: InstanceRecord) -> dict[str, Any]:
    """The columns of a patient row that a record creates."""
    identity = {"patient_id": record.patient_id, "issuer": record.issuer}
    return {**identity, **_patient_attributes(record), "num_studies": 0, **_NO_SERIES}


def new_study_values(record: InstanceRecord, patient: int) -> dict[str, Any]:
    """The columns of a study row that a record creates under a patient."""
    identity = {"patient_fk": patient, "study_uid": record.study_uid}
    return {**identity, **_study_attributes(record), "modalities": "", **_NO_SERIES}


def new_series_values(record: InstanceRecord, study: int) -> dict[str, Any]:
    """The columns of a series row that a record creates in a study."""
    return {
        "study_fk": study,
        "series_uid": record.series_uid,
        **_series_attributes(record),
        "num_instances": 0,
    }


def _patient_attributes(record: InstanceRecord) -> dict[str, Any]:
    """Patient-level values of a record, beyond its identity."""
    return {
        "patient_name": record.patient_name,
        "patient_name_norm": normalise_name(record.patient_name),
        "birth_date": record.birth_date,
        "sex": record.sex,
    }


def _study_attributes(record: InstanceRecord) -> dict[str, Any]:
    """Study-level values of a record."""
    return {
        "study_date": record.study_date,
        "study_time": record.study_time,
        "accession_number": record.accession_number,
        "study_id": record.study_id,
        "description": record.study_description,
        "referring_name": record.referring_name,
        "referring_name_norm": normalise_name(record.referring_name),
    }


def _series_attributes(record: InstanceRecord) -> dict[str, Any]:
    """Series-level values of a record."""
    return {
        "modality": record.modality,
        "series_number": record.series_number,
        "description": record.series_description,
        "body_part": record.body_part,
        "series_date": record.series_date,
        "series_time": record.series_time,
    }


def _overwrite_levels(
    session: Session, record: InstanceRecord, chain: tuple[int, int, int], pending: _Pending
) -> None:
    """Let a replacing instance's patient, study and series values win (a correction)."""
    series, study, patient = chain
    pending.set(Series, series, _series_attributes(record))
    pending.set(Study, study, _study_attributes(record))
    pending.refresh_modalities(study)
    # Only the demographics of the same patient: a study keeps the patient it belongs to.
    identity = session.execute(
        select(Patient.patient_id, Patient.issuer).where(Patient.id == patient)
    ).one()
    if tuple(identity) == (record.patient_id, record.issuer):
        pending.set(Patient, patient, _patient_attributes(record))


def _patient(session: Session, record: InstanceRecord) -> int:
    """The patient of a new study: found or created by (PatientID, IssuerOfPatientID)."""
    key = (Patient.patient_id == record.patient_id) & (Patient.issuer == record.issuer)
    found = session.scalar(select(Patient.id).where(key))
    if found is not None:
        return found
    return _insert_or_get(session, Patient, new_patient_values(record), key)[0]


def _study(session: Session, record: InstanceRecord, pending: _Pending) -> tuple[int, int]:
    """(study, patient) of a record, creating the study (and patient) if new."""
    found = session.execute(
        select(Study.id, Study.patient_fk).where(Study.study_uid == record.study_uid)
    ).first()
    if found is not None:
        # The study keeps the patient it was first stored under.
        return found.id, found.patient_fk
    patient = _patient(session, record)
    values = new_study_values(record, patient)
    study, created = _insert_or_get(session, Study, values, Study.study_uid == record.study_uid)
    if created:
        pending.add(Patient, patient, "num_studies", 1)
        return study, patient
    # Another writer created it meanwhile, perhaps under another patient.
    return study, session.scalars(select(Study.patient_fk).where(Study.id == study)).one()


def _chain_where(session: Session, where: ColumnElement[bool]) -> tuple[int, int, int] | None:
    """(series, study, patient) of the series matching a condition, if any."""
    row = session.execute(
        select(Series.id, Series.study_fk, Study.patient_fk)
        .join(Study, Study.id == Series.study_fk)
        .where(where)
    ).first()
    return None if row is None else (row[0], row[1], row[2])


def _chain(session: Session, record: InstanceRecord, pending: _Pending) -> tuple[int, int, int]:
    """(series, study, patient) of a record, creating what is missing."""
    found = _chain_where(session, Series.series_uid == record.series_uid)
    if found is not None:
        # The series keeps the study it was first stored under.
        return found
    study, patient = _study(session, record, pending)
    values = new_series_values(record, study)
    series, created = _insert_or_get(
        session, Series, values, Series.series_uid == record.series_uid
    )
    if not created:
        chain = _chain_where(session, Series.id == series)
        assert chain is not None  # _insert_or_get just found it
        return chain
    pending.add(Study, study, "num_series", 1)
    pending.add(Patient, patient, "num_series", 1)
    pending.refresh_modalities(study)
    return series, study, patient


def _prune(session: Session, chain: tuple[int, int, int]) -> None:
    """Delete the series, study and patient of a chain that were left empty, with counts."""
    series, study, patient = chain
    if session.scalar(select(exists().where(Instance.series_fk == series))):
        return
    session.execute(delete(Series).where(Series.id == series))
    session.execute(update(Study).where(Study.id == study).values(num_series=Study.num_series - 1))
    session.execute(
        update(Patient).where(Patient.id == patient).values(num_series=Patient.num_series - 1)
    )
    if session.scalar(select(exists().where(Series.study_fk == study))):
        _refresh_modalities(session, study)
        return
    session.execute(delete(Study).where(Study.id == study))
    session.execute(
        update(Patient).where(Patient.id == patient).values(num_studies=Patient.num_studies - 1)
    )
    if not session.scalar(select(exists().where(Study.patient_fk == patient))):
        session.execute(delete(Patient).where(Patient.id == patient))


def _instance_row(record: InstanceRecord, series: int) -> dict[str, Any]:
    """The instances row of a record in a series."""
    return {
        "series_fk": series,
        "sop_uid": record.sop_uid,
        "sop_class_uid": record.sop_class_uid,
        "instance_number": record.instance_number,
        "transfer_syntax": record.transfer_syntax,
        "number_of_frames": record.number_of_frames,
        "rows": record.rows,
        "columns": record.columns,
        "rel_path": record.rel_path,
        "size": record.size,
        "received_at": record.received_at,
        "calling_ae": record.calling_ae,
        "charset": record.charset,
        "header": record.header,
    }


def _apply(
    session: Session, record: InstanceRecord, policy: str, pending: _Pending
) -> IngestOutcome:
    """Add one record whose SOP Instance UID the index already holds, under the policy."""
    existing = session.execute(
        select(Instance.id, Instance.series_fk, Instance.rel_path).where(
            Instance.sop_uid == record.sop_uid
        )
    ).one()
    if policy != "replace":
        return IngestOutcome(
            record.sop_uid,
            stored=False,
            duplicate=True,
            rejected=policy == "reject",
            existing_path=existing.rel_path,
        )
    session.execute(delete(Instance).where(Instance.id == existing.id))
    old_chain = _chain_where(session, Series.id == existing.series_fk)
    assert old_chain is not None  # the foreign key guarantees it
    pending.instance(old_chain, -1)
    chain = _chain(session, record, pending)
    session.execute(insert(Instance), [_instance_row(record, chain[0])])
    pending.instance(chain, +1)
    _overwrite_levels(session, record, chain, pending)
    if old_chain != chain:
        # The instance moved (another series or study): drop what it left empty.
        pending.flush(session)
        _prune(session, old_chain)
    stale = existing.rel_path if existing.rel_path != record.rel_path else None
    return IngestOutcome(record.sop_uid, stored=True, duplicate=True, stale_path=stale)


def _lookup(
    session: Session, records: Sequence[InstanceRecord]
) -> tuple[set[str], dict[str, tuple[int, int, int]]]:
    """The records' SOP Instance UIDs already indexed, and the chains of their known series."""
    rows = session.connection().execute(
        _LOOKUP,
        {
            "sop_uids": list({r.sop_uid for r in records}),
            "series_uids": list({r.series_uid for r in records}),
        },
    )
    taken: set[str] = set()
    chains: dict[str, tuple[int, int, int]] = {}
    for kind, uid, series, study, patient in rows:
        if kind == "i":
            taken.add(uid)
        else:
            chains[uid] = (series, study, patient)
    return taken, chains


def apply_records(
    session: Session, records: Sequence[InstanceRecord], duplicate_policy: str
) -> list[IngestOutcome]:
    """Add records to the index in the session's transaction; one outcome per record.

    New instances (the usual case) cost one lookup for the whole batch (instances and series),
    a few statements per new series, one multi-row insert and one update per level;
    duplicates take the record-by-record path.
    """
    if duplicate_policy not in DUPLICATE_POLICIES:
        raise ValueError(f"duplicate policy must be one of {', '.join(DUPLICATE_POLICIES)}")
    _lock_instances(session, (r.sop_uid for r in records))
    taken, chains = _lookup(session, records)
    pending = _Pending()
    rows: list[dict[str, Any]] = []
    outcomes = []
    for record in records:
        if record.sop_uid in taken:
            # Duplicates see the rows inserted before them, and may prune chains.
            if rows:
                session.connection().execute(_INSERT_INSTANCES, rows)
                rows = []
            outcomes.append(_apply(session, record, duplicate_policy, pending))
            chains.clear()
            continue
        chain = chains.get(record.series_uid)
        if chain is None:
            chain = chains[record.series_uid] = _chain(session, record, pending)
        rows.append(_instance_row(record, chain[0]))
        pending.instance(chain, +1)
        taken.add(record.sop_uid)
        outcomes.append(IngestOutcome(record.sop_uid, stored=True))
    if rows:
        session.connection().execute(_INSERT_INSTANCES, rows)
    pending.flush(session)
    return outcomes


def apply_record(session: Session, record: InstanceRecord, duplicate_policy: str) -> IngestOutcome:
    """Add one record to the index in the session's transaction."""
    return apply_records(session, [record], duplicate_policy)[0]


def withdraw(session: Session, sop_uid: str, rel_path: str) -> bool:
    """Remove an instance row (counts kept, emptied levels pruned) if it still names rel_path.

    For a row whose file never became durable, so that no success was sent for it. A row
    that names another path is a later store's, and stays.
    """
    _lock_instances(session, [sop_uid])
    row = session.execute(
        select(Instance.id, Instance.series_fk).where(
            Instance.sop_uid == sop_uid, Instance.rel_path == rel_path
        )
    ).first()
    if row is None:
        return False
    chain = _chain_where(session, Series.id == row.series_fk)
    assert chain is not None  # the foreign key guarantees it
    session.execute(delete(Instance).where(Instance.id == row.id))
    pending = _Pending()
    pending.instance(chain, -1)
    pending.flush(session)
    _prune(session, chain)
    return True


def drop_unsynced(session: Session, tokens: Sequence[str]) -> None:
    """Delete the unsynced listings (models.UnsyncedFile) of these tokens."""
    if tokens:
        session.connection().execute(_DELETE_UNSYNCED, {"tokens": list(tokens)})


def instance_path_of(session: Session, sop_uid: str) -> str | None:
    """The stored file of an instance, if indexed."""
    return session.scalar(select(Instance.rel_path).where(Instance.sop_uid == sop_uid))
