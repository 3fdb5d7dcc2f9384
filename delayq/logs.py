"""Logging set-up: plain lines on a terminal, one JSON object per line otherwise (journald,
log shippers), or as asked with --log-format.

JSON lines are python-json-logger's: `ts`, `level`, `logger`, `msg` on every line, and the
fields a line is logged with (`extra=`) as keys of their own, so that a log pipeline can
sum and chart them without parsing `msg`. docs/logging.md lists the keys."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

from delayq.errors import InvalidInput

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("auto", "plain", "json")
#: Libraries that log a request's full URL, password and token included (httpx: each
#: webhook call at INFO): kept to warnings. delayq reports failed calls itself, URL masked.
QUIETED = ("httpx", "httpcore")


class JsonFormatter(_JsonFormatter):
    """{"ts": ISO 8601 UTC with ms, "level": "info", "logger", "msg", ...extra fields,
    "exc": traceback if any}: the keys delayq's JSON lines have always had."""

    def __init__(self) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={
                "levelname": "level",
                "name": "logger",
                "message": "msg",
                "exc_info": "exc",
            },
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["ts"] = datetime.fromtimestamp(record.created, UTC).isoformat(
            timespec="milliseconds"
        )
        super().add_fields(log_data, record, message_dict)
        log_data["level"] = record.levelname.lower()


def setup_logging(level: str = "info", fmt: str = "auto") -> None:
    if level.upper() not in LEVELS:
        raise InvalidInput(f"invalid log level {level!r}: use debug, info, warning or error")
    if fmt not in FORMATS:
        raise InvalidInput(f"invalid log format {fmt!r}: use auto, plain or json")
    handler = logging.StreamHandler(sys.stderr)
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler.setFormatter(
        JsonFormatter()
        if use_json
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in QUIETED:
        logging.getLogger(name).setLevel(logging.WARNING)
