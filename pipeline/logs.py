"""Log output: the default text lines, or one JSON object a line (``pipeline --log-format json``)
for a log shipper; and the redaction that keeps secrets out of both.

A JSON line carries ``time`` (ISO 8601, UTC), ``level``, ``stage`` (the ``pipeline run`` stage, else
null), ``logger``, ``message``, and the structured fields a call passes with ``extra=`` (window,
topic, partition, offset, ...). A field or a logged mapping whose key names a secret (sasl.password,
ssl.key.password, ...) shows ``***`` in either format.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from pipeline.safetext import printable

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # pipeline/progress.py parses it
_LOG_LINE_START = re.compile(r"\d{4}-\d\d-\d\d ")  # TEXT_FORMAT's asctime
SECRET_WORDS = ("password", "secret", "sasl.oauthbearer.config", "ssl.key", "token", "credential")
REDACTED = "***"

# Attributes every LogRecord has: anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_stage: str | None = None


def set_stage(name: str | None) -> None:
    """The stage this process runs, added to every JSON line."""
    global _stage
    _stage = name


def is_secret(key: str) -> bool:
    key = key.lower()
    return any(word in key for word in SECRET_WORDS)


def redact(value: Any) -> Any:
    """A copy of ``value`` with the values of secret-named keys replaced, at any depth."""
    if isinstance(value, Mapping):
        return {k: (REDACTED if isinstance(k, str) and is_secret(k) else redact(v))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


class SecretFilter(logging.Filter):
    """Redacts mappings passed as log arguments (``log.debug("settings: %s", settings)``) and
    secret-named ``extra=`` fields, before any formatter sees them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, Mapping):
            record.args = redact(dict(record.args))
        elif isinstance(record.args, tuple) and any(isinstance(a, (Mapping, list, tuple))
                                                    for a in record.args):
            record.args = tuple(redact(a) for a in record.args)
        for key in extra_fields(record):
            if is_secret(key):
                setattr(record, key, REDACTED)
        return True


def extra_fields(record: logging.LogRecord) -> list[str]:
    return [k for k in vars(record) if k not in _STANDARD and not k.startswith("_")]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "stage": _stage,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in extra_fields(record):
            value = getattr(record, key)
            if isinstance(value, float) and not math.isfinite(value):
                value = str(value)  # JSON has no inf / nan
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # default=str: an extra field that JSON cannot carry (a Path, an enum) still logs.
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT lines whose message shows control characters as escapes (safetext.printable):
    messages quote log lines and reasons, which a hostile source writes, and a terminal obeys
    the escape sequences in them. One line a message, as pipeline/progress.py reads them; a
    traceback after it keeps its lines, each escaped the same way."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:
        # Its lines stay lines, each escaped: an exception's message may quote the record. One
        # that reads as a log line (a forged one, after a newline in that message) is indented.
        return "\n".join(("  " if _LOG_LINE_START.match(line) else "") + printable(line)
                         for line in super().formatException(ei).split("\n"))


def configure_logging(level: int, log_format: str = "text") -> None:
    """Root logging for the ``pipeline`` command: text lines or JSON lines on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(SecretFilter())
    logging.basicConfig(level=level, handlers=[handler])
    # torch's own INFO lines (e.g. from fake_tensor when Ctrl-C lands while it loads) are not
    # salka's to show; -vv (debug) shows them.
    logging.getLogger("torch").setLevel(logging.WARNING if level > logging.DEBUG else level)
