"""The index schema's version, owned by alembic (migrations/) and configured in code.

There is no alembic.ini: the script location is the repository's ``migrations`` folder
next to the package, and the database URL comes from minipacs' own configuration.
Policy: an embedded SQLite index may upgrade itself at start; a shared PostgreSQL index
is upgraded only by an operator (``minipacs db upgrade``), never by a node starting up,
since other nodes running older code may be using it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Engine

import minipacs
from minipacs.index.db import is_sqlite, make_engine, normalise_url
from minipacs.index.models import Base

MIGRATIONS = Path(minipacs.__file__).resolve().parent.parent / "migrations"


class SchemaOutOfDate(Exception):
    """The database schema is not at the revision this code needs."""


def alembic_config(url: str) -> Config:
    """An alembic Config pointing at our migrations and this database."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation: a literal % (e.g. in a password) must be doubled.
    config.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return config


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config("sqlite://"))


def head() -> str:
    """The newest revision this code knows."""
    revision = _script().get_current_head()
    if revision is None:
        raise RuntimeError(f"no alembic revisions found in {MIGRATIONS}")
    return revision


def _engine(target: str | Engine) -> tuple[Engine, bool]:
    """An engine for a URL (ours to dispose) or the given engine (the caller's)."""
    if isinstance(target, Engine):
        return target, False
    return make_engine(target, pool_size=1), True


def current(target: str | Engine) -> str | None:
    """The revision the database is at, or None for an empty database."""
    engine, owned = _engine(target)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        if owned:
            engine.dispose()


def is_up_to_date(target: str | Engine) -> bool:
    """Whether the database is at this code's head revision."""
    return current(target) == head()


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database up to a revision (head by default)."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Migrate the database down to a revision ("base" empties it)."""
    command.downgrade(alembic_config(url), revision)


def differences(target: str | Engine) -> list[Any]:
    """What autogenerate would change to make the database match the models (`alembic check`)."""
    engine, owned = _engine(target)
    try:
        with engine.connect() as connection:
            return compare_metadata(MigrationContext.configure(connection), Base.metadata)
    finally:
        if owned:
            engine.dispose()


def upgrade_command(config_path: str | Path | None) -> str:
    """The command an operator runs to upgrade the schema of this configuration."""
    return f"minipacs db upgrade --config {config_path or '<path of your minipacs.toml>'}"


def ensure_schema(
    url: str,
    auto_upgrade: bool,
    engine: Engine | None = None,
    config_path: str | Path | None = None,
) -> None:
    """Upgrade an embedded SQLite index if allowed; otherwise refuse an out-of-date schema."""
    at = current(engine or url)
    wanted = head()
    if at == wanted:
        return
    if at is not None:
        try:
            _script().get_revision(at)
        except CommandError:
            raise SchemaOutOfDate(
                f"index schema is at revision {at}, which this minipacs does not know "
                f"(its newest is {wanted}): the database was upgraded by a newer minipacs; "
                "run that version"
            ) from None
    if auto_upgrade and is_sqlite(url):
        upgrade(url)
        return
    raise SchemaOutOfDate(
        f"index schema is at revision {at or '(empty database)'}, this minipacs needs "
        f"{wanted}: run `{upgrade_command(config_path)}` first"
    )
