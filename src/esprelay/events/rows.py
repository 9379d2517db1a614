"""An event as a row of the inbox table, the same in both spool backends."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from esprelay.events.model import Event, StoredEvent

EVENT_COLUMNS = (
    "seq, provider, event_id, kind, recipient, at, smtp_status, diagnostic, esp_message_id,"
    " esprelay_id, remote_mta, raw, received_at, message_id, processed_at"
)


def event_row(event: Event) -> tuple[Any, ...]:
    """An event's columns from ``provider`` to ``raw`` (the backends share it)."""
    return (
        event.provider,
        event.provider_event_id,
        event.kind,
        event.recipient,
        event.at,
        event.smtp_status,
        event.diagnostic,
        event.esp_message_id,
        event.esprelay_id,
        event.remote_mta,
        raw_json(event.raw),
    )


def raw_json(raw: Mapping[str, Any]) -> str:
    """An event's own JSON, compact, as the inbox keeps it.

    orjson writes what ``json.dumps(raw, ensure_ascii=False, separators=(",", ":"))``
    writes, some twenty times faster (it is paid for every event a webhook brings);
    what it refuses (an integer beyond 64 bits, a lone surrogate) goes the slow way.
    """
    try:
        return orjson.dumps(raw).decode()
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(raw, ensure_ascii=False, separators=(",", ":"))


def stored_event(row: Sequence[Any]) -> StoredEvent:
    """A row of ``EVENT_COLUMNS`` (the backends share it)."""
    return StoredEvent(
        seq=int(row[0]),
        event=Event(
            provider=row[1],
            provider_event_id=row[2],
            kind=row[3],
            recipient=row[4],
            at=float(row[5]),
            smtp_status=row[6],
            diagnostic=row[7],
            esp_message_id=row[8],
            esprelay_id=row[9],
            remote_mta=row[10],
            raw=json.loads(row[11]),
        ),
        received_at=float(row[12]),
        message_id=row[13],
        processed_at=None if row[14] is None else float(row[14]),
    )
