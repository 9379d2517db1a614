"""Logging set-up: human text lines or one JSON object per line.

``ESPRELAY_LOG_FORMAT=json`` writes each record as a JSON object with ``ts``,
``level``, ``logger`` and ``msg``, plus the structured fields the code attaches with
``extra=`` (``message_id``, ``event``, ``provider``, ``provider_message_id``...), so
one message can be followed from SMTP acceptance to the ESP's id with::

    grep '"message_id": "<id>"' esprelay.log

Text lines carry the same facts as ``key=value`` pairs in the message itself.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = ["JsonFormatter", "apply_level", "setup_logging"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; never raises on an odd value (``repr`` fallback)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=repr, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``logging.Formatter(TEXT_FORMAT)`` that formats the date and time of a second
    once, not for every record (``time.strftime`` of the local time: ~1 us of the ~9
    a line cost); the milliseconds are added to it per record, as the default does."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second = -1
        self._prefix = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            # What the default formats: the local time of the record's whole second.
            prefix = time.strftime(self.default_time_format, self.converter(record.created))
            self._second, self._prefix = second, prefix
        msec_format = self.default_msec_format
        return msec_format % (self._prefix, record.msecs) if msec_format else self._prefix


def setup_logging(level: str, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Configure the root logger once, replacing any handler set up before."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    # Neither format shows the process or thread a record came from: no record looks
    # them up (a getpid() system call and two lookups for each of the two lines a
    # message logs).
    logging.logProcesses = False
    logging.logThreads = False
    logging.logMultiprocessing = False
    # Nor the file, line and function it came from: without this every record walks the
    # stack to find them (sys._getframe and a path comparison per frame; the logging
    # HOWTO's "Optimization" names the switch).  stack_info=True then adds no stack;
    # esprelay never asks for one.
    logging._srcfile = None
    apply_level(level)


def apply_level(level: str) -> None:
    """Set esprelay's level; also used by SIGHUP to change it without a restart."""
    logging.getLogger().setLevel(level)
    # aiosmtpd logs every command line at INFO ("mail.log"): shown at our DEBUG only.
    # Its own DEBUG lines include each line of DATA, message bodies: never shown.
    logging.getLogger("mail.log").setLevel(logging.INFO if level == "DEBUG" else logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
