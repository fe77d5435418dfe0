"""Schema versioning (alembic, configured in code) and engine settings, on both backends."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import DBAPIError

from minipacs.index import schema
from minipacs.index.db import make_engine, normalise_url
from tests.pgserver import PostgresServer


def test_migrated_database_matches_the_models(db_url: str) -> None:
    # What `alembic check` does: autogenerate finds nothing to change.
    assert schema.differences(db_url) == []
    assert schema.current(db_url) == schema.head()
    assert schema.is_up_to_date(db_url)


def test_downgrade_to_base_and_upgrade_again(db_url: str) -> None:
    schema.downgrade(db_url, "base")
    assert schema.current(db_url) is None
    assert not schema.is_up_to_date(db_url)
    engine = make_engine(db_url)
    try:
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
    schema.upgrade(db_url)
    assert schema.differences(db_url) == []


def test_pattern_indexes_exist_on_postgresql(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            if engine.dialect.name != "postgresql":
                # Same schema on SQLite, where the operator class does not apply.
                names = {i["name"] for i in inspect(connection).get_indexes("patients")}
                assert "ix_patients_patient_name_norm_pattern" in names
                return
            definition = connection.scalar(
                text("SELECT indexdef FROM pg_indexes WHERE indexname = :n"),
                {"n": "ix_patients_patient_name_norm_pattern"},
            )
    finally:
        engine.dispose()
    assert "varchar_pattern_ops" in definition


def test_postgresql_compresses_headers_with_lz4(db_url: str) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite compresses nothing")
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            try:
                with connection.begin():
                    connection.execute(text("SET LOCAL default_toast_compression = 'lz4'"))
            except DBAPIError:
                pytest.skip("this PostgreSQL has no lz4: the migration leaves pglz")
            method = connection.scalar(
                text(
                    "SELECT attcompression FROM pg_attribute"
                    " WHERE attrelid = 'instances'::regclass AND attname = 'header'"
                )
            )
    finally:
        engine.dispose()
    assert method == "l"


def test_sqlite_engine_is_durable_and_strict(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'sub' / 'index.sqlite'}")
    try:
        with engine.connect() as connection:
            pragma = {
                name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            }
    finally:
        engine.dispose()
    assert pragma == {
        "journal_mode": "wal",
        "synchronous": 2,  # FULL
        "foreign_keys": 1,
        "busy_timeout": 30000,
    }


def test_like_is_case_sensitive_on_both_backends(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            assert connection.scalar(text("SELECT 'abc' LIKE 'ABC'")) in (0, False)
            assert connection.scalar(text("SELECT 'ABC' LIKE 'A_C'")) in (1, True)
    finally:
        engine.dispose()


def test_postgresql_urls_use_psycopg_3() -> None:
    assert normalise_url("postgresql://u:p%40ss@db/pacs") == "postgresql+psycopg://u:p%40ss@db/pacs"
    assert normalise_url("postgres://db/pacs") == "postgresql+psycopg://db/pacs"
    assert normalise_url("sqlite:///x.sqlite") == "sqlite:///x.sqlite"


def test_out_of_date_sqlite_upgrades_itself_only_when_allowed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    with pytest.raises(schema.SchemaOutOfDate) as refused:
        schema.ensure_schema(url, auto_upgrade=False, config_path="/etc/minipacs/minipacs.toml")
    assert "run `minipacs db upgrade --config /etc/minipacs/minipacs.toml` first" in str(
        refused.value
    )
    assert schema.current(url) is None
    schema.ensure_schema(url, auto_upgrade=True)
    assert schema.is_up_to_date(url)


def test_postgresql_is_never_upgraded_at_start(postgres: PostgresServer) -> None:
    url = postgres.create_database()
    with pytest.raises(schema.SchemaOutOfDate, match=r"minipacs db upgrade --config"):
        schema.ensure_schema(url, auto_upgrade=True)
    assert schema.current(url) is None
    schema.upgrade(url)
    schema.ensure_schema(url, auto_upgrade=False)


def test_schema_from_a_newer_minipacs_is_refused(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        with pytest.raises(schema.SchemaOutOfDate, match="does not know"):
            schema.ensure_schema(db_url, auto_upgrade=True, engine=engine)
    finally:
        engine.dispose()
