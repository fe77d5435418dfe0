"""The index schema's version, owned by alembic (migrations/), configured in code."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from minipacs.index.db import is_sqlite, make_engine, normalise_url

MIGRATIONS = Path(__file__).resolve().parent.parent.parent / "migrations"


class SchemaOutOfDate(Exception):
    """The database schema is not at the revision this code needs."""


def alembic_config(url: str) -> Config:
    """An alembic Config pointing at our migrations and this database."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return config


def head() -> str:
    """The newest revision the code knows."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    revision = script.get_current_head()
    assert revision is not None
    return revision


def current(engine: Engine) -> str | None:
    """The revision the database is at, or None for an empty database."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database up to a revision."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Migrate the database down to a revision."""
    command.downgrade(alembic_config(url), revision)


def ensure_schema(url: str, auto_upgrade: bool, engine: Engine | None = None) -> None:
    """Upgrade an embedded SQLite index; refuse to run on an out-of-date shared one."""
    engine = engine or make_engine(url)
    at = current(engine)
    if at == head():
        return
    if auto_upgrade and is_sqlite(url):
        upgrade(url)
        return
    raise SchemaOutOfDate(
        f"index schema is at {at or 'nothing'}, this minipacs needs {head()}: "
        "run `minipacs db upgrade` (with the same --config) first"
    )
