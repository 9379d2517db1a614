"""SendGrid: ``POST /v3/mail/send`` with a JSON body built from the parsed message.

Facts from SendGrid's v3 Mail Send reference (``tsg_mail_v3.json``): Bearer API key;
``personalizations`` and ``from`` are required and every personalization needs a
``to``; ``content`` lists text/plain before text/html and each ``value`` is non-empty;
attachments need ``content`` and ``filename``, inline images ``disposition: inline``
plus ``content_id``; ``headers`` may not set To, From, Subject, Reply-To, CC, BCC,
Content-Type, Content-Transfer-Encoding, DKIM-Signature, Received or x-sg-*; the
whole request stays under 30 MB and 1000 recipients.  Success is ``202`` with the
message id in ``X-Message-Id``.  Recipient names with a comma or semicolon are quoted:
SendGrid otherwise reads part of the name as an address and drops the message.
An attachment's ``type`` takes no parameters (SendGrid refuses a ``;``), so a calendar
invitation goes out as a ``text/calendar; method=...`` entry of ``content``.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import httpx
from pydantic import SecretStr

from esprelay.errors import (
    DeliveryError,
    MessageRejected,
    ProviderConfigError,
    RateLimited,
)
from esprelay.message.mime import (
    Attachment,
    Mailbox,
    ParsedMessage,
    attachment_text,
    fallback_filename,
    parse,
    summarize,
)
from esprelay.models import OutboundMessage, SendResult
from esprelay.providers.base import (
    Built,
    HttpProvider,
    PostTarget,
    ProviderKind,
    ProviderSettings,
    classify_status,
    excerpt,
    json_body,
    parse_retry_after,
)

REQUEST_LIMIT = 30_000_000  # bytes, the whole JSON request
#: Headers SendGrid sets itself and refuses in ``headers`` (plus every x-sg-*).
RESERVED_HEADERS = frozenset(
    {
        "to",
        "from",
        "subject",
        "reply-to",
        "cc",
        "bcc",
        "content-type",
        "content-transfer-encoding",
        "dkim-signature",
        "received",
        "return-path",  # the ESP writes its own bounce address
    }
)


def build_payload(parsed: ParsedMessage) -> tuple[dict[str, Any], list[str]]:
    """The Mail Send JSON for ``parsed``, and what had to change to fit; pure."""
    warnings = list(parsed.warnings)
    if parsed.from_ is None:
        raise MessageRejected("no usable From address and no envelope sender", provider="sendgrid")
    payload: dict[str, Any] = {
        "personalizations": _personalizations(parsed, warnings),
        "from": _mailbox(parsed.from_, quote=False),
    }
    if parsed.subject:
        payload["subject"] = parsed.subject
    else:
        payload["subject"] = "(no subject)"
        warnings.append("no Subject: sent as '(no subject)' (SendGrid requires one)")
    if len(parsed.reply_to) == 1:
        payload["reply_to"] = _mailbox(parsed.reply_to[0], quote=False)
    elif parsed.reply_to:
        payload["reply_to_list"] = [_mailbox(m, quote=False) for m in parsed.reply_to]

    content = [
        {"type": ctype, "value": value}
        for ctype, value in (("text/plain", parsed.text), ("text/html", parsed.html))
        if value
    ]
    if not content:
        content = [{"type": "text/plain", "value": " "}]
        warnings.append("no text or HTML body: sent a blank text body (SendGrid requires one)")
    invite = _invitation(parsed, warnings)
    if invite is not None:
        content.append(invite[1])
    payload["content"] = content

    attachments = _attachments(parsed, warnings, skip=invite[0] if invite else None)
    if attachments:
        payload["attachments"] = attachments
    headers = _headers(parsed, warnings)
    if headers:
        payload["headers"] = headers
    return payload, warnings


def _mailbox(box: Mailbox, *, quote: bool = True) -> dict[str, str]:
    out = {"email": box.addr}
    name = box.name
    if name:
        if quote and (("," in name) or (";" in name)):
            name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out["name"] = name
    return out


def _personalizations(parsed: ParsedMessage, warnings: list[str]) -> list[dict[str, Any]]:
    r = parsed.recipients
    if not r.all():
        raise MessageRejected("no recipients", provider="sendgrid")
    to, cc = r.to, r.cc
    if not to and cc:
        warnings.append("no To recipient: the Cc recipients are sent as To (SendGrid needs a To)")
        to, cc = cc, ()
    if not to:
        # Every recipient is blind: one personalization each, so nobody sees another.
        warnings.append(
            "no visible recipient: each Bcc recipient gets a copy addressed to itself"
            " (SendGrid needs a To)"
        )
        return [{"to": [_mailbox(box)]} for box in r.bcc]
    personalization: dict[str, Any] = {"to": [_mailbox(b) for b in to]}
    if cc:
        personalization["cc"] = [_mailbox(b) for b in cc]
    if r.bcc:
        personalization["bcc"] = [_mailbox(b) for b in r.bcc]
    return [personalization]


def _invitation(
    parsed: ParsedMessage, warnings: list[str]
) -> tuple[Attachment, dict[str, str]] | None:
    """The first calendar part with a ``method`` (an invitation, a reply, a
    cancellation...) as a ``content`` entry of its own, ``text/calendar; method=REQUEST``,
    and the part it came from.

    SendGrid refuses a ``;`` in an attachment's ``type`` ("The attachment type cannot
    contain ';', or CRLF characters", sendgrid-nodejs#1313), and a calendar attachment
    without its method is shown as a plain .ics file rather than an invitation; a
    ``content`` entry keeps the parameter and goes out as a part of the message's
    multipart/alternative, where Outlook and Gmail look for invitations (SendGrid's
    own example, sendgrid-ruby#298).  SendGrid sends that text as UTF-8.
    """
    for att in parsed.attachments:
        params = dict(att.params)
        method = params.get("method")
        if att.content_type != "text/calendar" or not method or not att.content:
            continue
        value = attachment_text(att, warnings)
        if not value.strip() or any(c in method for c in ';"\r\n'):
            continue
        return att, {"type": f"text/calendar; method={method}", "value": value}
    return None


def _harmless(key: str, value: str) -> bool:
    """A Content-Type parameter that does not change how an attachment is read (Apple
    Mail's x-unix-mode, x-mac-type..., an ASCII or UTF-8 charset): dropped silently."""
    if key.startswith("x-"):
        return True
    return key == "charset" and value.lower() in ("us-ascii", "utf-8", "ascii", "utf8")


def _attachments(
    parsed: ParsedMessage, warnings: list[str], skip: Attachment | None = None
) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for index, att in enumerate(parsed.attachments, 1):
        if att is skip:
            if not att.filename:
                continue  # an alternative part: sent as content, not as a file too
        elif att.content_type == "text/calendar" and dict(att.params).get("method"):
            warnings.append(
                f"attachment {index} is a second calendar part: its method is dropped"
                " (SendGrid takes one as content, attachment types take no parameters)"
            )
        dropped = [f"{k}={v}" for k, v in att.params if k != "method" and not _harmless(k, v)]
        if dropped and att is not skip:
            warnings.append(
                f"attachment {index} ({att.content_type}) lost its parameters"
                f" {'; '.join(dropped)} (SendGrid's attachment type takes none)"
            )
        if not att.content:
            warnings.append(f"attachment {index} is empty and was dropped (SendGrid refuses it)")
            continue
        filename = att.filename
        if not filename:
            filename = fallback_filename(att, index)
            warnings.append(f"attachment {index} ({att.content_type}) had no filename: {filename}")
        item = {
            "content": base64.b64encode(att.content).decode("ascii"),
            "type": att.content_type,
            "filename": filename,
            "disposition": "attachment",
        }
        if att.inline and att.content_id:
            item["disposition"] = "inline"
            item["content_id"] = att.content_id
        elif att.inline:
            warnings.append(f"inline part {index} has no Content-ID: sent as an attachment")
        out.append(item)
    return out


def _headers(parsed: ParsedMessage, warnings: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    seen: set[str] = set()
    dropped: list[str] = []
    for name, value in parsed.headers:
        lname = name.lower()
        if lname in RESERVED_HEADERS or lname.startswith("x-sg-"):
            dropped.append(name)
        elif lname in seen:
            dropped.append(f"{name} (repeated)")  # a JSON object holds one value per name
        else:
            seen.add(lname)
            out[name] = value
    if dropped:
        warnings.append(f"headers SendGrid does not accept were dropped: {summarize(dropped)}")
    return out


class SendGridProvider(HttpProvider):
    kind = "sendgrid"
    rebuilds_message = True
    smtputf8 = False  # v3 answers 202 then drops a UTF-8 local part as "Invalid"
    #: Raw bytes that still fit 30 MB after base64 (4/3) with room for the JSON around.
    max_message_size = REQUEST_LIMIT * 3 // 4 - 200_000
    max_recipients = 1000

    def __init__(
        self, client: httpx.AsyncClient, api_key: SecretStr, api_url: str, name: str | None = None
    ) -> None:
        super().__init__(client, name)
        self._api_key = api_key
        self.endpoint = api_url.rstrip("/") + "/v3/mail/send"
        self._target = PostTarget(
            self.endpoint,
            {
                "Authorization": f"Bearer {api_key.get_secret_value()}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
        )

    def build_request(self, message: OutboundMessage) -> Built:
        payload, warnings = build_payload(parse(message.raw, message.envelope))
        body = json_body(payload)
        if len(body) >= REQUEST_LIMIT:
            raise MessageRejected(
                f"request of {len(body)} bytes exceeds SendGrid's 30 MB limit", provider=self.name
            )
        return Built(self._target.request(body), tuple(warnings))

    def parse_response(self, response: httpx.Response, message: OutboundMessage) -> SendResult:
        warnings: tuple[str, ...] = ()
        if response.status_code != 202:
            # SendGrid answers 202 and nothing else; a 200 is some other server.
            raise ProviderConfigError(
                f"unexpected HTTP {response.status_code} (not SendGrid's 202; check"
                f" ESPRELAY_SENDGRID_API_URL): {excerpt(response)}",
                provider=self.name,
                status_code=response.status_code,
            )
        provider_id = response.headers.get("x-message-id")
        if not provider_id:
            warnings += ("SendGrid answered 202 without an X-Message-Id",)
        return SendResult(provider_message_id=provider_id, warnings=warnings)

    def classify_error(self, response: httpx.Response) -> DeliveryError:
        status = response.status_code
        if status == 429:
            return RateLimited(
                f"HTTP 429: {excerpt(response)}",
                provider=self.name,
                status_code=status,
                retry_after=rate_limit_reset(response),
            )
        if status in (404, 405):
            return ProviderConfigError(
                f"HTTP {status} (check ESPRELAY_SENDGRID_API_URL): {excerpt(response)}",
                provider=self.name,
                status_code=status,
            )
        return classify_status(response, provider=self.name)


def rate_limit_reset(response: httpx.Response, *, now: float | None = None) -> float | None:
    """Seconds until SendGrid's ``X-RateLimit-Reset`` (epoch seconds), else Retry-After."""
    value = response.headers.get("x-ratelimit-reset")
    if value:
        try:
            return max(0.0, float(value) - (time.time() if now is None else now))
        except ValueError:
            pass
    return parse_retry_after(response.headers.get("retry-after"))


class SendGridSettings(ProviderSettings):
    """``ESPRELAY_SENDGRID_*``: an API key with Mail Send permission."""

    api_key: SecretStr
    api_url: str = "https://api.sendgrid.com"

    def api_urls(self) -> tuple[str, ...]:
        return (self.api_url,)


def build(settings: SendGridSettings, client: httpx.AsyncClient) -> SendGridProvider:
    return SendGridProvider(client, settings.api_key, settings.api_url)


KIND = ProviderKind("sendgrid", SendGridSettings, build, "SendGrid v3 Mail Send (JSON)")
