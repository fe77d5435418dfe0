"""The `minipacs` command: parses arguments, loads settings, then calls into the app.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from minipacs.config import ConfigError, Settings, load_settings

DEFAULT_CONFIG = Path("config/minipacs.toml")
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


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


def _serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from minipacs.app import run
    from minipacs.logs import configure_logging

    configure_logging(settings.log)
    return run(settings)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="minipacs",
        description="minipacs: an asyncio DICOM archive (C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET).",
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `minipacs` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"minipacs: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
