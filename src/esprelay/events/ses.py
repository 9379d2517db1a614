"""Amazon SES events delivered by Amazon SNS over HTTPS, with SNS's signature checked.

SES publishes its events (a configuration set's event destination, or an identity's
notifications) to an SNS topic; the topic posts each one to this endpoint as an SNS
message: JSON with ``Type``, ``MessageId``, ``TopicArn``, ``Message`` (the SES event,
JSON again), ``Timestamp``, ``SignatureVersion``, ``Signature`` and ``SigningCertURL``.

Checked, in this order, before anything is fetched or stored:

1. ``TopicArn`` is one of ``ESPRELAY_SES_SNS_TOPIC_ARNS`` (403 ``topic`` otherwise);
2. ``SigningCertURL`` is HTTPS on the SNS host of the topic's own region
   (``sns.<region>.amazonaws.com``, ``...amazonaws.com.cn`` in China) and names a
   ``.pem``; the certificate is fetched over verified TLS, kept (by URL) for later
   messages, and must be within its validity period;
3. the signature (base64; ``SignatureVersion`` 1 = SHA1withRSA, 2 = SHA256withRSA)
   over SNS's canonical text of the message: ``Key\\nValue\\n`` for ``Message``,
   ``MessageId``, ``Subject`` (when present), ``Timestamp``, ``TopicArn``, ``Type``
   for a notification; ``Message``, ``MessageId``, ``SubscribeURL``, ``Timestamp``,
   ``Token``, ``TopicArn``, ``Type`` for a (un)subscription confirmation.

A ``SubscriptionConfirmation`` so verified is confirmed by fetching its
``SubscribeURL`` (which must be on the same SNS host); one for any other topic is
refused before anything is fetched.  The SNS ``MessageId`` plus the recipient is each
event's id, so SNS's retries are stored once.  The signed ``Timestamp`` is not held to
the tolerance of the other ESPs: SNS keeps it through retries that a delivery policy
may spread over hours, and a replayed notification changes nothing (its id is stored).

Which SES events: ``Bounce`` (every bounce is ``bounced``, SES tries no more; the
recipient's ``status`` says whether it was permanent, 5.x.x, or not, 4.x.x),
``Complaint``, ``Delivery``, ``DeliveryDelay`` (``deferred``), ``Reject`` and
``RenderingFailure`` (``dropped``), ``Send`` (``processed``), ``Open``, ``Click``,
``Subscription``.  ``mail.messageId`` is the id SES's send API answered; esprelay's id
comes back as the ``esprelay_id`` message tag (``mail.tags``) or, failing that, an
``X-Esprelay-Id`` header among ``mail.headers``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pydantic import AfterValidator, Field

from esprelay.config import StrList
from esprelay.events.common import enhanced_status, epoch, json_body, json_object, text
from esprelay.events.model import Event, EventKind, Rejected, WebhookRequest, malformed
from esprelay.events.settings import SourceContext, SourceKind, WebhookSettings

log = logging.getLogger("esprelay.events")

#: The message tag (SES ``EmailTags``) and header that carry esprelay's id.
ID_TAG = "esprelay_id"
ID_HEADER = "x-esprelay-id"
MAX_CERTIFICATE = 64 * 1024
CACHED_CERTIFICATES = 32

_NOTIFICATION_KEYS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
_CONFIRMATION_KEYS = (
    "Message",
    "MessageId",
    "SubscribeURL",
    "Timestamp",
    "Token",
    "TopicArn",
    "Type",
)
_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "1": hashes.SHA1,
    "2": hashes.SHA256,
}

#: Given an URL and the topic's region: may a certificate (or a subscription
#: confirmation) be fetched from it?  Tests point it at a loopback server.
UrlCheck = Callable[[str, str], bool]


def sns_url_allowed(url: str, region: str) -> bool:
    """HTTPS, on SNS's own host for ``region``, default port, no user part."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    host = (parts.hostname or "").lower()
    return (
        parts.scheme == "https"
        and port in (None, 443)
        and "@" not in parts.netloc
        and host in (f"sns.{region}.amazonaws.com", f"sns.{region}.amazonaws.com.cn")
    )


def topic_region(arn: str) -> str | None:
    """``us-east-1`` of ``arn:aws:sns:us-east-1:123456789012:topic``."""
    parts = arn.split(":")
    if len(parts) != 6 or parts[0] != "arn" or parts[2] != "sns" or not parts[3]:
        return None
    return parts[3]


def canonical_text(message: dict[str, Any]) -> bytes:
    """The text SNS signs for ``message`` (see the module doc)."""
    kind = message.get("Type")
    keys = _NOTIFICATION_KEYS if kind == "Notification" else _CONFIRMATION_KEYS
    lines = []
    for key in keys:
        value = message.get(key)
        if value is None:
            if key == "Subject":
                continue
            raise malformed(f"the SNS message has no {key}")
        if not isinstance(value, str):
            raise malformed(f"the SNS message's {key} is not text")
        lines.append(f"{key}\n{value}\n")
    return "".join(lines).encode("utf-8")


