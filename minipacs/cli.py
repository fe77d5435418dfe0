"""The `minipacs` command: parses arguments, loads settings, then calls into the app.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from alembic.util import CommandError
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from sqlalchemy.exc import SQLAlchemyError

from minipacs.config import ConfigError, Settings, load_settings
from minipacs.index import schema
from minipacs.index.db import make_engine
from minipacs.index.schema import SchemaOutOfDate
from minipacs.index.stats import counts
from minipacs.logs import configure_logging
from minipacs.net.client import AssociationLost, AssociationRefused
from minipacs.ops import smoke
from minipacs.ops.worker import WORKER_ENV
from minipacs.shutdown import stop_signals
from minipacs.storage.filestore import FileStore

DEFAULT_CONFIG = Path("config/minipacs.toml")
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

log = logging.getLogger("minipacs.cli")


def _version() -> str:
    try:
        return version("minipacs")
    except PackageNotFoundError:
        return "unknown"


def _config_path(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    if os.environ.get("MINIPACS_CONFIG"):
        return Path(os.environ["MINIPACS_CONFIG"])
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(_config_path(args.config))


def _settings_and_logging(args: argparse.Namespace) -> Settings:
    settings = _settings(args)
    configure_logging(settings.log)
    # alembic narrates every migration step at INFO; only -v (or [log.levels]) wants that.
    if "alembic" not in settings.log.levels:
        verbose = getattr(args, "verbose", False)
        logging.getLogger("alembic").setLevel(logging.INFO if verbose else logging.WARNING)
    return settings


def _serve(args: argparse.Namespace) -> int:
    # Usually done already by minipacs.__main__, before this module's slow imports.
    stop_signals.install()
    settings = _settings_and_logging(args)
    if settings.server.workers > 1 and WORKER_ENV not in os.environ:
        from minipacs.ops.supervisor import supervise

        return supervise(settings, stop_signals, sys.argv[1:])
    from minipacs.app import run

    return run(settings, stop_signals)


def _print_revisions(url: str) -> bool:
    """Print the database's and the code's revisions; return whether they match."""
    engine = make_engine(url)
    try:
        at = schema.current(engine)
    finally:
        engine.dispose()
    head = schema.head()
    print(f"current: {at or 'base'}")
    print(f"head: {head}")
    return at == head


def _db_upgrade(args: argparse.Namespace) -> int:
    url = _settings_and_logging(args).database.url
    schema.upgrade(url, args.revision)
    _print_revisions(url)
    return EXIT_OK


def _db_downgrade(args: argparse.Namespace) -> int:
    url = _settings_and_logging(args).database.url
    schema.downgrade(url, args.revision)
    _print_revisions(url)
    return EXIT_OK


def _db_current(args: argparse.Namespace) -> int:
    url = _settings_and_logging(args).database.url
    return EXIT_OK if _print_revisions(url) else EXIT_FAILURE


def _progress_printer() -> Callable[[int, int], None]:
    """`done/total files` redrawn in place on a terminal, else a line every 1000 files."""
    tty = sys.stderr.isatty()
    last = 0.0

    def show(done: int, total: int) -> None:
        nonlocal last
        if tty:
            now = time.monotonic()
            # Redrawing for every file would cost more than indexing small files.
            if now - last >= 0.1 or done == total:
                last = now
                end = "\n" if done == total else ""
                print(f"\r{done}/{total} files", end=end, file=sys.stderr, flush=True)
        elif done % 1000 == 0 or done == total:
            print(f"minipacs: reindex {done}/{total} files", file=sys.stderr, flush=True)

    return show


def _reindex(args: argparse.Namespace) -> int:
    settings = _settings_and_logging(args)
    # pydicom is only needed here; keep the other commands' start-up light.
    from minipacs.index.reindex import reindex

    if not settings.store_dir.is_dir():
        print(f"minipacs: store folder {settings.store_dir} does not exist", file=sys.stderr)
        return EXIT_FAILURE
    store = FileStore(
        settings.store_dir,
        settings.spool_dir,
        settings.storage.min_free_bytes,
        settings.storage.fsync,
        settings.storage.flush,
    )
    engine = make_engine(settings.database.url)
    try:
        # Like serve: an embedded SQLite index is migrated, a shared one must be by hand.
        schema.ensure_schema(
            settings.database.url,
            settings.database.auto_upgrade,
            engine,
            config_path=settings.config_path,
        )
        report = reindex(store, engine, _progress_printer())
    finally:
        engine.dispose()
    for rel_path, reason in report.failed:
        print(f"minipacs: cannot index {store.path(rel_path)}: {reason}", file=sys.stderr)
    print(f"indexed {report.indexed} files, {len(report.failed)} unreadable")
    return EXIT_OK if not report.failed else EXIT_FAILURE


def _stats(args: argparse.Namespace) -> int:
    settings = _settings_and_logging(args)
    engine = make_engine(settings.database.url)
    try:
        # Read-only: never migrate, but say so plainly instead of "no such table".
        schema.ensure_schema(settings.database.url, False, engine, config_path=settings.config_path)
        values = counts(engine)
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(values))
    else:
        for key, value in values.items():
            print(f"{key}: {value}")
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from minipacs.ops.check import run_checks

    results = run_checks(settings)
    for check in results:
        print(f"{'ok' if check.ok else 'FAIL':5} {check.name}: {check.detail}")
    return EXIT_OK if all(check.ok for check in results) else EXIT_FAILURE


def _peer(args: argparse.Namespace) -> smoke.Peer:
    return smoke.Peer(args.host, args.port, args.aec, args.aet, args.timeout)


def _client_failure(exc: Exception) -> int:
    print(f"minipacs: {exc}", file=sys.stderr)
    return EXIT_FAILURE


def _echo(args: argparse.Namespace) -> int:
    try:
        status = asyncio.run(smoke.echo(_peer(args)))
    except (AssociationRefused, AssociationLost, TimeoutError) as exc:
        return _client_failure(exc)
    print(f"C-ECHO status 0x{status:04X}")
    return EXIT_OK if status == 0 else EXIT_FAILURE


def _files(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        found.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    return found


def _store(args: argparse.Namespace) -> int:
    files = _files(args.paths)

    async def send() -> int:
        stored = 0
        async for result in smoke.store(_peer(args), files):
            status = "-" if result.status is None else f"0x{result.status:04X}"
            print(f"{status} {result.path}{f' ({result.error})' if result.error else ''}")
            stored += result.status == 0
        return stored

    try:
        stored = asyncio.run(send())
    except (AssociationRefused, AssociationLost, TimeoutError) as exc:
        return _client_failure(exc)
    print(f"stored {stored} of {len(files)} files", file=sys.stderr)
    return EXIT_OK if stored == len(files) else EXIT_FAILURE


def _identifier(level: str, keys: list[str]) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level.upper()
    for key in keys:
        keyword, _, value = key.partition("=")
        if tag_for_keyword(keyword) is None:
            raise ConfigError(f"-k {key}: {keyword!r} is not a DICOM keyword")
        setattr(identifier, keyword, value)
    return identifier


def _find(args: argparse.Namespace) -> int:
    identifier = _identifier(args.level, args.key or [])

    async def query() -> tuple[int, int]:
        matches, final = 0, -1
        async for status, found in smoke.find(_peer(args), identifier, args.patient_root):
            final = status
            if found is not None:
                matches += 1
                print(json.dumps(found.to_json_dict(), ensure_ascii=False))
        return matches, final

    try:
        matches, status = asyncio.run(query())
    except (AssociationRefused, AssociationLost, TimeoutError) as exc:
        return _client_failure(exc)
    print(f"{matches} matches, final status 0x{status:04X}", file=sys.stderr)
    return EXIT_OK if status == 0 else EXIT_FAILURE


def _conformance(args: argparse.Namespace) -> int:
    from minipacs.ops.conformance import conformance_statement

    text = conformance_statement()
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _hash_password(args: argparse.Namespace) -> int:
    from minipacs.passwords import hash_password

    # Read, never taken as an argument: a password on the command line is in `ps` and
    # in the shell's history.
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise ConfigError("hash-password: empty password")
    print(hash_password(password))
    return EXIT_OK


def _add_client_commands(commands: argparse._SubParsersAction) -> None:
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("host", help="address of the DICOM peer")
    client.add_argument("port", type=int, help="its DICOM port")
    client.add_argument("--aec", default="MINIPACS", help="called AE title (default MINIPACS)")
    client.add_argument("--aet", default="MINIPACS-CLI", help="our AE title")
    client.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    echo = commands.add_parser(
        "echo",
        parents=[client],
        help="send a C-ECHO (smoke test)",
        description="Send one C-ECHO; print its status. Exit 0 on Success, 1 otherwise.",
    )
    echo.set_defaults(func=_echo)
    store = commands.add_parser(
        "store",
        parents=[client],
        help="send DICOM files with C-STORE (smoke test)",
        description="Send files (folders are walked) in their own transfer syntax over one "
        "association; print one status line per file. Exit 0 when every file got Success.",
    )
    store.add_argument("paths", nargs="+", metavar="PATH", help="files or folders")
    store.set_defaults(func=_store)
    find = commands.add_parser(
        "find",
        parents=[client],
        help="send a C-FIND and print the matches as DICOM JSON (smoke test)",
        description="Send one C-FIND (Study Root unless -P) and print each match as one "
        "DICOM JSON line. Exit 0 when the final status is Success.",
    )
    find.add_argument("--level", default="STUDY", help="PATIENT, STUDY, SERIES or IMAGE")
    find.add_argument("-P", "--patient-root", action="store_true", help="Patient Root model")
    find.add_argument(
        "-k", "--key", action="append", metavar="KEY=VALUE", help="a key; KEY alone asks for it"
    )
    find.set_defaults(func=_find)


def _add_db_commands(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    database = commands.add_parser(
        "db",
        help="show or migrate the index database schema",
        description="Show or migrate the index schema (alembic revisions) of the database "
        "named by [database] url. A PostgreSQL index shared by several nodes is never "
        "migrated by `serve`: run `minipacs db upgrade` once, before starting the new version.",
    )
    actions = database.add_subparsers(dest="action", required=True, metavar="ACTION")
    upgrade = actions.add_parser(
        "upgrade",
        parents=[common],
        help="migrate the schema up (to the newest revision by default)",
        description="Migrate the index schema up to a revision, then print the current and "
        "head revisions. Exit 1 unless the schema ends at head.",
    )
    upgrade.add_argument("--revision", default="head", metavar="REV", help="default: head")
    upgrade.set_defaults(func=_db_upgrade)
    current = actions.add_parser(
        "current",
        parents=[common],
        help="print the schema's revision and the one this minipacs needs",
        description="Print the index schema's current revision and the head revision this "
        "minipacs needs. Exit 0 if they match, 1 if the schema needs `minipacs db upgrade`.",
    )
    current.set_defaults(func=_db_current)
    downgrade = actions.add_parser(
        "downgrade",
        parents=[common],
        help="migrate the schema down to a revision",
        description="Migrate the index schema down to a revision (`base` drops every "
        "index table; the stored files are untouched and `minipacs reindex` rebuilds them).",
    )
    downgrade.add_argument("revision", metavar="REV", help="target revision, or base")
    downgrade.set_defaults(func=_db_downgrade)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="minipacs",
        description="minipacs: an asyncio DICOM archive.",
    )
    parser.add_argument("--version", action="version", version=f"minipacs {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the DICOM server until SIGTERM/SIGINT",
        description="Run the DICOM server. Settings come from --config (or MINIPACS_CONFIG, "
        "or config/minipacs.toml when present), then MINIPACS_<SECTION>_<KEY> variables.",
    )
    serve.add_argument("--config", metavar="PATH", help="TOML configuration file")
    serve.set_defaults(func=_serve)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", help="TOML configuration file (as for serve)")
    common.add_argument("-v", "--verbose", action="store_true", help="also log each migration step")
    _add_db_commands(commands, common)
    reindex = commands.add_parser(
        "reindex",
        parents=[common],
        help="rebuild the index from the files in the store",
        description="Read every .dcm file under [storage] path and (re)index it, replacing "
        "rows of instances already indexed. Unreadable files are listed on stderr and "
        "skipped. Prints `indexed N files, M unreadable`; exit 1 if M > 0.",
    )
    reindex.set_defaults(func=_reindex)
    stats = commands.add_parser(
        "stats",
        help="print how many patients, studies, series, instances and bytes are indexed",
        description="Print the index's patient, study, series and instance counts and the "
        "total bytes of the indexed files, as `key: value` lines or one JSON object.",
    )
    stats.add_argument("--config", metavar="PATH", help="TOML configuration file (as for serve)")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.set_defaults(func=_stats)
    check = commands.add_parser(
        "check",
        help="check configuration, database, schema, store and free space",
        description="Load the configuration, reach the database, compare its schema with "
        "this minipacs, check the store and spool folders are writable and free space is "
        "above storage.min_free_bytes. One line per check; exit 0 when all pass, 1 if any "
        "fails, 2 for a configuration error. Changes nothing.",
    )
    check.add_argument("--config", metavar="PATH", help="TOML configuration file (as for serve)")
    check.set_defaults(func=_check)
    conformance = commands.add_parser(
        "conformance",
        help="print the DICOM Conformance Statement (Markdown)",
        description="Generate the DICOM Conformance Statement (PS3.2 structure) from the "
        "code's own tables: SOP classes, transfer syntaxes, Q/R keys, statuses, defaults.",
    )
    conformance.add_argument("-o", "--output", metavar="PATH", help="write to PATH")
    conformance.set_defaults(func=_conformance)
    hashing = commands.add_parser(
        "hash-password",
        help="print a salted hash of a password, for the [users] table",
        description="Read a password (prompted on a terminal, else the first line of "
        "stdin) and print its salted scrypt hash, the value of a [users] entry for User "
        "Identity negotiation. The password itself is never stored.",
    )
    hashing.set_defaults(func=_hash_password)
    _add_client_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `minipacs` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"minipacs: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (SchemaOutOfDate, CommandError) as exc:
        print(f"minipacs: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except SQLAlchemyError as exc:
        # The driver's message comes first; SQL text and help links follow on more lines.
        print(f"minipacs: database error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        # Port in use, folder not writable...: the message says it all; DEBUG logs the trace.
        log.debug("command failed", exc_info=True)
        print(f"minipacs: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
