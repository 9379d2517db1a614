"""One view of a spooled message for every interface (admin API and ``esprelay queue``),
and the queue as Postfix's ``mailq`` prints it (``esprelay mailq``, ``sendmail -bp``).

Times are ISO 8601 in UTC; the body, when asked for, is base64 so that the exact bytes
survive JSON.  With the status the ESP events gave (:mod:`esprelay.events.status`), a
message's view has ``recipients`` (each one's latest status) and ``timeline`` (every
event, oldest first).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Container, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from esprelay.events.status import MessageStatus, MessageStatusStore, StatusEntry
from esprelay.models import MessageState, SpooledMessage

if TYPE_CHECKING:
    from esprelay.spool.base import Spool


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


def detail(
    message: SpooledMessage, *, with_body: bool, status: MessageStatus | None = None
) -> dict[str, Any]:
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
    if status is not None:
        data["recipients"] = recipients_view(message, status)
        data["timeline"] = [entry_view(e) for e in status.timeline]
    if with_body:
        # Base64 keeps the exact bytes (8bit, odd encodings) through JSON.
        data["body_base64"] = (
            None if message.raw is None else base64.b64encode(message.raw).decode("ascii")
        )
    return data


# Postfix's mailq (``postqueue -p``) layout: the queue id and its mark, the size, the
# arrival time, the sender; then the reason of the last deferral in parentheses and the
# recipients, under the sender.
_MAILQ_HEADER = (
    f"{'-Queue ID-':<22} {'--Size--':>8} {'----Arrival Time----':<20} -Sender/Recipient-------"
)
_MAILQ_INDENT = " " * (22 + 1 + 8 + 1 + 20 + 1)


def mailq(messages: Iterable[SpooledMessage], held: Container[str]) -> str:
    """``messages`` (those still to deliver) as Postfix's ``mailq`` prints its queue:
    ``*`` after the id of a message being delivered now, ``!`` after a held one; "Mail
    queue is empty", or a last line with the total size and count."""
    lines: list[str] = []
    count = size = 0
    for message in messages:
        if message.state not in (MessageState.QUEUED, MessageState.IN_FLIGHT):
            continue
        mark = (
            "!" if message.id in held else ("*" if message.state is MessageState.IN_FLIGHT else " ")
        )
        arrival = time.strftime("%a %b %e %H:%M:%S", time.localtime(message.created_at))
        if not lines:
            lines.append(_MAILQ_HEADER)
        lines.append(
            f"{message.id + mark:<22} {message.size:>8} {arrival:<20}"
            f" {message.envelope.mail_from or 'MAILER-DAEMON'}"
        )
        if message.last_error and message.state is MessageState.QUEUED:
            lines.append(f"({' '.join(message.last_error.split())})")
        lines.extend(f"{_MAILQ_INDENT}{rcpt}" for rcpt in message.envelope.rcpt_tos)
        lines.append("")
        count += 1
        size += message.size
    if not count:
        return "Mail queue is empty"
    kbytes = (size + 1023) // 1024
    lines.append(f"-- {kbytes} Kbytes in {count} Request{'' if count == 1 else 's'}.")
    return "\n".join(lines)


# region status from ESP events (esprelay.events.status)


async def load(
    spool: Spool, id: str, *, with_body: bool
) -> tuple[SpooledMessage, MessageStatus | None] | None:
    """A message and, when ``spool`` keeps it (both backends do), its status."""
    message = await spool.get(id, with_body=with_body)
    if message is None:
        return None
    store: object = spool  # the Spool protocol is not a MessageStatusStore
    if not isinstance(store, MessageStatusStore):
        return message, None
    return message, await store.message_status(id)


def entry_view(entry: StatusEntry) -> dict[str, Any]:
    return {
        "recipient": entry.recipient,
        "status": entry.kind,
        "at": iso_time(entry.at),
        "smtp_status": entry.smtp_status,
        "diagnostic": entry.diagnostic,
        "remote_mta": entry.remote_mta,
        "provider": entry.provider,
        "event_id": entry.event_id,
    }


def recipients_view(message: SpooledMessage, status: MessageStatus) -> list[dict[str, Any]]:
    """Every envelope recipient's status (then any other address an event named): the
    latest event's, else ``accepted`` (by the ESP) once the message is delivered, else
    the message's own state."""
    known = {r.status.recipient.lower(): r for r in status.recipients}
    views: list[dict[str, Any]] = []
    for address in message.envelope.rcpt_tos:
        found = known.pop(address.lower(), None)
        if found is not None:
            views.append({**entry_view(found.status), "dsn_sent": list(found.dsn_sent)})
        elif message.state is MessageState.DELIVERED:
            views.append(
                {
                    "recipient": address,
                    "status": "accepted",
                    "at": iso_time(message.updated_at),
                    "provider": message.provider,
                    "provider_message_id": message.provider_message_id,
                }
            )
        else:
            views.append({"recipient": address, "status": message.state.value})
    for other in known.values():
        views.append({**entry_view(other.status), "dsn_sent": list(other.dsn_sent)})
    return views


# endregion
