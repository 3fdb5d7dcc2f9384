"""Logging set-up: plain lines on a terminal, one JSON object per line otherwise (journald,
log shippers), or as asked with --log-format."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from delayq.errors import InvalidInput

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("auto", "plain", "json")
#: Libraries that log a request's full URL, password and token included (httpx: each
#: webhook call at INFO): kept to warnings. delayq reports failed calls itself, URL masked.
QUIETED = ("httpx", "httpcore")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


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