def _valid_arns(values: tuple[str, ...]) -> tuple[str, ...]:
    for value in values:
        if topic_region(value) is None:
            raise ValueError(f"{value!r} is not an SNS topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME)")
    return values


class SesWebhook(WebhookSettings):
    sns_topic_arns: Annotated[StrList, AfterValidator(_valid_arns)] = Field(min_length=1)


class SesEvents:
    kind = "ses"

    def __init__(self, provider: str, settings: SesWebhook, context: SourceContext) -> None:
        self.provider = provider
        self._topics = frozenset(settings.sns_topic_arns)
        self._context = context
        self._url_allowed: UrlCheck = context.overrides.get("sns_url_allowed", sns_url_allowed)
        self._certificates: OrderedDict[str, rsa.RSAPublicKey] = OrderedDict()
        self._fetching = asyncio.Lock()

    async def aclose(self) -> None:
        pass

    async def receive(self, request: WebhookRequest) -> list[Event]:
        message = json_object(json_body(request.body), "the SNS message")
        kind = message.get("Type")
        if kind not in ("Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation"):
            raise malformed("not an SNS message (Type)")
        topic = message.get("TopicArn")
        if not isinstance(topic, str) or topic not in self._topics:
            raise Rejected(403, "topic", f"topic {str(topic)[:200]!r} is not configured")
        region = topic_region(topic)
        assert region is not None  # configured topics are valid ARNs
        await self.verify(message, region)
        if kind == "SubscriptionConfirmation":
            await self._confirm(message, region, topic)
            return []
        if kind == "UnsubscribeConfirmation":
            log.warning("events %s: SNS unsubscribed this endpoint from %s", self.provider, topic)
            return []
        return self._events(message)

    async def verify(self, message: dict[str, Any], region: str) -> None:
        version = message.get("SignatureVersion")
        hash_type = _HASHES.get(version) if isinstance(version, str) else None
        if hash_type is None:
            raise Rejected(403, "signature", f"unsupported SignatureVersion {version!r}")
        signature, url = message.get("Signature"), message.get("SigningCertURL")
        if not isinstance(signature, str) or not isinstance(url, str):
            raise Rejected(401, "signature", "no Signature or SigningCertURL")
        if not url.lower().endswith(".pem") or not self._url_allowed(url, region):
            raise Rejected(403, "signature", "SigningCertURL is not an SNS address")
        try:
            raw_signature = base64.b64decode(signature, validate=True)
        except binascii.Error:
            raise Rejected(403, "signature", "the signature is not base64") from None
        signed = canonical_text(message)
        key = await self._certificate(url)
        try:
            key.verify(raw_signature, signed, padding.PKCS1v15(), hash_type())
        except InvalidSignature:
            raise Rejected(403, "signature", "the signature does not match") from None

    async def _certificate(self, url: str) -> rsa.RSAPublicKey:
        key = self._certificates.get(url)
        if key is not None:
            self._certificates.move_to_end(url)
            return key
        async with self._fetching:
            key = self._certificates.get(url)
            if key is None:
                key = await self._fetch_certificate(url)
                self._certificates[url] = key
                while len(self._certificates) > CACHED_CERTIFICATES:
                    self._certificates.popitem(last=False)
        return key

    async def _fetch_certificate(self, url: str) -> rsa.RSAPublicKey:
        try:
            async with self._context.client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise Rejected(403, "certificate", f"{url} answered {response.status_code}")
                body = b""
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_CERTIFICATE:
                        raise Rejected(403, "certificate", f"{url} is too large")
        except httpx.HTTPError as exc:
            # Not the ESP's fault, maybe: 503, so that SNS tries again later.
            raise Rejected(503, "certificate", f"cannot fetch {url}: {exc!r}") from None
        try:
            certificate = x509.load_pem_x509_certificate(body)
        except ValueError:
            raise Rejected(403, "certificate", f"{url} is not a PEM certificate") from None
        now = datetime.datetime.fromtimestamp(self._context.now(), datetime.UTC)
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            raise Rejected(403, "certificate", f"{url} is outside its validity period")
        key = certificate.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise Rejected(403, "certificate", f"{url} holds no RSA key")
        return key

    async def _confirm(self, message: dict[str, Any], region: str, topic: str) -> None:
        url = message.get("SubscribeURL")
        if not isinstance(url, str) or not self._url_allowed(url, region):
            raise Rejected(403, "topic", "SubscribeURL is not an SNS address")
        try:
            response = await self._context.client.get(url)
        except httpx.HTTPError as exc:
            raise Rejected(503, "subscription", f"cannot confirm: {exc!r}") from None
        if response.status_code != 200:
            raise Rejected(503, "subscription", f"SNS answered {response.status_code}")
        log.info("events %s: confirmed the SNS subscription to %s", self.provider, topic)

    # region SES events

    def _events(self, message: dict[str, Any]) -> list[Event]:
        sns_id = message.get("MessageId")
        body = message.get("Message")
        if not isinstance(sns_id, str) or not isinstance(body, str):
            raise malformed("the SNS notification has no MessageId or Message")
        try:
            ses = json_object(json_body(body.encode("utf-8")), "the SES event")
        except Rejected:
            ses = {}
        name = text(ses.get("eventType")) or text(ses.get("notificationType"))
        if name is None:
            # Genuine (verified, a configured topic) but no SES event: SES's test message
            # when an event destination is added, or a message someone published to the
            # topic.  Acknowledged, so that SNS does not send it again; nothing stored.
            log.info(
                "events %s: SNS message %s on %s is no SES event; acknowledged, not stored",
                self.provider,
                sns_id,
                message.get("TopicArn"),
            )
            return []
        mail = ses.get("mail")
        mail = mail if isinstance(mail, dict) else {}
        sent_at = epoch(mail.get("timestamp"))
        common = {
            "esp_message_id": text(mail.get("messageId")),
            "esprelay_id": _esprelay_id(mail),
        }
        rows: list[tuple[EventKind, str | None, float | None, dict[str, Any]]] = []
        destination = [text(r) for r in _list(mail.get("destination"))]
        if name == "Bounce":
            bounce = _dict(ses.get("bounce"))
            permanent = text(bounce.get("bounceType")) == "Permanent"
            at = epoch(bounce.get("timestamp"))
            for item in _list(bounce.get("bouncedRecipients")):
                item = _dict(item)
                diagnostic = text(item.get("diagnosticCode"))
                status = enhanced_status(text(item.get("status")), diagnostic) or (
                    "5.0.0" if permanent else "4.0.0"
                )
                rows.append(
                    (
                        "bounced",
                        text(item.get("emailAddress")),
                        at,
                        {
                            "smtp_status": status,
                            "diagnostic": diagnostic
                            or f"{bounce.get('bounceType')}/{bounce.get('bounceSubType')}",
                            "remote_mta": text(bounce.get("remoteMtaIp")),
                        },
                    )
                )
        elif name == "Complaint":
            complaint = _dict(ses.get("complaint"))
            at = epoch(complaint.get("timestamp"))
            for item in _list(complaint.get("complainedRecipients")):
                rows.append(("complained", text(_dict(item).get("emailAddress")), at, {}))
        elif name == "Delivery":
            delivery = _dict(ses.get("delivery"))
            at = epoch(delivery.get("timestamp"))
            response = text(delivery.get("smtpResponse"))
            for recipient in _list(delivery.get("recipients")):
                rows.append(
                    (
                        "delivered",
                        text(recipient),
                        at,
                        {
                            "smtp_status": enhanced_status(response) or "2.0.0",
                            "diagnostic": response,
                            "remote_mta": text(delivery.get("remoteMtaIp")),
                        },
                    )
                )
        elif name == "DeliveryDelay":
            delay = _dict(ses.get("deliveryDelay"))
            at = epoch(delay.get("timestamp"))
            for item in _list(delay.get("delayedRecipients")):
                item = _dict(item)
                diagnostic = text(item.get("diagnosticCode"))
                rows.append(
                    (
                        "deferred",
                        text(item.get("emailAddress")),
                        at,
                        {
                            "smtp_status": enhanced_status(text(item.get("status")), diagnostic)
                            or "4.0.0",
                            "diagnostic": diagnostic or text(delay.get("delayType")),
                            "remote_mta": text(delay.get("reportingMTA")),
                        },
                    )
                )
        else:
            kind, section = _OTHER.get(name or "", ("other", ""))
            details = _dict(ses.get(section)) if section else {}
            at = epoch(details.get("timestamp")) or sent_at
            reason = text(details.get("reason")) or text(details.get("errorMessage"))
            for recipient in destination or [None]:
                rows.append((kind, recipient, at, {"diagnostic": reason}))
        if not rows:
            raise malformed(f"the SES {name or 'event'} names no recipient")
        events = []
        for kind, recipient, at, fields in rows:
            events.append(
                Event(
                    provider=self.provider,
                    provider_event_id=f"{sns_id}:{recipient or ''}",
                    kind=kind,
                    recipient=recipient,
                    at=at or sent_at or self._context.now(),
                    raw=ses,
                    **common,
                    **fields,
                )
            )
        return events

    # endregion


_OTHER: dict[str, tuple[EventKind, str]] = {
    "Send": ("processed", "send"),
    "Reject": ("dropped", "reject"),
    "RenderingFailure": ("dropped", "failure"),
    "Open": ("opened", "open"),
    "Click": ("clicked", "click"),
    "Subscription": ("unsubscribed", "subscription"),
}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _esprelay_id(mail: dict[str, Any]) -> str | None:
    tags = _dict(mail.get("tags")).get(ID_TAG)
    if isinstance(tags, list) and tags:
        return text(tags[0])
    for item in _list(mail.get("headers")):
        item = _dict(item)
        if str(item.get("name", "")).lower() == ID_HEADER:
            return text(item.get("value"))
    return None


SOURCE = SourceKind("ses", SesWebhook, SesEvents)
