"""The SQL index on SQLite and PostgreSQL: ingest, duplicate policies, counts, group commit."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from minipacs.dataset import encode, header_syntax, read_header, read_part10
from minipacs.index import schema
from minipacs.index import writer as writer_module
from minipacs.index.db import make_engine, write_engine, write_session
from minipacs.index.fastpath import FastPath
from minipacs.index.fastpath_postgres import _NAMES, _PREPARED, PostgresCommit
from minipacs.index.ingest import (
    IngestOutcome,
    InstanceRecord,
    apply_records,
    instance_path_of,
    modalities_in_study,
    record_from_dataset,
    withdraw,
)
from minipacs.index.models import Instance, Patient, Series, Study, UnsyncedFile
from minipacs.index.records import INDEXED_TAGS
from minipacs.index.stats import counts
from minipacs.index.writer import IndexUnavailable, IndexWriter
from tests.fixtures_db import _create_database
from tests.pgserver import PostgresServer


def _record(name: str = "CT_small.dcm", **changes: object) -> InstanceRecord:
    meta, inspected = read_part10(Path(get_testdata_file(name)), INDEXED_TAGS)
    record = record_from_dataset(
        inspected.dataset,
        header=inspected.header,
        transfer_syntax_uid=str(meta.TransferSyntaxUID),
        rel_path=f"x/{name}",
        size=123,
        calling_ae="TEST",
        received_at=datetime.now(UTC),
    )
    return dataclasses.replace(record, **changes)


@pytest.fixture
def engine(db_url: str) -> Engine:
    """An engine on the test's fresh database."""
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def _apply(engine: Engine, records: Sequence[InstanceRecord], policy: str) -> list[IngestOutcome]:
    with write_session(engine) as session, session.begin():
        return apply_records(session, records, policy)


def _submit_all(
    engine: Engine, records: Sequence[InstanceRecord], policy: str = "keep-first"
) -> tuple[list[IngestOutcome | BaseException], int]:
    """Submit all records at once through one IndexWriter; (outcomes, commits)."""

    async def run() -> list[IngestOutcome | BaseException]:
        writer = IndexWriter(engine, policy)
        writer.start()
        try:
            return await asyncio.gather(
                *(writer.submit(r) for r in records), return_exceptions=True
            )
        finally:
            await writer.close()
            commits.append(writer.commits)

    commits: list[int] = []
    outcomes = asyncio.run(asyncio.wait_for(run(), 60))
    return outcomes, commits[0]


def _consistent(engine: Engine) -> None:
    """Every maintained count equals what the rows say."""
    with Session(engine) as session:
        for series in session.scalars(select(Series)):
            n = session.scalar(select(func.count()).where(Instance.series_fk == series.id))
            assert series.num_instances == n, series.series_uid
        for study in session.scalars(select(Study)):
            series_ids = select(Series.id).where(Series.study_fk == study.id)
            assert study.num_series == session.scalar(
                select(func.count()).select_from(series_ids.subquery())
            )
            assert study.num_instances == session.scalar(
                select(func.count()).where(Instance.series_fk.in_(series_ids))
            )
            modalities = session.scalars(
                select(Series.modality).where(Series.study_fk == study.id).distinct()
            ).all()
            assert study.modalities == modalities_in_study(modalities)
        for patient in session.scalars(select(Patient)):
            study_ids = select(Study.id).where(Study.patient_fk == patient.id)
            series_ids = select(Series.id).where(Series.study_fk.in_(study_ids))
            assert patient.num_studies == session.scalar(
                select(func.count()).select_from(study_ids.subquery())
            )
            assert patient.num_series == session.scalar(
                select(func.count()).select_from(series_ids.subquery())
            )
            assert patient.num_instances == session.scalar(
                select(func.count()).where(Instance.series_fk.in_(series_ids))
            )
            assert patient.num_studies > 0


