"""An event as a row of the inbox table, the same in both spool backends."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

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
        json.dumps(event.raw, ensure_ascii=False, separators=(",", ":")),
    )


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
