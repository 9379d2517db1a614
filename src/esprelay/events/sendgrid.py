"""SendGrid's Event Webhook, with its signature checked.

SendGrid posts a JSON array of events.  With *Signed Event Webhook Requests* on, each
request carries ``X-Twilio-Email-Event-Webhook-Timestamp`` and
``X-Twilio-Email-Event-Webhook-Signature``: an ECDSA P-256 / SHA-256 signature
(base64, DER) over the timestamp's text followed by the raw body, made with a key
whose public half SendGrid shows as base64 DER (``ESPRELAY_SENDGRID_WEBHOOK_PUBLIC_KEY``;
a PEM block is accepted too).  A request whose timestamp is further than the tolerance
from now is refused (``stale``); within the window a replay changes nothing, since each
event's ``sg_event_id`` is stored once.

esprelay's id comes back as the ``esprelay_id`` custom argument, a top-level key of
every event (asynchronous bounces carry no message id otherwise).  ``sg_message_id``
is ``<X-Message-ID of the send>.<filter suffix>``: ``esp_message_id`` is the part
before the first dot, the id the send API answered.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key, load_pem_public_key
from pydantic import field_validator

from esprelay.events.common import check_timestamp, enhanced_status, epoch, json_body, text
from esprelay.events.model import Event, EventKind, Rejected, WebhookRequest, malformed
from esprelay.events.settings import SourceContext, SourceKind, WebhookSettings

SIGNATURE = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP = "X-Twilio-Email-Event-Webhook-Timestamp"
#: The custom argument that carries esprelay's id.
ID_ARG = "esprelay_id"

_KINDS: dict[str, EventKind] = {
    "processed": "processed",
    "delivered": "delivered",
    "deferred": "deferred",
    "bounce": "bounced",  # type "bounce" or "blocked": SendGrid tries no more
    "dropped": "dropped",
    "spamreport": "complained",
    "unsubscribe": "unsubscribed",
    "group_unsubscribe": "unsubscribed",
    "open": "opened",
    "click": "clicked",
}


def load_public_key(value: str) -> ec.EllipticCurvePublicKey:
    """SendGrid's verification key: base64 DER (as its settings page shows it) or PEM."""
    value = value.strip()
    try:
        if value.startswith("-----BEGIN"):
            key = load_pem_public_key(value.encode())
        else:
            key = load_der_public_key(base64.b64decode(value, validate=True))
    except (ValueError, binascii.Error, TypeError):
        raise ValueError("not a public key (paste the base64 key SendGrid shows)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("not an ECDSA P-256 public key")
    return key


class SendgridWebhook(WebhookSettings):
    webhook_public_key: str

    @field_validator("webhook_public_key")
    @classmethod
    def _key(cls, value: str) -> str:
        load_public_key(value)
        return value


class SendgridEvents:
    kind = "sendgrid"

    def __init__(self, provider: str, settings: SendgridWebhook, context: SourceContext) -> None:
        self.provider = provider
        self._key = load_public_key(settings.webhook_public_key)
        self._context = context

    async def aclose(self) -> None:
        pass

    async def receive(self, request: WebhookRequest) -> list[Event]:
        self.verify(request)
        body = json_body(request.body)
        if not isinstance(body, list):
            raise malformed("the body is not a JSON array of events")
        return [self._event(item) for item in body]

    def verify(self, request: WebhookRequest) -> None:
        signature = request.headers.get(SIGNATURE)
        timestamp = request.headers.get(TIMESTAMP)
        if not signature or not timestamp:
            raise Rejected(401, "signature", "no signature headers")
        check_timestamp(timestamp, self._context.now(), self._context.tolerance)
        try:
            der = base64.b64decode(signature, validate=True)
        except binascii.Error:
            raise Rejected(403, "signature", "the signature is not base64") from None
        try:
            self._key.verify(
                der, timestamp.encode("ascii") + request.body, ec.ECDSA(hashes.SHA256())
            )
        except (InvalidSignature, UnicodeEncodeError):
            raise Rejected(403, "signature", "the signature does not match") from None

    def _event(self, item: Any) -> Event:
        if not isinstance(item, dict):
            raise malformed("an event is not a JSON object")
        event_id = text(item.get("sg_event_id"))
        name = text(item.get("event"))
        at = epoch(item.get("timestamp"))
        if event_id is None or name is None or at is None:
            raise malformed("an event lacks sg_event_id, event or timestamp")
        message_id = text(item.get("sg_message_id"))
        status = text(item.get("status"))
        diagnostic = text(item.get("response")) or text(item.get("reason"))
        kind = _KINDS.get(name, "other")
        return Event(
            provider=self.provider,
            provider_event_id=event_id,
            kind=kind,
            recipient=text(item.get("email")),
            at=at,
            smtp_status=enhanced_status(status, diagnostic)
            if kind in ("delivered", "deferred", "bounced")
            else status,
            diagnostic=diagnostic,
            esp_message_id=message_id.split(".", 1)[0] if message_id else None,
            esprelay_id=text(item.get(ID_ARG)),
            remote_mta=text(item.get("mx")),
            raw=item,
        )


SOURCE = SourceKind("sendgrid", SendgridWebhook, SendgridEvents)
