"""Structured JSON logs, one object per line, carrying the request id; or, for a person at
a terminal, the same records as plain lines (``--log-format text``)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


def _request_id() -> str | None:
    # Flask only where it is loaded already: the server's arbiter logs without it.
    flask = sys.modules.get("flask")
    if flask is None or not flask.has_request_context():
        return None
    return getattr(flask.g, "request_id", None)


LOG_FORMATS = ("json", "text")


def default_log_format() -> str:
    """JSON for a log collector, plain lines for a person: text only on a terminal."""
    return "text" if sys.stderr.isatty() else "json"


def _fields(formatter: logging.Formatter, record: logging.LogRecord) -> dict[str, object]:
    entry: dict[str, object] = {}
    request_id = _request_id()
    if request_id:
        entry["request_id"] = request_id
    for key, value in record.__dict__.items():
        if key not in _STANDARD and not key.startswith("_"):
            entry[key] = value
    if record.exc_info:
        entry["exception"] = formatter.formatException(record.exc_info)
    return entry


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields(self, record),
        }
        return json.dumps(entry, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``TIME LEVEL logger: message key=value ...``, a traceback on the lines after."""

    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(self, record)
        exception = fields.pop("exception", None)
        moment = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        extra = "".join(f" {key}={value}" for key, value in fields.items())
        line = f"{moment} {record.levelname:<7} {record.name}: {record.getMessage()}{extra}"
        return line if exception is None else f"{line}\n{exception}"


def make_formatter(log_format: str) -> logging.Formatter:
    return TextFormatter() if log_format == "text" else JsonFormatter()


def configure_logging(level: str = "INFO", log_format: str = "json") -> None:
    root = logging.getLogger()
    if any(isinstance(h.formatter, JsonFormatter | TextFormatter) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(log_format))
    root.handlers = [handler]
    root.setLevel(level.upper())
    # Python warnings (cryptography's for a name attribute over its RFC 5280 bound, which
    # the core then refuses) would be written to stderr as two lines of plain text.
    logging.captureWarnings(True)
    # Migrations announce themselves at every worker start; only problems are news.
    logging.getLogger("alembic").setLevel(logging.WARNING)


def log_gevent_errors() -> None:
    """Send an exception that escapes a greenlet through logging, as one record of the
    configured format: gevent's hub would print it itself, as plain text on stderr."""
    import gevent

    gevent.get_hub().print_exception = _log_greenlet_failure


def _log_greenlet_failure(context: object, kind: Any, value: Any, traceback: Any) -> None:
    logging.getLogger("pkigate.server").error(
        "uncaught exception in %s", context, exc_info=(kind, value, traceback)
    )
