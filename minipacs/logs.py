"""Structured logs: JSON lines when not on a terminal, readable key=value lines when on one."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from minipacs.config import LogSettings

# The event's fields travel in one `extra` attribute rather than one attribute each, so a
# field may be called `name`, `module` or `process` without clashing with LogRecord's own.
_FIELDS = "minipacs_fields"
_CORE = ("time", "level", "logger", "event")
# Fields every record of this process carries (a worker's number in worker mode).
_PROCESS_FIELDS: dict[str, Any] = {}


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event with its fields; fields whose value is None are left out."""
    if logger.isEnabledFor(level):
        present = {key: value for key, value in fields.items() if value is not None}
        logger.log(level, event, extra={_FIELDS: present}, stacklevel=2)


def label_process(**fields: Any) -> None:
    """Add fields to every record this process logs from now on."""
    _PROCESS_FIELDS.update(fields)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = {**_PROCESS_FIELDS, **getattr(record, _FIELDS, {})}
    # A field named like a core key must not overwrite it, nor be lost.
    return {f"{key}_" if key in _CORE else key: value for key, value in fields.items()}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render a record as a JSON line."""
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def _text_value(value: Any) -> str:
    text = str(value)
    # Quote what would otherwise be ambiguous in `key=value key=value`.
    if not text or any(c in text for c in ' ="\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


class TextFormatter(logging.Formatter):
    """`time level logger event key=value ...` for people at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        """Render a record as one readable line (plus a traceback, if any)."""
        when = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        fields = "".join(f" {key}={_text_value(v)}" for key, v in _fields(record).items())
        line = f"{when} {record.levelname:<7} {record.name} {record.getMessage()}{fields}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def configure_logging(settings: LogSettings, stream: TextIO | None = None) -> None:
    """Send every log record to stream (stderr) in the configured format and levels."""
    stream = sys.stderr if stream is None else stream
    use_json = settings.format == "json" or (settings.format == "auto" and not stream.isatty())
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level.upper())
    for name, level in settings.levels.items():
        logging.getLogger(name).setLevel(level.upper())
    # warnings.warn output would otherwise be the one non-JSON line on stderr.
    logging.captureWarnings(True)
