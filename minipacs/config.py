"""One Settings object: a TOML file, then MINIPACS_<SECTION>_<KEY> environment variables.

Every key, its type, default and allowed values are declared once, in the dataclasses
below. Loading checks each value and reports the first problem as one line naming where
the value came from (file or environment variable), the key and what is wrong, e.g.
``config/minipacs.toml: server.port: must be an integer 1-65535, got "abc"``.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from minipacs.passwords import password_hash_problem

ENV_PREFIX = "MINIPACS_"
# Variables with our prefix that name no setting; any other MINIPACS_* must name one.
ENV_RESERVED = frozenset({"MINIPACS_CONFIG"})
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class ConfigError(Exception):
    """A configuration problem, stated in one line."""


def ae_title_problem(value: str) -> str | None:
    """Why value is not a valid AE title (PS3.5 AE: 1-16 characters), or None."""
    if not 1 <= len(value) <= 16:
        return "must be an AE title of 1-16 characters"
    if not value.strip(" "):
        return "must be an AE title, not all spaces"
    if "\\" in value or any(not " " <= c <= "~" for c in value):
        return "must be an AE title of printable ASCII characters without backslash"
    return None


def _not_empty(value: str) -> str | None:
    return None if value else "must not be empty"


def _network(value: str) -> str | None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return "must be an IP address or a CIDR block such as 10.1.0.0/16"
    return None


# The services [access.<AE>] rules name (minipacs.net.access.SERVICES, not imported: the
# settings depend on nothing of the network layer).
ACCESS_SERVICES = ("echo", "store", "find", "move", "get")


def _service(value: str) -> str | None:
    return None if value in ACCESS_SERVICES else f"must be one of {', '.join(ACCESS_SERVICES)}"


def _log_level(value: str) -> str | None:
    return None if value.upper() in LOG_LEVELS else f"must be one of {', '.join(LOG_LEVELS)}"


def _database_url(value: str) -> str | None:
    scheme = value.partition("://")[0].partition("+")[0]
    if "://" in value and scheme in ("sqlite", "postgresql", "postgres"):
        return None
    # Never echo the value: it may carry a password.
    return "must be a sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB URL"


@dataclass(frozen=True)
class _Rule:
    """How one key is checked beyond its type."""

    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None
    # For lists and tables: a check of each item (list) or each value (table).
    item: Callable[[str], str | None] | None = None
    secret: bool = False


def _key(default: Any = dataclasses.MISSING, **rule: Any) -> Any:
    """A settings field with its default (none: required) and its _Rule."""
    metadata = {"rule": _Rule(**rule)}
    # A secret (a URL with a password) stays out of repr(settings), hence out of logs.
    shown = not rule.get("secret", False)
    if isinstance(default, list | dict):
        return field(default_factory=lambda: default.copy(), repr=shown, metadata=metadata)
    return field(default=default, repr=shown, metadata=metadata)


@dataclass(frozen=True)
class ServerSettings:
    """[server]: the DICOM listener and its limits."""

    ae_title: str = _key("MINIPACS", check=ae_title_problem)
    host: str = _key("0.0.0.0", check=_not_empty)
    port: int = _key(11112, low=1, high=65535)
    check_called_ae: bool = _key(True)
    allowed_calling_aes: list[str] = _key([], item=ae_title_problem)
    max_associations: int = _key(400, low=1, high=100_000)
    max_pdu_length: int = _key(1_048_576, low=4096, high=134_217_728)
    max_associate_rq_length: int = _key(1_048_576, low=4096, high=16_777_216)
    artim_timeout: float = _key(30.0, low=0.1, high=3600)
    idle_timeout: float = _key(300.0, low=0.1, high=86_400)
    shutdown_grace: float = _key(30.0, low=0, high=3600)
    spool_threshold: int = _key(8_388_608, low=65_536, high=1 << 31)
    max_associations_per_ae: int = _key(0, low=0, high=100_000)
    associations_per_minute: int = _key(0, low=0, high=1_000_000)
    max_pending_connections: int = _key(512, low=1, high=100_000)
    max_dataset_size: int = _key(4_294_967_296, low=65_536, high=1 << 40)
    use_uvloop: bool = _key(True)
    workers: int = _key(1, low=1, high=64)
    pin_cpu: bool = _key(False)
    worker_timeout: float = _key(30.0, low=1, high=3600)


@dataclass(frozen=True)
class StorageSettings:
    """[storage]: the filesystem store."""

    path: str = _key("./minipacs-data/store", check=_not_empty)
    spool_path: str = _key("")
    min_free_bytes: int = _key(1_073_741_824, low=0)
    duplicate_policy: str = _key("keep-first", choices=("keep-first", "replace", "reject"))
    fsync: bool = _key(True)
    flush: str = _key("filesystem", choices=("filesystem", "file"))


@dataclass(frozen=True)
class DatabaseSettings:
    """[database]: the SQL index."""

    url: str = _key("sqlite:///./minipacs-data/index.sqlite", check=_database_url, secret=True)
    auto_upgrade: bool = _key(True)
    pool_size: int = _key(5, low=1, high=100)
    batch_max: int = _key(64, low=1, high=10_000)
    batch_wait_ms: float = _key(0.0, low=0, high=1000)


@dataclass(frozen=True)
class QuerySettings:
    """[query]: C-FIND matching and limits."""

    pn_case_insensitive: bool = _key(True)
    max_results: int = _key(100_000, low=0, high=100_000_000)
    threads: int = _key(4, low=1, high=64)


@dataclass(frozen=True)
class MetricsSettings:
    """[metrics]: the HTTP endpoint with /metrics (Prometheus), /healthz and /readyz."""

    port: int = _key(0, low=0, high=65535)
    host: str = _key("127.0.0.1", check=_not_empty)


@dataclass(frozen=True)
class RetrieveSettings:
    """[retrieve]: C-MOVE and C-GET sub-operations."""

    connect_timeout: float = _key(10.0, low=0.1, high=3600)
    response_timeout: float = _key(60.0, low=0.1, high=3600)
    pending_interval: float = _key(0.1, low=0, high=3600)


@dataclass(frozen=True)
class LogSettings:
    """[log]: level and format of the structured logs, and levels per logger."""

    level: str = _key("INFO", check=_log_level)
    format: str = _key("auto", choices=("auto", "json", "text"))
    levels: dict[str, str] = _key({}, item=_log_level)


@dataclass(frozen=True)
class TlsSettings:
    """[tls]: the DICOM TLS listener (PS3.15 B.10) and the requestor's certificates."""

    port: int = _key(0, low=0, high=65535)
    certificate: str = _key("")
    private_key: str = _key("")
    ca_file: str = _key("")
    require_client_cert: bool = _key(False)


