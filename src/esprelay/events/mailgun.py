"""Mailgun's webhooks, with their signature checked and replays refused.

Mailgun posts one JSON object per event: ``{"signature": {"timestamp", "token",
"signature"}, "event-data": {...}}``.  The signature is the hex HMAC-SHA256 of the
timestamp's text followed by the token, keyed with the account's *HTTP webhook signing
key* (``ESPRELAY_MAILGUN_WEBHOOK_SIGNING_KEY``); it is compared in constant time.  A
timestamp further than the tolerance from now is refused (``stale``), and so is a
token already seen within that window (``replayed``): the tokens of the window are
remembered (in this process; with several instances behind one address, a replay that
reaches another instance still changes nothing, since the event's ``id`` is stored
once).

esprelay's id comes back in ``user-variables`` (sent as ``v:esprelay_id``);
``message.headers.message-id`` is the id Mailgun's send API answered (without the
angle brackets).
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from typing import Any

from pydantic import SecretStr

from esprelay.events.common import (
    check_timestamp,
    enhanced_status,
    epoch,
    json_body,
    json_object,
    text,
)
from esprelay.events.model import Event, EventKind, Rejected, WebhookRequest, malformed
from esprelay.events.settings import SourceContext, SourceKind, WebhookSettings

#: The user variable that carries esprelay's id.
ID_VARIABLE = "esprelay_id"
#: Tokens remembered at most (the oldest go first); far above what the rate limit
#: lets in within a tolerance window.
MAX_TOKENS = 200_000

_KINDS: dict[str, EventKind] = {
    "accepted": "processed",
    "delivered": "delivered",
    "rejected": "dropped",
    "complained": "complained",
    "unsubscribed": "unsubscribed",
    "opened": "opened",
    "clicked": "clicked",
}


class MailgunWebhook(WebhookSettings):
    webhook_signing_key: SecretStr


class SeenTokens:
    """Tokens seen recently, each until its timestamp leaves the tolerance window."""

    def __init__(self, limit: int = MAX_TOKENS) -> None:
        self._until: OrderedDict[str, float] = OrderedDict()
        self._limit = limit

    def add(self, token: str, until: float, now: float) -> bool:
        """Remember ``token``; False when it was seen already (a replay)."""
        while self._until:
            oldest, expires = next(iter(self._until.items()))
            if expires > now and len(self._until) < self._limit:
                break
            del self._until[oldest]
        if token in self._until:
            return False
        self._until[token] = until
        return True


class MailgunEvents:
    kind = "mailgun"

    def __init__(self, provider: str, settings: MailgunWebhook, context: SourceContext) -> None:
        self.provider = provider
        self._key = settings.webhook_signing_key.get_secret_value().encode()
        self._context = context
        self._tokens = SeenTokens()

    async def aclose(self) -> None:
        pass

    async def receive(self, request: WebhookRequest) -> list[Event]:
        body = json_object(json_body(request.body), "the body")
        self.verify(body.get("signature"))
        data = json_object(body.get("event-data"), "event-data")
        return [self._event(data)]

    def verify(self, signed: Any) -> None:
        if not isinstance(signed, dict):
            raise Rejected(401, "signature", "no signature object")
        timestamp, token, signature = (
            signed.get("timestamp"),
            signed.get("token"),
            signed.get("signature"),
        )
        if isinstance(timestamp, int) and not isinstance(timestamp, bool):
            timestamp = str(timestamp)
        if not (isinstance(timestamp, str) and isinstance(token, str) and token):
            raise Rejected(401, "signature", "no timestamp or token")
        if not isinstance(signature, str):
            raise Rejected(401, "signature", "no signature")
        now = self._context.now()
        stamp = check_timestamp(timestamp, now, self._context.tolerance)
        expected = hmac.new(
            self._key, (timestamp + token).encode("utf-8"), hashlib.sha256
        ).hexdigest()
        if not hmac.compare_digest(expected.encode(), signature.strip().lower().encode()):
            raise Rejected(403, "signature", "the signature does not match")
        # Only a genuine token is remembered: forged ones cannot fill the memory.
        if not self._tokens.add(token, stamp + self._context.tolerance, now):
            raise Rejected(403, "replayed", "token seen before")

    def _event(self, data: dict[str, Any]) -> Event:
        event_id = text(data.get("id"))
        name = text(data.get("event"))
        at = epoch(data.get("timestamp"))
        if event_id is None or name is None or at is None:
            raise malformed("event-data lacks id, event or timestamp")
        status = data.get("delivery-status")
        status = status if isinstance(status, dict) else {}
        code = text(status.get("code"))
        message = text(status.get("message")) or text(status.get("description"))
        diagnostic = " ".join(part for part in (code, message) if part) or text(data.get("reason"))
        kind: EventKind
        if name == "failed":
            reason = text(data.get("reason")) or ""
            if text(data.get("severity")) == "temporary":
                kind = "deferred"
            elif reason.startswith("suppress-"):
                kind = "dropped"  # on a suppression list: Mailgun did not try
            else:
                kind = "bounced"
        else:
            kind = _KINDS.get(name, "other")
        message_headers = data.get("message")
        message_headers = message_headers if isinstance(message_headers, dict) else {}
        headers = message_headers.get("headers")
        headers = headers if isinstance(headers, dict) else {}
        variables = data.get("user-variables")
        variables = variables if isinstance(variables, dict) else {}
        smtp_status = None
        if kind in ("delivered", "deferred", "bounced"):
            smtp_status = enhanced_status(text(status.get("enhanced-code")), message, code)
        return Event(
            provider=self.provider,
            provider_event_id=event_id,
            kind=kind,
            recipient=text(data.get("recipient")),
            at=at,
            smtp_status=smtp_status,
            diagnostic=diagnostic,
            esp_message_id=(text(headers.get("message-id")) or "").strip("<>") or None,
            esprelay_id=text(variables.get(ID_VARIABLE)),
            remote_mta=text(status.get("mx-host")),
            raw=data,
        )


SOURCE = SourceKind("mailgun", MailgunWebhook, MailgunEvents)
