"""ESP events forwarded to the failure webhook (``ESPRELAY_FAILURE_WEBHOOK_EVENTS``).

Off by default.  With ``ESPRELAY_FAILURE_WEBHOOK_URL`` and a list of event kinds
(``bounced,complained``), each new event of those kinds that names a spooled message
is POSTed there as JSON once it is applied (an event applied again after a crash is
not sent again)::

    {"type": "esprelay.event", "event": "bounced", "id": "<spool id>",
     "recipient": "...", "at": 1767225600.0, "smtp_status": "5.1.1",
     "diagnostic": "...", "remote_mta": "...", "provider": "sendgrid",
     "provider_event_id": "...", "esp_message_id": "...", "mail_from": "...",
     "message_id_header": "id@host"}

signed the Standard Webhooks way, as the generic HTTP provider signs
(:func:`esprelay.providers.http.sign`), when ``ESPRELAY_FAILURE_WEBHOOK_SECRET`` is
set: ``webhook-id`` is ``<provider>:<event id>`` (the receiver's idempotency key),
``webhook-timestamp`` the Unix time and ``webhook-signature`` ``v1,<base64 HMAC>``.
Best effort, like the failure records: a POST that fails is logged, not retried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from typing import Any

import httpx
import orjson

from esprelay.events.model import KINDS, Event
from esprelay.models import SpooledMessage
from esprelay.providers.http import sign

log = logging.getLogger("esprelay.events")

TIMEOUT = 10.0


def parse_kinds(value: str) -> frozenset[str]:
    """``bounced,complained`` as a set; ValueError naming an unknown kind."""
    kinds = frozenset(word.strip().lower() for word in value.split(",") if word.strip())
    unknown = sorted(kinds - set(KINDS))
    if unknown:
        raise ValueError(f"unknown event kind(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
    return kinds


def record(message: SpooledMessage, recipient: str, event: Event) -> dict[str, Any]:
    return {
        "type": "esprelay.event",
        "event": event.kind,
        "id": message.id,
        "recipient": recipient or None,
        "at": event.at,
        "smtp_status": event.smtp_status,
        "diagnostic": event.diagnostic,
        "remote_mta": event.remote_mta,
        "provider": event.provider,
        "provider_event_id": event.provider_event_id,
        "esp_message_id": event.esp_message_id,
        "mail_from": message.envelope.mail_from,
        "message_id_header": message.meta.get("message_id_header"),
    }


class EventForwarder:
    """POSTs the events of ``kinds`` to ``url`` in background tasks."""

    def __init__(
        self, *, url: str, kinds: Collection[str], key: bytes | None, client: httpx.AsyncClient
    ) -> None:
        self.url = url
        self.kinds = frozenset(kinds)
        self._key = key
        self._client = client
        self._tasks: set[asyncio.Task[None]] = set()

    def forward(self, message: SpooledMessage, recipient: str, event: Event) -> None:
        if event.kind not in self.kinds:
            return
        task = asyncio.create_task(self._post(message, recipient, event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self, timeout: float) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in set(self._tasks):
            task.cancel()

    async def _post(self, message: SpooledMessage, recipient: str, event: Event) -> None:
        body = orjson.dumps(record(message, recipient, event))
        headers = {"Content-Type": "application/json"}
        if self._key is not None:
            webhook_id = f"{event.provider}:{event.provider_event_id}"
            timestamp = int(time.time())
            headers.update(
                {
                    "webhook-id": webhook_id,
                    "webhook-timestamp": str(timestamp),
                    "webhook-signature": sign(self._key, webhook_id, timestamp, body),
                }
            )
        try:
            response = await self._client.post(
                self.url, content=body, headers=headers, timeout=TIMEOUT
            )
        except httpx.HTTPError as exc:
            log.error("event webhook for id=%s not delivered: %s", message.id, type(exc).__name__)
            return
        if not response.is_success:
            log.error("event webhook for id=%s answered HTTP %d", message.id, response.status_code)
