"""One Settings object: config/minipacs.toml, then MINIPACS_<SECTION>_<KEY> environment.

Every key, its type, default and allowed range is declared once in the dataclasses
below; loading checks each value and reports the first problem as one line naming the
source (file or environment variable), the key and what is wrong.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

ENV_PREFIX = "MINIPACS_"


class ConfigError(Exception):
    """A configuration problem, stated in one line."""


def _ae_title(value: str) -> str | None:
    if not 1 <= len(value) <= 16 or not value.strip():
        return "must be 1-16 characters and not all spaces"
    if "\\" in value or any(ord(c) < 32 or ord(c) > 126 for c in value):
        return "must be printable ASCII without backslash (PS3.5 AE)"
    return None


def _between(low: float, high: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if low <= value <= high else f"must be between {low:g} and {high:g}"

    return check


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _key(default: Any, check: Callable[[Any], str | None] | None = None, doc: str = "") -> Any:
    factory = (lambda: list(default)) if isinstance(default, list) else None
    metadata = {"check": check, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ServerSettings:
    """[server]: the DICOM listener and its limits."""

    ae_title: str = _key("MINIPACS", _ae_title)
    host: str = _key("0.0.0.0")
    port: int = _key(11112, _between(1, 65535))
    check_called_ae: bool = _key(True)
    allowed_calling_aes: list[str] = _key([])
    max_associations: int = _key(400, _between(1, 100_000))
    max_pdu_length: int = _key(1_048_576, _between(4096, 134_217_728))
    max_associate_rq_length: int = _key(1_048_576, _between(4096, 16_777_216))
    artim_timeout: float = _key(30.0, _between(0.1, 3600))
    idle_timeout: float = _key(300.0, _between(0.1, 86_400))
    shutdown_grace: float = _key(30.0, _between(0, 3600))
    spool_threshold: int = _key(8_388_608, _between(65_536, 1 << 31))
    use_uvloop: bool = _key(True)


@dataclass(frozen=True)
class StorageSettings:
    """[storage]: the filesystem store."""

    path: str = _key("./minipacs-data/store")
    spool_path: str = _key("")
    min_free_bytes: int = _key(1_073_741_824, _between(0, 1 << 50))
    duplicate_policy: str = _key("keep-first", _one_of("keep-first", "replace", "reject"))
    fsync: bool = _key(True)


@dataclass(frozen=True)
class DatabaseSettings:
    """[database]: the SQL index."""

    url: str = _key("sqlite:///./minipacs-data/index.sqlite")
    auto_upgrade: bool = _key(True)
    pool_size: int = _key(5, _between(1, 100))
    batch_max: int = _key(64, _between(1, 10_000))
    batch_wait_ms: float = _key(2.0, _between(0, 1000))


@dataclass(frozen=True)
class LogSettings:
    """[log]: level and format of the structured logs."""

    level: str = _key("INFO", _one_of("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
    format: str = _key("auto", _one_of("auto", "json", "text"))


@dataclass(frozen=True)
class Destination:
    """A C-MOVE destination: where an AE title may be reached."""

    host: str
    port: int
    tls: bool = False


@dataclass(frozen=True)
class Settings:
    """Everything minipacs can be configured with."""

    server: ServerSettings = field(default_factory=ServerSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    log: LogSettings = field(default_factory=LogSettings)
    destinations: dict[str, Destination] = field(default_factory=dict)

    @property
    def store_dir(self) -> Path:
        """The store folder."""
        return Path(self.storage.path)

    @property
    def spool_dir(self) -> Path:
        """Where large incoming data sets are spooled: on the store's filesystem."""
        if self.storage.spool_path:
            return Path(self.storage.spool_path)
        return self.store_dir / ".spool"


_SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "storage": StorageSettings,
    "database": DatabaseSettings,
    "log": LogSettings,
}


def _convert(kind: Any, value: Any, from_env: bool) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if from_env and str(value).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return str(value).lower() in ("1", "true", "yes", "on")
        raise ValueError(f"must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"must be an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(f"must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number, got {value!r}") from None
    if kind == list[str]:
        if from_env and isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
            raise ValueError(f"must be a list of strings, got {value!r}")
        return list(value)
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    return value


def _section(cls: type, values: Mapping[str, tuple[Any, str]]) -> Any:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, (raw, source) in values.items():
        if name not in fields:
            raise ConfigError(f"{source}: unknown key")
        try:
            value = _convert(hints[name], raw, from_env=source.startswith(ENV_PREFIX))
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        check = fields[name].metadata.get("check")
        problem = check(value) if check else None
        if problem:
            raise ConfigError(f"{source}: {problem}, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def _destinations(raw: Any, origin: str) -> dict[str, Destination]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: destinations: must be a table of AE title -> host/port")
    result = {}
    for title, entry in raw.items():
        where = f"{origin}: destinations.{title}"
        if _ae_title(title):
            raise ConfigError(f"{where}: AE title {_ae_title(title)}")
        if not isinstance(entry, dict) or set(entry) - {"host", "port", "tls"}:
            raise ConfigError(f"{where}: must have host, port and optional tls")
        host, port = entry.get("host"), entry.get("port")
        if not isinstance(host, str) or not host:
            raise ConfigError(f"{where}.host: must be a host name or address")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ConfigError(f"{where}.port: must be an integer 1-65535, got {port!r}")
        tls = entry.get("tls", False)
        if not isinstance(tls, bool):
            raise ConfigError(f"{where}.tls: must be true or false")
        result[title] = Destination(host, port, tls)
    return result


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Load settings from a TOML file (optional) and the environment; raise ConfigError."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    origin = str(path) if path is not None else "defaults"
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    unknown = set(data) - set(_SECTIONS) - {"destinations"}
    if unknown:
        raise ConfigError(f"{origin}: unknown section [{sorted(unknown)[0]}]")
    sections = {}
    for name, cls in _SECTIONS.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{origin}: {name}: must be a table")
        values = {key: (value, f"{origin}: {name}.{key}") for key, value in table.items()}
        prefix = f"{ENV_PREFIX}{name.upper()}_"
        for var, value in environ.items():
            if var.startswith(prefix):
                values[var[len(prefix) :].lower()] = (value, var)
        sections[name] = _section(cls, values)
    destinations = _destinations(data.get("destinations", {}), origin)
    return Settings(destinations=destinations, **sections)