def test_ingest_builds_the_hierarchy_with_counts(engine: Engine) -> None:
    ct = _record()
    second = dataclasses.replace(ct, sop_uid=ct.sop_uid + ".2")
    sr = dataclasses.replace(
        ct, sop_uid=ct.sop_uid + ".3", series_uid=ct.series_uid + ".9", modality="SR"
    )
    mr = _record("MR_small.dcm")
    outcomes = _apply(engine, [ct, second, sr, mr], "keep-first")
    assert [o.stored for o in outcomes] == [True] * 4
    with Session(engine) as session:
        study = session.scalars(select(Study).where(Study.study_uid == ct.study_uid)).one()
        assert (study.num_series, study.num_instances, study.modalities) == (2, 3, "CT\\SR")
        patient = session.get(Patient, study.patient_fk)
        assert patient is not None
        assert (patient.patient_id, patient.patient_name) == ("1CT1", "CompressedSamples^CT1")
        assert patient.patient_name_norm == "COMPRESSEDSAMPLES^CT1"
        assert (patient.num_studies, patient.num_series, patient.num_instances) == (1, 2, 3)
        instance = session.scalars(select(Instance).where(Instance.sop_uid == ct.sop_uid)).one()
        assert (instance.rel_path, instance.size, instance.calling_ae) == (ct.rel_path, 123, "TEST")
        assert instance.header is not None
        stored = read_header(instance.header, header_syntax(instance.transfer_syntax))
        assert stored.PatientID == "1CT1"
        assert "PixelData" not in stored
        assert instance_path_of(session, mr.sop_uid) == mr.rel_path
    assert counts(engine) == {
        "patients": 2,
        "studies": 2,
        "series": 3,
        "instances": 4,
        "bytes": 4 * 123,
    }
    _consistent(engine)


def test_patient_identity_includes_the_issuer(engine: Engine) -> None:
    ct = _record()
    other = dataclasses.replace(
        ct, sop_uid="1.2.3.1", study_uid="1.2.3", series_uid="1.2.3.4", issuer="OTHER"
    )
    _apply(engine, [ct, other], "keep-first")
    assert counts(engine)["patients"] == 2


