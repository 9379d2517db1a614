"""Postmark's webhooks: the weakest of the four, since Postmark signs nothing.

Postmark offers no signature.  What it does offer: HTTP Basic credentials written into
the webhook URL (``https://USER:PASSWORD@relay.example/webhooks/postmark``), which it
sends as an ``Authorization`` header, checked here in constant time against
``ESPRELAY_POSTMARK_WEBHOOK_USER`` / ``_PASSWORD``; and fixed source addresses,
which ``ESPRELAY_POSTMARK_WEBHOOK_ALLOWED_IPS`` may list (networks; the peer is the
TCP peer, so behind a reverse proxy list the proxy, or leave it empty and let the
proxy check).  Anyone who learns the URL can post events, and nothing limits a
captured request's replay but the event's own id (each is stored once): keep the
listener behind TLS and the password long.

One JSON object per request, its ``RecordType`` one of ``Delivery``, ``Bounce``,
``SpamComplaint``, ``Open``, ``Click``, ``SubscriptionChange``.  A bounce's ``Type``
says how bad: ``SoftBounce`` and ``Transient`` are ``deferred``, ``ManuallyDeactivated``
and ``Unsubscribe`` ``dropped``, ``AutoResponder`` and ``OpenRelayTest``-style notices
``other``, the rest ``bounced``.  ``MessageID`` is the id Postmark's send API answered;
esprelay's id comes back in ``Metadata.esprelay_id``.  Postmark gives a bounce an
``ID``; other records have none, so their event id is made of the record type, the
message id, the recipient and the time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
from typing import Any

from pydantic import SecretStr

from esprelay.config import Networks
from esprelay.events.common import enhanced_status, epoch, json_body, json_object, text
from esprelay.events.model import Event, EventKind, Rejected, WebhookRequest, malformed
from esprelay.events.settings import SourceContext, SourceKind, WebhookSettings

#: The metadata key that carries esprelay's id.
ID_KEY = "esprelay_id"

_BOUNCE_KINDS: dict[str, EventKind] = {
    "SoftBounce": "deferred",
    "Transient": "deferred",
    "ManuallyDeactivated": "dropped",
    "Unsubscribe": "dropped",
    "AutoResponder": "other",
    "Subscribe": "other",
    "OpenRelayTest": "other",
    "ChallengeVerification": "other",
}
_RECORDS: dict[str, tuple[EventKind, str]] = {
    # RecordType: kind, the field with the time
    "Delivery": ("delivered", "DeliveredAt"),
    "SpamComplaint": ("complained", "BouncedAt"),
    "Open": ("opened", "ReceivedAt"),
    "Click": ("clicked", "ReceivedAt"),
    "SubscriptionChange": ("unsubscribed", "ChangedAt"),
}


class PostmarkWebhook(WebhookSettings):
    webhook_user: str
    webhook_password: SecretStr
    webhook_allowed_ips: Networks = ()


def _digest(value: str) -> bytes:
    # Compare digests, not the strings: equal lengths, so compare_digest is constant-time.
    return hashlib.sha256(value.encode("utf-8")).digest()


class PostmarkEvents:
    kind = "postmark"

    def __init__(self, provider: str, settings: PostmarkWebhook, context: SourceContext) -> None:
        self.provider = provider
        self._user = _digest(settings.webhook_user)
        self._password = _digest(settings.webhook_password.get_secret_value())
        self._networks = tuple(
            ipaddress.ip_network(item, strict=False) for item in settings.webhook_allowed_ips
        )
        self._context = context

    async def aclose(self) -> None:
        pass

    async def receive(self, request: WebhookRequest) -> list[Event]:
        self.verify(request)
        return [self._event(json_object(json_body(request.body), "the body"))]

    def verify(self, request: WebhookRequest) -> None:
        if self._networks and not self._allowed(request.peer):
            raise Rejected(403, "address", f"peer {request.peer} is not allowed")
        challenge = {"WWW-Authenticate": 'Basic realm="esprelay events"'}
        scheme, _, value = (request.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "basic":
            raise Rejected(401, "credentials", "no Basic credentials", headers=challenge)
        try:
            user, colon, password = (
                base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
            )
        except (binascii.Error, UnicodeDecodeError):
            raise Rejected(
                401, "credentials", "unreadable credentials", headers=challenge
            ) from None
        # Both compared, always: the time taken does not say which one was wrong.
        good_user = hmac.compare_digest(_digest(user), self._user)
        good_password = hmac.compare_digest(_digest(password), self._password)
        if not (colon and good_user and good_password):
            raise Rejected(401, "credentials", "wrong credentials", headers=challenge)

    def _allowed(self, peer: str | None) -> bool:
        try:
            address = ipaddress.ip_address(peer or "")
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)

    def _event(self, record: dict[str, Any]) -> Event:
        record_type = text(record.get("RecordType"))
        message_id = text(record.get("MessageID"))
        metadata = record.get("Metadata")
        metadata = metadata if isinstance(metadata, dict) else {}
        details = text(record.get("Details"))
        smtp_status = None
        if record_type == "Bounce":
            bounce_type = text(record.get("Type")) or ""
            kind = _BOUNCE_KINDS.get(bounce_type, "bounced")
            at = epoch(record.get("BouncedAt"))
            recipient = text(record.get("Email"))
            if kind in ("bounced", "deferred"):
                # Postmark gives no status of its own: the MTA's text may hold one.
                smtp_status = enhanced_status(details) or (
                    "5.0.0" if kind == "bounced" else "4.0.0"
                )
            diagnostic = details or text(record.get("Description"))
        elif record_type in _RECORDS:
            kind, time_field = _RECORDS[record_type]
            at = epoch(record.get(time_field))
            recipient = text(record.get("Recipient")) or text(record.get("Email"))
            diagnostic = details
            if kind == "delivered":
                smtp_status = enhanced_status(details) or "2.0.0"
        else:
            raise malformed(f"unknown RecordType {record_type!r}")
        if at is None:
            raise malformed("the record has no time")
        event_id = text(record.get("ID"))
        if event_id is None:
            event_id = f"{record_type}:{message_id or ''}:{recipient or ''}:{at!r}"
        else:
            event_id = f"{record_type}:{event_id}"
        return Event(
            provider=self.provider,
            provider_event_id=event_id,
            kind=kind,
            recipient=recipient,
            at=at,
            smtp_status=smtp_status,
            diagnostic=diagnostic,
            esp_message_id=message_id,
            esprelay_id=text(metadata.get(ID_KEY)),
            raw=record,
        )


SOURCE = SourceKind("postmark", PostmarkWebhook, PostmarkEvents)
