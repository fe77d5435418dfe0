"""`minipacs check`: can this configuration serve? Database, schema, store, free space, TLS.

Each check reports one line an operator can act on; none changes anything (the schema is
never migrated here, and the store probe is a temp file removed at once).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from minipacs.config import ConfigError, Settings
from minipacs.index import schema
from minipacs.index.db import is_sqlite, make_engine


@dataclass(frozen=True)
class Check:
    """One check's outcome: what was checked, whether it passed, and the detail."""

    name: str
    ok: bool
    detail: str


def _database(settings: Settings) -> Iterator[Check]:
    url = settings.database.url
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        yield Check("database", True, f"{engine.url.render_as_string(hide_password=True)}")
        at, wanted = schema.current(engine), schema.head()
        if at == wanted:
            yield Check("schema", True, f"at revision {at}")
        elif is_sqlite(url) and settings.database.auto_upgrade and at is None:
            yield Check("schema", True, "empty SQLite index: serve creates it at start")
        else:
            fix = schema.upgrade_command(settings.config_path)
            yield Check("schema", False, f"at revision {at}, needs {wanted}: run `{fix}`")
    except SQLAlchemyError as exc:
        reason = str(exc).strip().splitlines()[0]
        yield Check("database", False, f"cannot reach the index: {reason}")
    finally:
        engine.dispose()


def _writable(folder: Path) -> str | None:
    """Why files cannot be created in folder (creating it if needed), or None."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".check-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        return f"{folder} is not writable: {exc.strerror or exc}"
    return None


def _store(settings: Settings) -> Iterator[Check]:
    for name, folder in (("store", settings.store_dir), ("spool", settings.spool_dir)):
        problem = _writable(folder)
        yield Check(name, problem is None, problem or f"{folder} is writable")
    if settings.store_dir.is_dir():
        free = shutil.disk_usage(settings.store_dir).free
        floor = settings.storage.min_free_bytes
        yield Check(
            "free space",
            free >= floor,
            f"{free} bytes free under {settings.store_dir} (floor {floor})",
        )


def _tls(settings: Settings) -> Iterator[Check]:
    """With [tls] port set: the certificate, key and CA bundle load as the listener's."""
    if not settings.tls.port:
        return
    from minipacs.app import tls_server_context

    try:
        tls_server_context(settings)
    except ConfigError as exc:
        yield Check("tls", False, str(exc))
        return
    yield Check("tls", True, f"{settings.tls.certificate} and its key load (TLS 1.2+)")


CHECKS: tuple[Callable[[Settings], Iterator[Check]], ...] = (_database, _store, _tls)


def run_checks(settings: Settings) -> list[Check]:
    """Every check of a configuration, in order (blocking)."""
    return [check for group in CHECKS for check in group(settings)]
