"""One view of a spooled message for every interface (admin API and ``esprelay queue``).

Times are ISO 8601 in UTC; the body, when asked for, is base64 so that the exact bytes
survive JSON.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

from esprelay.models import SpooledMessage


def iso_time(value: float | None) -> str | None:
    if value is None:
        return None
    return datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds")


def table_time(value: float | None) -> str:
    """A compact UTC time for tables (the HTML page, ``esprelay queue list``)."""
    if value is None:
        return ""
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")


def summary(message: SpooledMessage) -> dict[str, Any]:
    return {
        "id": message.id,
        "state": message.state.value,
        "mail_from": message.envelope.mail_from,
        "rcpt_tos": list(message.envelope.rcpt_tos),
        "size": message.size,
        "attempts": message.attempts,
        "created_at": iso_time(message.created_at),
        "next_attempt_at": iso_time(message.next_attempt_at),
        "provider": message.provider,
        "provider_message_id": message.provider_message_id,
        "last_error": message.last_error,
    }


def detail(message: SpooledMessage, *, with_body: bool) -> dict[str, Any]:
    data = summary(message)
    data["attempt_history"] = [
        {
            "number": a.number,
            "at": iso_time(a.at),
            "provider": a.provider,
            "outcome": a.outcome,
            "error": a.error,
            "provider_message_id": a.provider_message_id,
        }
        for a in message.history
    ]
    data["meta"] = message.meta
    if with_body:
        # Base64 keeps the exact bytes (8bit, odd encodings) through JSON.
        data["body_base64"] = (
            None if message.raw is None else base64.b64encode(message.raw).decode("ascii")
        )
    return data
