"""The text log format: the same lines as ``logging.Formatter(TEXT_FORMAT)``."""

from __future__ import annotations

import io
import logging

from esprelay.logsetup import TEXT_FORMAT, TextFormatter, setup_logging


def _record(created: float, message: str = "delivered id=%s", *args: object) -> logging.LogRecord:
    record = logging.LogRecord("esprelay.delivery", logging.INFO, "", 0, message, args, None)
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    return record


def test_text_lines_are_those_of_the_standard_formatter() -> None:
    """Records within one second, across seconds and back again: each line as the
    standard formatter writes it (local time, then the milliseconds)."""
    ours, standard = TextFormatter(), logging.Formatter(TEXT_FORMAT)
    times = [
        1_800_000_000.0,
        1_800_000_000.999,
        1_800_000_001.002,
        1_800_000_000.5,
        1_700_000_000.25,
    ]
    for created in times:
        record = _record(created, "delivered id=%s ms=%d", "abc", 4)
        assert ours.format(record) == standard.format(
            _record(created, "delivered id=%s ms=%d", "abc", 4)
        )
    # A date format of its own is honoured as the standard formatter does.
    record = _record(times[0])
    assert ours.formatTime(record, "%Y") == standard.formatTime(record, "%Y")


def test_set_up_text_logging_writes_standard_lines() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        setup_logging("INFO", "text", stream)
        logging.getLogger("esprelay.delivery").info("delivered id=%s", "x1")
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
    line = stream.getvalue()
    assert line.endswith(" INFO esprelay.delivery: delivered id=x1\n")
    assert line[:4].isdigit() and line[19] == ","  # 2026-12-05 18:00:00,123
