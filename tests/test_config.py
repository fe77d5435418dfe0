"""Settings: the shipped file is the defaults, the environment overrides with types, every
bad value is a one-line error naming its source and key; and the [log] section's effect."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from minipacs.config import (
    AccessSettings,
    ConfigError,
    DatabaseSettings,
    Destination,
    LogSettings,
    ServerSettings,
    Settings,
    StorageSettings,
    TlsSettings,
    load_settings,
)
from minipacs.logs import configure_logging, log_event

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "minipacs.toml"
SECTIONS = {
    "server": ServerSettings,
    "storage": StorageSettings,
    "database": DatabaseSettings,
    "log": LogSettings,
    "tls": TlsSettings,
    "access": AccessSettings,
}


def load_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Settings:
    """Load settings from a file holding text."""
    path = tmp_path / "minipacs.toml"
    path.write_text(text)
    return load_settings(path, environ={} if environ is None else environ)


def error_of(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    """The ConfigError message that loading text (and environ) raises; it is one line."""
    with pytest.raises(ConfigError) as error:
        load_text(tmp_path, text, environ)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_shipped_config_is_the_defaults() -> None:
    assert load_settings(SHIPPED, environ={}) == Settings()


def test_shipped_config_lists_every_key() -> None:
    data = tomllib.loads(SHIPPED.read_text())
    for name, cls in SECTIONS.items():
        assert set(data[name]) == {f.name for f in dataclasses.fields(cls)}, name
    assert data["destinations"] == {}
    assert data["users"] == {}


def test_no_file_and_no_environment_is_the_defaults() -> None:
    settings = load_settings(None, environ={})
    assert settings == Settings()
    assert settings.config_path is None


def test_defaults() -> None:
    settings = Settings()
    assert (settings.server.ae_title, settings.server.port) == ("MINIPACS", 11112)
    assert settings.server.allowed_calling_aes == []
    assert settings.storage.duplicate_policy == "keep-first"
    assert settings.database.url == "sqlite:///./minipacs-data/index.sqlite"
    assert settings.log == LogSettings("INFO", "auto", {})
    assert settings.destinations == {}


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().server.port = 1  # type: ignore[misc]


def test_spool_dir_defaults_into_the_store(tmp_path: Path) -> None:
    assert Settings().spool_dir == Path("./minipacs-data/store/.spool")
    settings = load_text(tmp_path, '[storage]\npath = "/srv/store"\n')
    assert settings.store_dir == Path("/srv/store")
    assert settings.spool_dir == Path("/srv/store/.spool")
    settings = load_text(tmp_path, '[storage]\nspool_path = "/fast/spool"\n')
    assert settings.spool_dir == Path("/fast/spool")


def test_file_values(tmp_path: Path) -> None:
    settings = load_text(
        tmp_path,
        """