@dataclass(frozen=True)
class AccessSettings:
    """[access]: the policy for calling AE titles without an [access.<AE>] rule, users."""

    unknown_ae: str = _key("allow", choices=("allow", "refuse-association", "refuse-services"))
    user_identity: str = _key("off", choices=("off", "optional", "required"))


@dataclass(frozen=True)
class AccessRule:
    """[access.<AE title>]: what one calling AE may do, and from which addresses."""

    services: list[str] = _key(list(ACCESS_SERVICES), item=_service)
    hosts: list[str] = _key([], item=_network)
    max_associations: int = _key(0, low=0, high=100_000)


@dataclass(frozen=True)
class Destination:
    """[destinations.<AE title>]: where a C-MOVE destination AE can be reached."""

    host: str = _key(check=_not_empty)
    port: int = _key(low=1, high=65535)
    tls: bool = _key(False)


@dataclass(frozen=True)
class Settings:
    """Everything minipacs can be configured with."""

    server: ServerSettings = field(default_factory=ServerSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    query: QuerySettings = field(default_factory=QuerySettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    retrieve: RetrieveSettings = field(default_factory=RetrieveSettings)
    log: LogSettings = field(default_factory=LogSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    access: AccessSettings = field(default_factory=AccessSettings)
    access_rules: dict[str, AccessRule] = field(default_factory=dict)
    destinations: dict[str, Destination] = field(default_factory=dict)
    # Username -> salted password hash; repr off like every secret.
    users: dict[str, str] = field(default_factory=dict, repr=False)
    # Where the settings were read from (None: built-in defaults), for messages only.
    config_path: Path | None = field(default=None, compare=False)

    @property
    def store_dir(self) -> Path:
        """The store folder."""
        return Path(self.storage.path)

    @property
    def spool_dir(self) -> Path:
        """Where large incoming data sets are spooled: by default inside the store's folder."""
        if self.storage.spool_path:
            return Path(self.storage.spool_path)
        return self.store_dir / ".spool"


_SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "storage": StorageSettings,
    "database": DatabaseSettings,
    "query": QuerySettings,
    "metrics": MetricsSettings,
    "retrieve": RetrieveSettings,
    "log": LogSettings,
    "tls": TlsSettings,
    "access": AccessSettings,
}
# Tables set only in the configuration file, never from the environment.
_FILE_ONLY = ("destinations", "users")


class _Invalid(Exception):
    """A value's problem, without where it came from."""


def _show(value: Any) -> str:
    """A value as the user would write it: strings in double quotes."""
    return json.dumps(value, ensure_ascii=False, default=str)


def _number(value: float) -> str:
    # Not :g, which would print 134217728 as 1.34218e+08.
    return str(int(value)) if float(value).is_integer() else str(value)


def _span(rule: _Rule) -> str:
    if rule.low is not None and rule.high is not None:
        return f" {_number(rule.low)}-{_number(rule.high)}"
    if rule.low is not None:
        return f" >= {_number(rule.low)}"
    return ""


def _expected(kind: Any, rule: _Rule) -> str:
    """What a key must be, as in "must be <...>"."""
    if kind is bool:
        return "true or false"
    if kind is int:
        return "an integer" + _span(rule)
    if kind is float:
        return "a number" + _span(rule)
    if kind == list[str]:
        return "a list of strings"
    if kind == dict[str, str]:
        return "a table of name = string"
    if rule.choices:
        return "one of " + ", ".join(rule.choices)
    return "a string"


def _typed(kind: Any, value: Any, from_env: bool) -> Any:
    """Convert value to kind, parsing environment strings; raise ValueError if it is not one."""
    if kind is bool:
        if from_env and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        if isinstance(value, bool):
            return value
    elif kind is int:
        if from_env:
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if from_env:
            return float(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif kind == list[str]:
        if from_env:
            return [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return list(value)
    elif kind == dict[str, str]:
        if from_env:
            pairs = [item.partition("=") for item in value.split(",") if item.strip()]
            if all(sep and name.strip() for name, sep, _ in pairs):
                return {name.strip(): item.strip() for name, _, item in pairs}
        elif isinstance(value, dict) and all(isinstance(item, str) for item in value.values()):
            return dict(value)
    elif isinstance(value, str):
        return value
    raise ValueError


def _value(kind: Any, rule: _Rule, raw: Any, from_env: bool) -> Any:
    """The checked value of one key; raise _Invalid naming the problem."""
    got = "" if rule.secret else f", got {_show(raw)}"
    try:
        value = _typed(kind, raw, from_env)
    except ValueError:
        raise _Invalid(f"must be {_expected(kind, rule)}{got}") from None
    outside = (rule.low is not None and not value >= rule.low) or (
        rule.high is not None and not value <= rule.high
    )
    if outside or (rule.choices and value not in rule.choices):
        raise _Invalid(f"must be {_expected(kind, rule)}{got}")
    problem = rule.check(value) if rule.check else None
    if problem:
        raise _Invalid(f"{problem}{got}")
    if rule.item:
        if isinstance(value, dict):
            items = [(name, f", got {_show(item)}", item) for name, item in value.items()]
        else:
            items = [(f"item {_show(item)}", "", item) for item in value]
        for label, shown, item in items:
            problem = rule.item(item)
            if problem:
                raise _Invalid(f"{label}: {problem}{shown}")
    return value


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


# One key's raw value, where it came from, and whether it is an environment string.
_Raw = tuple[Any, str, bool]


def _build(cls: type, prefix: str, values: Mapping[str, _Raw], origin: str) -> Any:
    """Instantiate a settings dataclass from raw values; raise ConfigError."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, (raw, source, from_env) in values.items():
        where = f"{source}: {prefix}.{key}"
        if key not in fields:
            raise ConfigError(f"{where}: unknown key{_did_you_mean(key, list(fields))}")
        try:
            kwargs[key] = _value(hints[key], fields[key].metadata["rule"], raw, from_env)
        except _Invalid as exc:
            raise ConfigError(f"{where}: {exc}") from None
    for name, spec in fields.items():
        required = (
            spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
        )
        if required and name not in kwargs:
            expected = _expected(hints[name], spec.metadata["rule"])
            raise ConfigError(f"{origin}: {prefix}.{name}: missing, must be {expected}")
    return cls(**kwargs)


def _read(path: Path) -> dict[str, Any]:
    """Parse a TOML file; raise ConfigError."""
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _env_key(var: str) -> tuple[str, str]:
    """The (section, key) a MINIPACS_<SECTION>_<KEY> variable sets; raise ConfigError."""
    rest = var[len(ENV_PREFIX) :]
    for section in _SECTIONS:
        if rest.startswith(section.upper() + "_"):
            return section, rest[len(section) + 1 :].lower()
    for table in _FILE_ONLY:
        if rest.startswith(table.upper() + "_"):
            raise ConfigError(f"{var}: {table} can only be set in the configuration file")
    names = ", ".join(s.upper() for s in _SECTIONS)
    raise ConfigError(f"{var}: unknown setting, expected {ENV_PREFIX}<SECTION>_<KEY> ({names})")


def _per_ae(raw: Any, section: str, cls: type, origin: str) -> dict[str, Any]:
    """A table of AE title -> sub-table ([destinations], [access.<AE>]), each built as cls."""
    keys = ", ".join(f.name for f in dataclasses.fields(cls))
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: {section}: must be a table of AE title = {{{keys}}}")
    result = {}
    for title, entry in raw.items():
        where = f"{section}.{title}"
        problem = ae_title_problem(title)
        if problem:
            raise ConfigError(f"{origin}: {where}: {problem}, got {_show(title)}")
        if not isinstance(entry, dict):
            raise ConfigError(f"{origin}: {where}: must be a table {{{keys}}}, got {_show(entry)}")
        values = {key: (value, origin, False) for key, value in entry.items()}
        result[title] = _build(cls, where, values, origin)
    return result


def _users(raw: Any, origin: str) -> dict[str, str]:
    """The [users] table: username -> password hash."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: users: must be a table of username = password hash")
    for name, stored in raw.items():
        problem = password_hash_problem(stored) if isinstance(stored, str) else "must be a string"
        if problem:
            # Never echo the value: a plain password put here by mistake stays out of logs.
            raise ConfigError(f"{origin}: users.{name}: {problem}")
    return dict(raw)


def _check_tls(tls: TlsSettings, origin: str) -> None:
    """Settings that only make sense together; raise ConfigError."""
    if tls.port and not (tls.certificate and tls.private_key):
        raise ConfigError(f"{origin}: tls.certificate: tls.port needs a certificate and key")
    if tls.require_client_cert and not tls.ca_file:
        raise ConfigError(f"{origin}: tls.ca_file: require_client_cert needs a CA bundle")


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Load settings from a TOML file (None: defaults only), then the environment."""
    environ = os.environ if environ is None else environ
    data = _read(path) if path is not None else {}
    origin = str(path)
    values: dict[str, dict[str, _Raw]] = {name: {} for name in _SECTIONS}
    rules: dict[str, Any] = {}
    for name, table in data.items():
        if name in _FILE_ONLY:
            continue
        if name not in _SECTIONS:
            known = [*_SECTIONS, *_FILE_ONLY]
            raise ConfigError(f"{origin}: [{name}]: unknown section{_did_you_mean(name, known)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{origin}: {name}: must be a table [{name}], got {_show(table)}")
        if name == "access":
            # [access.<AE>] sub-tables are rules; the other keys are AccessSettings.
            rules = {key: value for key, value in table.items() if isinstance(value, dict)}
            table = {key: value for key, value in table.items() if key not in rules}
        values[name] = {key: (value, origin, False) for key, value in table.items()}
    # Sorted so that, of several bad variables, the same one is reported every time.
    for var in sorted(environ):
        if var.startswith(ENV_PREFIX) and var not in ENV_RESERVED:
            section, key = _env_key(var)
            values[section][key] = (environ[var], var, True)
    sections = {name: _build(cls, name, values[name], origin) for name, cls in _SECTIONS.items()}
    _check_tls(sections["tls"], origin)
    return Settings(
        **sections,
        access_rules=_per_ae(rules, "access", AccessRule, origin),
        destinations=_per_ae(data.get("destinations", {}), "destinations", Destination, origin),
        users=_users(data.get("users", {}), origin),
        config_path=path,
    )