def test_non_ascii_names_are_stored_and_normalised(engine: Engine) -> None:
    ds = pydicom.dcmread(pydicom.data.get_charset_files("chrH31.dcm")[0])
    record = record_from_dataset(
        ds,
        header=encode(ds, "1.2.840.10008.1.2.1"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        rel_path="a/b.dcm",
        size=1,
        calling_ae="",
        received_at=datetime.now(UTC),
    )
    _apply(engine, [record], "keep-first")
    with Session(engine) as session:
        patient = session.scalars(select(Patient)).one()
        assert patient.patient_name == "Yamada^Tarou=山田^太郎=やまだ^たろう"
        assert patient.patient_name_norm == "YAMADA^TAROU=山田^太郎=やまだ^たろう"
        hits = session.scalars(
            select(Patient.id).where(Patient.patient_name_norm.like("%山田%"))
        ).all()
        assert hits == [patient.id]


@pytest.mark.parametrize("policy", ["keep-first", "replace", "reject"])
def test_duplicate_policies(engine: Engine, policy: str) -> None:
    first = _record("MR_small.dcm")
    again = dataclasses.replace(first, rel_path="elsewhere/mr.dcm", size=999)
    (stored,) = _apply(engine, [first], policy)
    (outcome,) = _apply(engine, [again], policy)
    assert stored.stored and not stored.duplicate
    assert outcome.duplicate
    with Session(engine) as session:
        row = session.execute(select(Instance.rel_path, Instance.size)).one()
        assert session.scalar(select(Series.num_instances)) == 1
    if policy == "replace":
        assert outcome.stored and not outcome.rejected
        assert outcome.stale_path == first.rel_path
        assert tuple(row) == ("elsewhere/mr.dcm", 999)
    else:
        assert not outcome.stored
        assert outcome.rejected == (policy == "reject")
        assert outcome.existing_path == first.rel_path
        assert tuple(row) == (first.rel_path, 123)
    _consistent(engine)


def test_replace_corrects_the_levels_above(engine: Engine) -> None:
    first = _record()
    _apply(engine, [first], "replace")
    corrected = dataclasses.replace(
        first, patient_name="Fixed^Name", study_description="Fixed", modality="OT"
    )
    _apply(engine, [corrected], "replace")
    with Session(engine) as session:
        assert session.scalars(select(Patient.patient_name_norm)).one() == "FIXED^NAME"
        assert session.scalars(select(Study.description)).one() == "Fixed"
        assert session.scalars(select(Study.modalities)).one() == "OT"
    # keep-first ignores what a duplicate says.
    _apply(engine, [dataclasses.replace(first, patient_name="Other")], "keep-first")
    with Session(engine) as session:
        assert session.scalars(select(Patient.patient_name)).one() == "Fixed^Name"
    _consistent(engine)


def test_replace_at_the_same_path_has_no_stale_file(engine: Engine) -> None:
    first = _record()
    _apply(engine, [first], "replace")
    (outcome,) = _apply(engine, [dataclasses.replace(first, size=5)], "replace")
    assert outcome.stored and outcome.duplicate and outcome.stale_path is None


def test_replace_into_another_study_prunes_what_it_left_empty(engine: Engine) -> None:
    ct = _record()
    keep = _record("MR_small.dcm")
    _apply(engine, [ct, keep], "replace")
    moved = dataclasses.replace(
        ct,
        study_uid=keep.study_uid,
        series_uid=keep.series_uid,
        patient_id=keep.patient_id,
        rel_path="new/place.dcm",
    )
    (outcome,) = _apply(engine, [moved], "replace")
    assert outcome.stale_path == ct.rel_path
    with Session(engine) as session:
        assert session.scalars(select(Study.study_uid)).all() == [keep.study_uid]
        assert session.scalars(select(Series.series_uid)).all() == [keep.series_uid]
        assert session.scalars(select(Patient.patient_id)).all() == [keep.patient_id]
        assert session.scalar(select(Series.num_instances)) == 2
    _consistent(engine)


def test_duplicates_within_one_batch(engine: Engine) -> None:
    first = _record()
    twin = dataclasses.replace(first, rel_path="twin.dcm")
    outcomes = _apply(engine, [first, twin], "keep-first")
    assert [(o.stored, o.duplicate) for o in outcomes] == [(True, False), (False, True)]
    assert counts(engine)["instances"] == 1


def test_unknown_policy_is_refused(engine: Engine) -> None:
    with pytest.raises(ValueError, match="keep-first"):
        _apply(engine, [_record()], "overwrite")


def test_group_commit_of_500_concurrent_submits(engine: Engine) -> None:
    base = _record()
    records = [
        dataclasses.replace(
            base,
            sop_uid=f"{base.sop_uid}.{i}",
            series_uid=f"{base.series_uid}.{i % 3}.{i % 7}",
            study_uid=f"{base.study_uid}.{i % 3}",
            modality=("CT", "MR", "SR")[i % 7 % 3],
        )
        for i in range(500)
    ]
    outcomes, commits = _submit_all(engine, records)
    assert all(isinstance(o, IngestOutcome) and o.stored for o in outcomes)
    assert commits < 100  # many records per transaction
    assert counts(engine)["instances"] == 500
    assert counts(engine)["series"] == 21
    assert counts(engine)["studies"] == 3
    _consistent(engine)


def test_a_bad_record_fails_alone(engine: Engine) -> None:
    base = _record()
    good = [dataclasses.replace(base, sop_uid=f"{base.sop_uid}.{i}") for i in range(40)]
    # A row the database refuses (NOT NULL) fails its own commit and nobody else's.
    bad = dataclasses.replace(base, sop_uid="9.9.9", rel_path=None)
    outcomes, _ = _submit_all(engine, [*good[:20], bad, *good[20:]])
    assert isinstance(outcomes[20], IndexUnavailable)
    assert isinstance(outcomes[20].__cause__, Exception)
    assert all(isinstance(o, IngestOutcome) and o.stored for i, o in enumerate(outcomes) if i != 20)
    assert counts(engine)["instances"] == 40
    _consistent(engine)


def test_outcome_arrives_only_after_the_commit(engine: Engine, db_url: str) -> None:
    record = _record()
    other = make_engine(db_url)

    async def run() -> bool:
        writer = IndexWriter(engine, "keep-first")
        writer.start()
        await writer.submit(record)
        # Another connection (another node) sees the row as soon as the caller is told.
        with other.connect() as connection:
            visible = connection.scalar(
                select(func.count()).where(Instance.sop_uid == record.sop_uid)
            )
        await writer.close()
        return visible == 1

    try:
        assert asyncio.run(run())
    finally:
        other.dispose()


def test_a_lone_record_commits_in_the_calling_thread(engine: Engine) -> None:
    async def run() -> None:
        writer = IndexWriter(engine, "keep-first")
        writer.start()
        try:
            committer: list[str] = []
            original = writer._commit

            def commit(batch: list) -> None:  # type: ignore[type-arg]
                committer.append(threading.current_thread().name)
                original(batch)

            writer._commit = commit  # type: ignore[method-assign]
            future = await asyncio.to_thread(writer.commit_alone, _record())
            # Done on return, by the caller's own thread: no hand-off to the writer.
            assert future.done() and future.result().stored
            assert committer and committer[0] != "index-writer"
            assert writer.commits == 1
        finally:
            await writer.close()
        with pytest.raises(IndexUnavailable, match="closed"):
            writer.commit_alone(_record("MR_small.dcm"))

    asyncio.run(run())


def test_a_record_not_alone_goes_to_the_writer_thread(engine: Engine) -> None:
    # A commit running (the writer's connection busy): commit_alone must not wait for it
    # nor use the connection alongside, but queue the record for the writer thread.
    writer = IndexWriter(engine, "keep-first")
    writer.start()
    try:
        with writer._busy:
            future = writer.commit_alone(_record())
            assert not future.done()
        assert future.result(10).stored
    finally:
        asyncio.run(writer.close())


def test_listings_settled_after_lone_commits_go_once_the_writer_idles(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # commit_alone leaves the writer thread asleep: the tokens settled after the last
    # ride must still be dropped SETTLE_IDLE later, not wait for the next store.
    monkeypatch.setattr(writer_module, "SETTLE_IDLE", 0.05)
    writer = IndexWriter(engine, "keep-first")
    writer.start()
    base = _record()
    try:
        for i in range(3):
            record = dataclasses.replace(base, sop_uid=f"{base.sop_uid}.{i}", rel_path=f"x/{i}")
            token = f"{i:032x}"
            assert writer.commit_alone(record, unsynced=token).result(10).stored
            writer.settle(token)
        deadline = time.monotonic() + 3
        while True:
            with Session(engine) as session:
                listed = session.scalar(select(func.count()).select_from(UnsyncedFile))
            if listed == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert listed == 0, f"{listed} settled listings left after 3 s without a batch"
    finally:
        asyncio.run(writer.close())


def test_submit_after_close_is_refused(engine: Engine) -> None:
    async def run() -> None:
        writer = IndexWriter(engine, "keep-first")
        writer.start()
        await writer.close()
        await writer.close()
        with pytest.raises(IndexUnavailable, match="closed"):
            await writer.submit(_record())

    asyncio.run(run())


@pytest.mark.parametrize("policy", ["keep-first", "replace"])
def test_concurrent_writers_never_duplicate_an_instance(db_url: str, policy: str) -> None:
    """Two nodes (own engines, own writers) store the same instances at the same time."""
    base = _record()
    records = [
        dataclasses.replace(
            base,
            sop_uid=f"{base.sop_uid}.{i}",
            series_uid=f"{base.series_uid}.{i % 5}",
            study_uid=f"{base.study_uid}.{i % 2}",
        )
        for i in range(150)
    ]
    engines = [make_engine(db_url) for _ in range(3)]
    results: list[list[IngestOutcome | BaseException]] = []
    barrier = threading.Barrier(len(engines))

    def node(engine: Engine, shift: int) -> None:
        mine = [
            dataclasses.replace(r, rel_path=f"node{shift}/{r.sop_uid}")
            for r in records[shift:] + records[:shift]
        ]
        barrier.wait()
        results.append(_submit_all(engine, mine, policy)[0])

    threads = [
        threading.Thread(target=node, args=(engine, 50 * n)) for n, engine in enumerate(engines)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    try:
        assert len(results) == len(engines)
        outcomes = [o for result in results for o in result]
        assert all(isinstance(o, IngestOutcome) for o in outcomes), outcomes
        stored = [o for o in outcomes if isinstance(o, IngestOutcome) and o.stored]
        expected = len(records) * (len(engines) if policy == "replace" else 1)
        assert len(stored) == expected
        assert counts(engines[0])["instances"] == len(records)
        assert counts(engines[0])["series"] == 5
        _consistent(engines[0])
    finally:
        for engine in engines:
            engine.dispose()


def test_counts_of_a_batch_into_known_series(engine: Engine) -> None:
    # Only counts change: on PostgreSQL all the UPDATEs go in one query.
    ct = _record()
    mr = _record("MR_small.dcm")
    _apply(engine, [ct, mr], "keep-first")
    more = [
        dataclasses.replace(base, sop_uid=f"{base.sop_uid}.{n}", rel_path=f"x/{n}{base.rel_path}")
        for n in range(1, 4)
        for base in (ct, mr)
    ]
    _apply(engine, more, "keep-first")
    _consistent(engine)
    with Session(engine) as session:
        assert sorted(session.scalars(select(Series.num_instances))) == [4, 4]
        assert sum(session.scalars(select(Patient.num_instances))) == 8


def _fast_commit(
    engine: Engine,
    records: Sequence[InstanceRecord],
    unsynced: Sequence[str | None] | None = None,
    settled: Sequence[str] = (),
) -> list[IngestOutcome] | None:
    with write_engine(engine).connect() as connection:
        fast = FastPath(connection, "host~1~run")
        return fast.commit(records, unsynced or [None] * len(records), settled)


def _instance_columns(engine: Engine, sop_uid: str) -> dict[str, object]:
    with Session(engine) as session:
        row = session.execute(select(Instance.__table__).where(Instance.sop_uid == sop_uid)).one()
    return {k: v for k, v in row._mapping.items() if k not in ("id", "sop_uid", "rel_path")}


def test_fast_path_writes_what_the_orm_path_writes(engine: Engine) -> None:
    # Values come back unchanged, quotes and backslashes too: PostgreSQL's fast path
    # sends them as quoted literals.
    first = _record(calling_ae="A'B\\C;--", charset="ISO_IR 100", header=b"\x00'\\\xff" * 50)
    _apply(engine, [first], "keep-first")
    by_orm = dataclasses.replace(first, sop_uid=f"{first.sop_uid}.1", rel_path="x/1")
    by_fast = dataclasses.replace(first, sop_uid=f"{first.sop_uid}.2", rel_path="x/2")
    _apply(engine, [by_orm], "keep-first")
    outcomes = _fast_commit(engine, [by_fast], unsynced=["t" * 32])
    assert outcomes == [IngestOutcome(by_fast.sop_uid, stored=True)]
    assert _instance_columns(engine, by_fast.sop_uid) == _instance_columns(engine, by_orm.sop_uid)
    _consistent(engine)
    with Session(engine) as session:
        listed = session.execute(select(UnsyncedFile.__table__)).one()
        assert tuple(listed) == ("t" * 32, "x/2", by_fast.sop_uid, "host~1~run")
    # Settled listings are dropped with the next batch.
    more = dataclasses.replace(first, sop_uid=f"{first.sop_uid}.3", rel_path="x/3")
    assert _fast_commit(engine, [more], settled=["t" * 32]) is not None
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(UnsyncedFile)) == 0
        assert sorted(session.scalars(select(Series.num_instances))) == [4]


def test_fast_path_writes_absent_values_as_the_orm_path_does(engine: Engine) -> None:
    # A batch whose integer and header columns are all absent: they go in as NULL
    # literals on PostgreSQL, bound parameters on SQLite, and read back as the ORM's.
    first = _record()
    _apply(engine, [first], "keep-first")
    absent = {"instance_number": None, "number_of_frames": None, "rows": None, "header": None}
    by_orm = dataclasses.replace(first, sop_uid=f"{first.sop_uid}.1", rel_path="x/1", **absent)
    by_fast = dataclasses.replace(first, sop_uid=f"{first.sop_uid}.2", rel_path="x/2", **absent)
    _apply(engine, [by_orm], "keep-first")
    assert _fast_commit(engine, [by_fast]) == [IngestOutcome(by_fast.sop_uid, stored=True)]
    assert _instance_columns(engine, by_fast.sop_uid) == _instance_columns(engine, by_orm.sop_uid)
    _consistent(engine)


def _rows(engine: Engine) -> dict[str, list[tuple[object, ...]]]:
    """Every row of the level tables and the instances, in id order."""
    with engine.connect() as connection:
        return {
            table.name: [tuple(r) for r in connection.execute(select(table).order_by(table.c.id))]
            for table in (
                Patient.__table__,
                Study.__table__,
                Series.__table__,
                Instance.__table__,
            )
        }


def test_fast_path_creates_series_studies_and_patients_as_the_orm_does(
    db_url: str, request: pytest.FixtureRequest
) -> None:
    ct, mr = _record(), _record("MR_small.dcm", rel_path="x/mr")

    def variant(base: InstanceRecord, n: int, **changes: object) -> InstanceRecord:
        return dataclasses.replace(
            base, sop_uid=f"{base.sop_uid}.{n}", rel_path=f"x/{n}", **changes
        )

    batches = [
        [ct],  # new patient, study and series
        [variant(ct, 1), mr],  # a known series beside a new patient's
        # Two instances of a new series in a known study, of another modality.
        [
            variant(ct, 2, series_uid=f"{ct.series_uid}.2", modality="PT"),
            variant(ct, 3, series_uid=f"{ct.series_uid}.2", modality="PT"),
        ],
        # A new study of a known patient, with values of its own ('quotes' and all).
        [
            variant(
                ct,
                4,
                study_uid=f"{ct.study_uid}.4",
                series_uid=f"{ct.series_uid}.4",
                study_description="it's \\ new",
                patient_name="Ignored^Name",
                series_number=None,
            )
        ],
        # A known study under a new series whose record names another patient: the
        # study keeps the patient it was first stored under.
        [variant(mr, 5, series_uid=f"{mr.series_uid}.5", patient_id="ELSEWHERE")],
        # One new patient with two new studies, one of them with two new series, one
        # without a modality; values beyond ASCII.
        [
            variant(
                mr,
                6 + n,
                patient_id="NEU",
                patient_name="Müller^Jürgen",
                study_uid=f"{mr.study_uid}.{6 + n // 2}",
                series_uid=f"{mr.series_uid}.{6 + n}",
                modality=["", "OT", "MR"][n],
            )
            for n in range(3)
        ],
        # Series enough that ModalitiesInStudy is cut at its 160 characters.
        [
            variant(ct, 20 + n, series_uid=f"{ct.series_uid}.{20 + n}", modality=f"M{n:015d}")
            for n in range(11)
        ],
    ]
    if db_url.startswith("sqlite"):
        other = db_url.replace("index.sqlite", "other.sqlite")
        schema.upgrade(other)
    else:
        postgres = request.getfixturevalue("postgres")
        other = _create_database(postgres, request.getfixturevalue("postgres_template"))
    engines = [make_engine(db_url), make_engine(other)]
    by_orm, by_fast = engines
    try:
        for batch in batches:
            _apply(by_orm, batch, "keep-first")
            stored = [IngestOutcome(r.sop_uid, stored=True) for r in batch]
            assert _fast_commit(by_fast, batch) == stored
        assert _rows(by_fast) == _rows(by_orm)
        _consistent(by_fast)
        with Session(by_fast) as session:
            assert session.scalar(select(func.count()).select_from(Patient)) == 3
            by_study = dict(session.execute(select(Study.study_uid, Study.modalities)).all())
            assert len(by_study[ct.study_uid]) == 160  # CT, 11 of M..., no room for PT
            assert by_study[ct.study_uid].startswith("CT\\M000000000000000\\M")
            assert by_study[f"{mr.study_uid}.6"] == "OT"
            assert by_study[f"{mr.study_uid}.7"] == "MR"
    finally:
        for engine in engines:
            engine.dispose()


@pytest.fixture
def pg_engine(postgres: PostgresServer, postgres_template: str) -> Iterator[Engine]:
    """An engine on a fresh PostgreSQL index (for what only PostgreSQL does)."""
    engine = make_engine(_create_database(postgres, postgres_template))
    yield engine
    engine.dispose()


def test_postgresql_fast_path_commits_into_series_it_knows_in_one_query(
    pg_engine: Engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine = pg_engine
    ct, mr = _record(), _record("MR_small.dcm", rel_path="x/mr")
    _apply(engine, [ct, mr], "keep-first")  # two patients, studies and series
    one_query: list[bool] = []
    real = PostgresCommit._commit_known

    def known(self: PostgresCommit, cursor: object, batch: object) -> bool:
        done = real(self, cursor, batch)  # type: ignore[arg-type]
        one_query.append(done)
        return done

    monkeypatch.setattr(PostgresCommit, "_commit_known", known)

    def more(base: InstanceRecord, n: int) -> InstanceRecord:
        return dataclasses.replace(base, sop_uid=f"{base.sop_uid}.{n}", rel_path=f"x/{n}")

    by_orm = more(ct, 9)
    _apply(engine, [by_orm], "keep-first")
    with write_engine(engine).connect() as connection:
        fast = FastPath(connection, "host~1~run")
        assert fast.postgres is not None
        known_chains = fast.postgres._chains
        # The first batch looks its series up; the next ones know them.
        assert fast.commit([more(ct, 1), more(mr, 1)], [None, "s" * 32], []) is not None
        batch = [more(ct, 2), more(mr, 2), more(ct, 3)]
        assert fast.commit(batch, ["t" * 32, None, None], ["s" * 32]) is not None
        assert one_query == [False, True]
        _consistent(engine)
        assert _instance_columns(engine, more(ct, 2).sop_uid) == _instance_columns(
            engine, by_orm.sop_uid
        )
        with Session(engine) as session:
            assert sorted(session.scalars(select(Series.num_instances))) == [3, 5]
            assert session.scalars(select(UnsyncedFile.token)).all() == ["t" * 32]
        # A duplicate trips the guard: nothing of the batch is written, and no warning.
        assert fast.commit([more(ct, 4), more(ct, 1)], [None, None], []) is None
        assert one_query[-1] is False
        assert counts(engine)["instances"] == 8
        _consistent(engine)
        # Ids that now name other rows (tables made anew under a running node): the
        # chain check refuses them, and the lookup files the batch where it belongs.
        known_chains[ct.series_uid] = known_chains[mr.series_uid]
        assert fast.commit([more(ct, 5)], [None], []) is not None
        assert one_query[-1] is False
        _consistent(engine)
        with Session(engine) as session:
            assert sorted(session.scalars(select(Series.num_instances))) == [3, 6]
        # Another node pruned the series (its instances withdrawn): the foreign key fails,
        # the chain is forgotten, and the two-query path makes the series anew.
        stale = known_chains[ct.series_uid]
        with write_session(engine) as session, session.begin():
            rows = session.execute(select(Instance.sop_uid, Instance.rel_path)).all()
            for sop_uid, rel_path in rows:
                withdraw(session, sop_uid, rel_path)
        assert counts(engine)["series"] == 0
        assert fast.commit([more(ct, 6)], [None], []) is not None
        assert one_query[-1] is False
        assert known_chains[ct.series_uid] != stale
        assert counts(engine)["series"] == 1
        # The batches ran the statements prepared on the connection, not their text.
        dbapi = connection.connection.dbapi_connection
        held = dbapi.execute(
            "SELECT name, generic_plans + custom_plans FROM pg_prepared_statements"
            " WHERE name LIKE 'minipacs%'"
        ).fetchall()
        dbapi.rollback()
        assert sorted(dict(held)) == sorted(_PREPARED)
        # Prepared again after a rollback made psycopg DEALLOCATE ALL, or not: run once at least.
        assert dict(held)[_NAMES["instances"]] >= 1
        # A session that lost them (DISCARD ALL) has them prepared again.
        dbapi.autocommit = True
        dbapi.execute("DISCARD ALL")
        dbapi.autocommit = False
        assert fast.commit([more(ct, 7)], [None], []) is not None
        assert one_query[-1] is True
        assert counts(engine)["instances"] == 2
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    _consistent(engine)


def test_postgresql_fast_path_refuses_values_longer_than_their_column(pg_engine: Engine) -> None:
    # The ORM path fails such a value (value too long); the fast path must not cut it.
    first = _record()
    _apply(pg_engine, [first], "keep-first")
    long = dataclasses.replace(
        first, sop_uid=f"{first.sop_uid}.1", rel_path="x/1", calling_ae="A" * 20
    )
    assert _fast_commit(pg_engine, [long]) is None
    with Session(pg_engine) as session:
        assert session.scalars(select(Instance.calling_ae)).all() == [first.calling_ae]


@pytest.mark.parametrize("level", ["patient", "study", "series"])
def test_postgresql_fast_path_takes_rows_another_node_made_meanwhile(
    pg_engine: Engine, monkeypatch: pytest.MonkeyPatch, level: str
) -> None:
    # Another node commits the same new patient, study or series between this node's
    # lookup and its insert: the insert gives way (ON CONFLICT) and the row is read back.
    engine = pg_engine
    ours = _record()
    theirs = dataclasses.replace(ours, sop_uid=f"{ours.sop_uid}.9", rel_path="x/theirs")
    if level == "patient":
        theirs = dataclasses.replace(theirs, study_uid="1.2.9", series_uid="1.2.9.1")
    elif level == "study":
        theirs = dataclasses.replace(theirs, series_uid="1.2.9.1")
    hook = {"patient": "_insert", "study": "_patient"}.get(level)
    other = make_engine(engine.url.render_as_string(hide_password=False))

    def meanwhile() -> None:
        if not other_done:
            other_done.append(True)
            _apply(other, [theirs], "keep-first")

    other_done: list[bool] = []
    if hook is None:
        real_create = PostgresCommit._create_chains

        def create(self: PostgresCommit, *args: object) -> object:
            meanwhile()
            return real_create(self, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(PostgresCommit, "_create_chains", create)
    else:
        real = getattr(PostgresCommit, hook)

        def hooked(self: PostgresCommit, *args: object) -> object:
            meanwhile()
            return real(self, *args)

        monkeypatch.setattr(PostgresCommit, hook, hooked)
    try:
        assert _fast_commit(engine, [ours]) == [IngestOutcome(ours.sop_uid, stored=True)]
        assert other_done
        assert counts(engine)["instances"] == 2
        assert counts(engine)["patients"] == 1
        assert counts(engine)["series"] == (1 if level == "series" else 2)
        _consistent(engine)
    finally:
        other.dispose()


@pytest.mark.parametrize("path", ["fast", "orm"])
def test_modalities_in_study_count_a_series_another_node_adds_at_once(
    pg_engine: Engine, path: str
) -> None:
    # Node B has added an MR series to the study, not yet committed, when node A adds a
    # PT series: A waits for B's row locks, and what it writes last must hold all three.
    engine = pg_engine
    ct = _record()
    _apply(engine, [ct], "keep-first")

    def series(n: int, modality: str) -> InstanceRecord:
        return dataclasses.replace(
            ct,
            sop_uid=f"{ct.sop_uid}.{n}",
            rel_path=f"x/{n}",
            series_uid=f"{ct.series_uid}.{n}",
            modality=modality,
        )

    done = threading.Event()

    def node_a() -> None:
        if path == "fast":
            assert _fast_commit(engine, [series(2, "PT")]) is not None
        else:
            assert _apply(engine, [series(2, "PT")], "keep-first")[0].stored
        done.set()

    with write_session(engine) as held:
        with held.begin():
            apply_records(held, [series(1, "MR")], "keep-first")
            a = threading.Thread(target=node_a)
            a.start()
            assert not done.wait(1.0), "node A did not wait for node B's row locks"
        a.join(30)
    assert done.is_set()
    with Session(engine) as session:
        assert session.scalar(select(Study.modalities)) == "CT\\MR\\PT"
    _consistent(engine)


def test_fast_path_leaves_duplicates_to_the_orm(engine: Engine) -> None:
    first = _record()
    _apply(engine, [first], "keep-first")
    new = dataclasses.replace(first, sop_uid=f"{first.sop_uid}.1")
    new_series = dataclasses.replace(
        first, sop_uid=f"{first.sop_uid}.2", series_uid=f"{first.series_uid}.9"
    )
    assert _fast_commit(engine, [new, first]) is None
    assert _fast_commit(engine, [new, new]) is None
    assert _fast_commit(engine, [new_series, first]) is None
    # Nothing of a declined batch was kept, not even the series it would have made.
    assert counts(engine)["instances"] == 1
    assert counts(engine)["series"] == 1
    _consistent(engine)
    outcomes, _ = _submit_all(engine, [new, new_series, first])
    assert [o.stored for o in outcomes] == [True, True, False]
    assert counts(engine)["instances"] == 3
    _consistent(engine)


def test_a_fast_path_batch_failing_after_creating_rows_leaves_none_of_them(
    engine: Engine,
) -> None:
    first = _record()
    fresh = dataclasses.replace(first, sop_uid=f"{first.sop_uid}.1", series_uid="1.2.3.9")
    # An instance row the database refuses (SOP Class UID is NOT NULL), after the new
    # patient, study and series of the batch's first record were inserted.
    bad = dataclasses.replace(first, sop_uid=f"{first.sop_uid}.2", sop_class_uid=None)
    assert _fast_commit(engine, [fresh, bad]) is None
    assert set(counts(engine).values()) == {0}
    outcomes, _ = _submit_all(engine, [fresh, first])
    assert [o.stored for o in outcomes] == [True, True]
    _consistent(engine)