[server]
ae_title = "ARCHIVE"
port = 104
allowed_calling_aes = ["CT1", "MR 2"]
artim_timeout = 5
[storage]
duplicate_policy = "reject"
fsync = false
[log.levels]
"minipacs.net" = "DEBUG"
""",
    )
    assert settings.server.ae_title == "ARCHIVE"
    assert settings.server.port == 104
    assert settings.server.allowed_calling_aes == ["CT1", "MR 2"]
    assert settings.server.artim_timeout == 5.0
    assert isinstance(settings.server.artim_timeout, float)
    assert settings.storage.duplicate_policy == "reject"
    assert settings.storage.fsync is False
    assert settings.log.levels == {"minipacs.net": "DEBUG"}
    assert settings.config_path == tmp_path / "minipacs.toml"


def test_environment_overrides_with_types(tmp_path: Path) -> None:
    settings = load_text(
        tmp_path,
        "[server]\nport = 104\n",
        {
            "MINIPACS_SERVER_PORT": "4242",
            "MINIPACS_SERVER_CHECK_CALLED_AE": "false",
            "MINIPACS_SERVER_ALLOWED_CALLING_AES": "CT1, MR2,,",
            "MINIPACS_SERVER_ARTIM_TIMEOUT": "1.5",
            "MINIPACS_DATABASE_URL": "postgresql+psycopg://u:p@db/minipacs",
            "MINIPACS_DATABASE_BATCH_WAIT_MS": "5",
            "MINIPACS_STORAGE_SPOOL_PATH": "",
            "MINIPACS_LOG_LEVELS": "minipacs.net=DEBUG, alembic = info",
            "MINIPACS_CONFIG": "ignored here: the CLI reads it",
            "OTHER_VARIABLE": "ignored",
        },
    )
    assert settings.server.port == 4242
    assert settings.server.check_called_ae is False
    assert settings.server.allowed_calling_aes == ["CT1", "MR2"]
    assert settings.server.artim_timeout == 1.5
    assert settings.database.url == "postgresql+psycopg://u:p@db/minipacs"
    assert settings.database.batch_wait_ms == 5.0
    assert settings.storage.spool_path == ""
    assert settings.log.levels == {"minipacs.net": "DEBUG", "alembic": "info"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        *[("true", True), ("YES", True), ("on", True), ("1", True)],
        *[("False", False), ("no", False), ("off", False), ("0", False)],
    ],
)
def test_environment_booleans(text: str, expected: bool) -> None:
    settings = load_settings(None, environ={"MINIPACS_SERVER_USE_UVLOOP": text})
    assert settings.server.use_uvloop is expected


def test_destinations(tmp_path: Path) -> None:
    settings = load_text(
        tmp_path,
        '[destinations]\nWS1 = { host = "10.0.0.1", port = 104 }\n'
        '[destinations.STORESCP]\nhost = "h"\nport = 11113\ntls = true\n',
    )
    assert settings.destinations == {
        "WS1": Destination("10.0.0.1", 104),
        "STORESCP": Destination("h", 11113, tls=True),
    }


def test_the_documented_message(tmp_path: Path) -> None:
    path = tmp_path / "minipacs.toml"
    assert error_of(tmp_path, '[server]\nport = "abc"\n') == (
        f'{path}: server.port: must be an integer 1-65535, got "abc"'
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Types.
        ('[server]\nport = "4242"\n', 'server.port: must be an integer 1-65535, got "4242"'),
        ("[server]\nport = 4242.0\n", "server.port: must be an integer 1-65535, got 4242.0"),
        ("[server]\nport = true\n", "server.port: must be an integer 1-65535, got true"),
        ('[server]\nartim_timeout = "1"\n', "server.artim_timeout: must be a number 0.1-3600"),
        ('[server]\nuse_uvloop = "yes"\n', 'server.use_uvloop: must be true or false, got "yes"'),
        ("[server]\nhost = 1\n", "server.host: must be a string, got 1"),
        ('[server]\nallowed_calling_aes = "CT1"\n', "allowed_calling_aes: must be a list of"),
        ("[server]\nallowed_calling_aes = [1]\n", "allowed_calling_aes: must be a list of"),
        ("[server.port]\n", "server.port: must be an integer 1-65535, got {}"),
        ("[log]\nlevels = 3\n", "log.levels: must be a table"),
        ("[log.levels]\nx = 3\n", "log.levels: must be a table"),
        # Ranges and choices.
        ("[server]\nport = 0\n", "server.port: must be an integer 1-65535, got 0"),
        ("[server]\nport = 70000\n", "server.port: must be an integer 1-65535, got 70000"),
        ("[server]\nmax_pdu_length = 0\n", "max_pdu_length: must be an integer 4096-134217728,"),
        ("[server]\nmax_associations = 0\n", "server.max_associations: must be an integer 1-"),
        ("[server]\nartim_timeout = 0\n", "server.artim_timeout: must be a number 0.1-3600"),
        ("[server]\nartim_timeout = nan\n", "server.artim_timeout: must be a number"),
        ("[server]\nshutdown_grace = -1\n", "server.shutdown_grace: must be a number 0-3600"),
        ("[storage]\nmin_free_bytes = -1\n", "storage.min_free_bytes: must be an integer >= 0"),
        ('[storage]\nduplicate_policy = "maybe"\n', "must be one of keep-first, replace, reject"),
        ('[log]\nformat = "xml"\n', 'log.format: must be one of auto, json, text, got "xml"'),
        ('[log]\nlevel = "LOUD"\n', "log.level: must be one of DEBUG, INFO, WARNING, ERROR, CRI"),
        ('[log.levels]\n"minipacs.net" = "LOUD"\n', "log.levels: minipacs.net: must be one of"),
        # Strings with rules.
        ('[server]\nae_title = "A\\\\B"\n', "server.ae_title: must be an AE title of printable"),
        ('[server]\nae_title = "A\\tB"\n', "server.ae_title: must be an AE title of printable"),
        ('[server]\nae_title = "ÄRCHIV"\n', "server.ae_title: must be an AE title of printable"),
        ('[server]\nae_title = "WAY_TOO_LONG_AE_TITLE"\n', "server.ae_title: must be an AE"),
        ('[server]\nae_title = ""\n', "server.ae_title: must be an AE title of 1-16"),
        ('[server]\nae_title = "   "\n', "server.ae_title: must be an AE title, not all spaces"),
        ('[server]\nallowed_calling_aes = ["OK", ""]\n', 'item "": must be an AE title'),
        ('[server]\nhost = ""\n', "server.host: must not be empty"),
        ('[storage]\npath = ""\n', "storage.path: must not be empty"),
        ('[database]\nurl = "index.sqlite"\n', "database.url: must be a sqlite:///PATH or"),
        # Unknown names.
        ("[server]\nbogus = 1\n", "server.bogus: unknown key"),
        ("[server]\nprot = 1\n", "server.prot: unknown key (did you mean port?)"),
        ("[nonsense]\n", "[nonsense]: unknown section"),
        ("[sever]\nport = 1\n", "[sever]: unknown section (did you mean server?)"),
        ("server = 1\n", "server: must be a table [server], got 1"),
        # Destinations.
        ("destinations = 1\n", "destinations: must be a table"),
        ("[destinations]\nWS = 1\n", "destinations.WS: must be a table {host, port, tls}"),
        ('[destinations]\nWS = { host = "h", port = 0 }\n', "destinations.WS.port: must be an"),
        ('[destinations]\nWS = { host = "h" }\n', "destinations.WS.port: missing"),
        ("[destinations]\nWS = { port = 104 }\n", "destinations.WS.host: missing"),
        ('[destinations]\nWS = { host = "", port = 104 }\n', "destinations.WS.host: must not be"),
        ('[destinations]\nWS = { host = "h", port = 1, tls = 1 }\n', "WS.tls: must be true or"),
        ('[destinations]\nWS = { host = "h", port = 1, x = 1 }\n', "destinations.WS.x: unknown"),
        ('[destinations]\n"A\\\\B" = { host = "h", port = 1 }\n', "must be an AE title of print"),
        # Syntax.
        ("[server\n", "invalid TOML: "),
        ("[server]\nport = \n", "invalid TOML: "),
        ("[server]\nport = 1\nport = 2\n", "invalid TOML: "),
    ],
)
def test_bad_file_values_are_one_line_errors(tmp_path: Path, text: str, expected: str) -> None:
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'minipacs.toml'}: ")
    assert expected in message


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("MINIPACS_SERVER_PORT", "x", 'server.port: must be an integer 1-65535, got "x"'),
        ("MINIPACS_SERVER_PORT", "", 'server.port: must be an integer 1-65535, got ""'),
        ("MINIPACS_SERVER_PORT", "1.5", "server.port: must be an integer"),
        ("MINIPACS_SERVER_PORT", "99999", 'server.port: must be an integer 1-65535, got "99999"'),
        ("MINIPACS_SERVER_IDLE_TIMEOUT", "soon", "server.idle_timeout: must be a number"),
        ("MINIPACS_SERVER_IDLE_TIMEOUT", "inf", "server.idle_timeout: must be a number"),
        ("MINIPACS_SERVER_USE_UVLOOP", "maybe", "server.use_uvloop: must be true or false"),
        ("MINIPACS_SERVER_AE_TITLE", "A\\B", "server.ae_title: must be an AE title"),
        ("MINIPACS_SERVER_ALLOWED_CALLING_AES", "CT1,ABCDEFGHIJKLMNOPQ", 'item "ABCDEFGH'),
        ("MINIPACS_STORAGE_DUPLICATE_POLICY", "newest", "storage.duplicate_policy: must be"),
        ("MINIPACS_LOG_LEVELS", "minipacs.net", "log.levels: must be a table of name = string"),
        ("MINIPACS_LOG_LEVELS", "=DEBUG", "log.levels: must be a table of name = string"),
        ("MINIPACS_LOG_LEVELS", "a=LOUD", "log.levels: a: must be one of DEBUG"),
        ("MINIPACS_SERVER_BOGUS", "1", "server.bogus: unknown key"),
        ("MINIPACS_SERVR_PORT", "1", "unknown setting, expected MINIPACS_<SECTION>_<KEY>"),
        ("MINIPACS_DESTINATIONS_WS", "h:104", "destinations can only be set in the config"),
    ],
)
def test_bad_environment_values_are_one_line_errors(
    tmp_path: Path, name: str, value: str, expected: str
) -> None:
    message = error_of(tmp_path, "", {name: value})
    assert message.startswith(f"{name}: ")
    assert expected in message


def test_environment_wins_over_the_file_also_for_errors(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[server]\nport = 104\n", {"MINIPACS_SERVER_PORT": "x"})
    assert message.startswith("MINIPACS_SERVER_PORT: server.port: ")


def test_database_url_is_never_shown(tmp_path: Path) -> None:
    message = error_of(tmp_path, "", {"MINIPACS_DATABASE_URL": "mysql://me:s3cret@db/x"})
    assert "s3cret" not in message
    settings = load_settings(None, environ={"MINIPACS_DATABASE_URL": "postgresql://me:s3cret@h/x"})
    assert "s3cret" not in repr(settings)


def test_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=f"^{missing}: file not found$"):
        load_settings(missing, environ={})
    with pytest.raises(ConfigError, match=f"^{tmp_path}: cannot read: "):
        load_settings(tmp_path, environ={})
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('[server]\nae_title = "ÄRCHIV"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=f"^{latin1}: not UTF-8 text$"):
        load_settings(latin1, environ={})


# [log]: what configure_logging makes of it.


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the root logger and warnings capture back as they were."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level
    logging.captureWarnings(False)
    for name in ("minipacs.test.quiet", "minipacs.test.loud"):
        logging.getLogger(name).setLevel(logging.NOTSET)


@pytest.mark.usefixtures("restore_logging")
def test_json_logs_have_the_fields_at_top_level() -> None:
    stream = io.StringIO()
    configure_logging(LogSettings(format="auto"), stream)  # StringIO is not a terminal
    log_event(
        logging.getLogger("minipacs.test"),
        "association.accepted",
        peer="127.0.0.1:5555",
        calling_ae="CT1",
        contexts=3,
        name="field named like a LogRecord attribute",
        time="field named like a core key",
        missing=None,
    )
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["event"] == "association.accepted"
    assert entry["level"] == "INFO"
    assert entry["logger"] == "minipacs.test"
    assert entry["time"].endswith("+00:00")
    assert entry["peer"] == "127.0.0.1:5555"
    assert entry["calling_ae"] == "CT1"
    assert entry["contexts"] == 3
    assert entry["name"] == "field named like a LogRecord attribute"
    assert entry["time_"] == "field named like a core key"
    assert "missing" not in entry


@pytest.mark.usefixtures("restore_logging")
def test_json_logs_carry_exceptions_on_one_line() -> None:
    stream = io.StringIO()
    configure_logging(LogSettings(format="json"), stream)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("minipacs.test").exception("failed")
    (line,) = stream.getvalue().splitlines()
    assert "ValueError: boom" in json.loads(line)["exception"]


@pytest.mark.usefixtures("restore_logging")
def test_text_logs() -> None:
    stream = io.StringIO()
    configure_logging(LogSettings(format="text"), stream)
    log_event(logging.getLogger("minipacs.test"), "store.done", sop="1.2.3", note="two words")
    line = stream.getvalue().rstrip("\n")
    assert line.split()[1:4] == ["INFO", "minipacs.test", "store.done"]
    assert line.endswith(' sop=1.2.3 note="two words"')


@pytest.mark.usefixtures("restore_logging")
def test_levels_overall_and_per_logger() -> None:
    stream = io.StringIO()
    settings = LogSettings(level="warning", format="json", levels={"minipacs.test.loud": "debug"})
    configure_logging(settings, stream)
    log_event(logging.getLogger("minipacs.test.quiet"), "hidden")
    log_event(logging.getLogger("minipacs.test.quiet"), "shown", level=logging.WARNING)
    log_event(logging.getLogger("minipacs.test.loud.child"), "detail", level=logging.DEBUG)
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert events == ["shown", "detail"]
