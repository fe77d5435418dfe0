"""The SQL index on SQLite and PostgreSQL: schema, ingest, duplicates, group commit."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from pydicom import dcmread
from sqlalchemy import func, select

from minipacs.index import schema
from minipacs.index.db import make_engine
from minipacs.index.ingest import IngestError, InstanceRecord, record_from_dataset
from minipacs.index.models import Base, Instance, Patient, Series, Study
from minipacs.index.writer import IndexUnavailable, IndexWriter

DATA = Path(pydicom.data.__file__).parent


def _record(name: str, **changes: object) -> InstanceRecord:
    ds = dcmread(DATA / name, stop_before_pixels=True)
    record = record_from_dataset(
        ds,
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        rel_path=f"x/{name}",
        size=123,
        calling_ae="TEST",
        received_at=datetime.now(UTC),
    )
    return dataclasses.replace(record, **changes)


def _submit_all(url: str, records: list[InstanceRecord], policy: str = "keep-first") -> list:
    async def run() -> list:
        writer = IndexWriter(make_engine(url), policy)
        writer.start()
        try:
            return await asyncio.gather(
                *(writer.submit(r) for r in records), return_exceptions=True
            )
        finally:
            await writer.close()

    return asyncio.run(asyncio.wait_for(run(), 120))


def _count(url: str, model: type) -> int:
    engine = make_engine(url)
    with engine.connect() as connection:
        return int(connection.scalar(select(func.count()).select_from(model)) or 0)


def test_migration_matches_models(db_url: str) -> None:
    engine = make_engine(db_url)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []
    assert schema.current(engine) == schema.head()


def test_non_ascii_names_are_decoded_and_normalised() -> None:
    record = _record("charset_files/chrH31.dcm")
    assert record.patient_name == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert _record("charset_files/chrRuss.dcm").patient_name.startswith("Люкceмбypг")
    assert "00100010" in record.header


def test_missing_uid_is_an_ingest_error() -> None:
    ds = dcmread(DATA / "test_files/CT_small.dcm", stop_before_pixels=True)
    del ds.StudyInstanceUID
    with pytest.raises(IngestError, match="StudyInstanceUID"):
        record_from_dataset(
            ds,
            transfer_syntax_uid="1.2.840.10008.1.2",
            rel_path="a",
            size=1,
            calling_ae="X",
            received_at=datetime.now(UTC),
        )


def test_ingest_counts_and_modalities(db_url: str) -> None:
    ct = _record("test_files/CT_small.dcm")
    second = dataclasses.replace(ct, sop_uid=ct.sop_uid + ".2", modality="CT")
    other_series = dataclasses.replace(
        ct, sop_uid=ct.sop_uid + ".3", series_uid=ct.series_uid + ".9", modality="SR"
    )
    outcomes = _submit_all(db_url, [ct, second, other_series])
    assert all(o.stored for o in outcomes)
    engine = make_engine(db_url)
    with engine.connect() as connection:
        study = connection.execute(select(Study)).one()
        assert (study.num_series, study.num_instances, study.modalities) == (2, 3, "CT\\SR")
        patient = connection.execute(select(Patient)).one()
        assert (patient.num_studies, patient.num_series, patient.num_instances) == (1, 2, 3)


@pytest.mark.parametrize("policy", ["keep-first", "replace", "reject"])
def test_duplicate_policies(db_url: str, policy: str) -> None:
    first = _record("test_files/MR_small.dcm")
    again = dataclasses.replace(first, rel_path="elsewhere/mr.dcm", size=999)
    outcomes = _submit_all(db_url, [first], policy) + _submit_all(db_url, [again], policy)
    assert _count(db_url, Instance) == 1
    engine = make_engine(db_url)
    with engine.connect() as connection:
        row = connection.execute(select(Instance.rel_path, Instance.size)).one()
        series = connection.execute(select(Series.num_instances)).scalar_one()
    assert series == 1
    if policy == "replace":
        assert tuple(row) == ("elsewhere/mr.dcm", 999)
        assert outcomes[1].stored and outcomes[1].stale_path == first.rel_path
    else:
        assert tuple(row) == (first.rel_path, 123)
        assert outcomes[1].duplicate and not outcomes[1].stored
        assert outcomes[1].rejected == (policy == "reject")


def test_group_commit_of_500_concurrent_records(db_url: str) -> None:
    base = _record("test_files/CT_small.dcm")
    records = [
        dataclasses.replace(
            base,
            sop_uid=f"{base.sop_uid}.{i}",
            series_uid=f"{base.series_uid}.{i % 3}.{i % 7}",
            study_uid=f"{base.study_uid}.{i % 3}",
        )
        for i in range(500)
    ]
    # A header that cannot be serialised fails its own commit and nobody else's.
    bad = dataclasses.replace(base, sop_uid="9.9.9", header={"bad": {1, 2}})
    outcomes = _submit_all(db_url, [*records[:250], bad, *records[250:]])
    failures = [o for o in outcomes if isinstance(o, Exception)]
    assert len(failures) == 1 and isinstance(failures[0], IndexUnavailable)
    assert outcomes[250] is failures[0]
    assert _count(db_url, Instance) == 500
    assert _count(db_url, Series) == 21
    assert _count(db_url, Study) == 3


def test_out_of_date_schema_is_refused_with_the_command_to_run(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    make_engine(url).connect().close()
    with pytest.raises(schema.SchemaOutOfDate, match="minipacs db upgrade"):
        schema.ensure_schema(url, auto_upgrade=False)
    schema.ensure_schema(url, auto_upgrade=True)
    assert schema.current(make_engine(url)) == schema.head()


def test_postgres_is_never_auto_upgraded(postgres: object) -> None:
    url = postgres.create_database()  # type: ignore[attr-defined]
    with pytest.raises(schema.SchemaOutOfDate, match="minipacs db upgrade"):
        schema.ensure_schema(url, auto_upgrade=True)
    schema.upgrade(url)
    schema.ensure_schema(url, auto_upgrade=True)
