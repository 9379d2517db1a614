"""Postmark: ``POST /email`` with a JSON body built from the parsed message.

Facts from Postmark's server API (``postmark_send_swagger.yaml``, the email API
reference and support articles): the ``X-Postmark-Server-Token`` header; From, To,
Cc, Bcc as comma-separated address strings; one HtmlBody and one TextBody (5 MB
each, at least one of them); ``Headers`` as Name/Value pairs; ``Attachments`` with
Name, base64 Content, ContentType (parameters included, so a calendar invitation
keeps ``method=REQUEST``) and ``ContentID: "cid:..."`` for inline images;
an optional ``MessageStream``; at most 10 MB per request.  Postmark counts at most
50 recipients per message across To, Cc and Bcc together, so that is the recipient
limit enforced at RCPT time (the API reference says "Max 50" per field; the support
article on ErrorCode 300 says the 50 include every field).

Success is ``200`` with ``ErrorCode: 0`` and a ``MessageID``.  A ``200`` with another
ErrorCode is an error; a ``422`` carries the ErrorCode that decides permanent
(300 invalid request, 406 inactive recipient, ...) versus an operator problem
(10 bad token, 400/401 sender signature missing or unconfirmed, 405/412/413 account
may not send, 1235 unknown message stream).
"""

from __future__ import annotations

import base64
from typing import Any

import httpx
from pydantic import SecretStr

from esprelay.errors import (
    DeliveryError,
    MessageRejected,
    ProviderConfigError,
    ProviderUnavailable,
    RateLimited,
)
from esprelay.message.mime import (
    Mailbox,
    ParsedMessage,
    fallback_filename,
    full_content_type,
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

REQUEST_LIMIT = 10_000_000  # bytes, the whole JSON request
BODY_LIMIT = 5_000_000  # bytes, each of TextBody and HtmlBody
FIELD_LIMIT = 50  # addresses in each of To, Cc, Bcc (and in all of them together)
#: Trace headers that describe the hops so far; Postmark writes its own.
DROPPED_HEADERS = frozenset({"received", "return-path", "dkim-signature"})
CONFIG_CODES = frozenset({10, 400, 401, 405, 412, 413, 1235})
_SPECIALS = set('()<>[]:;@\\,."')


def format_address(box: Mailbox) -> str:
    """``Name <addr>``, quoting the name when it holds specials; Unicode stays as is."""
    if not box.name:
        return box.addr
    name = box.name
    if any(c in _SPECIALS for c in name):
        name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{name} <{box.addr}>"


def build_payload(
    parsed: ParsedMessage, message_stream: str | None = None
) -> tuple[dict[str, Any], list[str]]:
    """The /email JSON for ``parsed``, and what had to change to fit; pure."""
    warnings = list(parsed.warnings)
    if parsed.from_ is None:
        raise MessageRejected("no usable From address and no envelope sender", provider="postmark")
    r = parsed.recipients
    if not r.all():
        raise MessageRejected("no recipients", provider="postmark")
    if len(r.all()) > FIELD_LIMIT:
        raise MessageRejected(
            f"{len(r.all())} recipients; Postmark takes at most {FIELD_LIMIT} per message",
            provider="postmark",
        )
    payload: dict[str, Any] = {"From": format_address(parsed.from_)}
    for field, boxes in (("To", r.to), ("Cc", r.cc), ("Bcc", r.bcc)):
        if boxes:
            payload[field] = ", ".join(format_address(b) for b in boxes)
    if parsed.subject:
        payload["Subject"] = parsed.subject
    if parsed.reply_to:
        payload["ReplyTo"] = ", ".join(format_address(b) for b in parsed.reply_to)

    for field, body in (("TextBody", parsed.text), ("HtmlBody", parsed.html)):
        if not body:
            continue
        if len(body.encode("utf-8")) > BODY_LIMIT:
            raise MessageRejected(
                f"{field} exceeds Postmark's 5 MB limit per body", provider="postmark"
            )
        payload[field] = body
    if "TextBody" not in payload and "HtmlBody" not in payload:
        payload["TextBody"] = " "
        warnings.append("no text or HTML body: sent a blank text body (Postmark requires one)")

    headers = _headers(parsed, warnings)
    if headers:
        payload["Headers"] = headers
    attachments = _attachments(parsed, warnings)
    if attachments:
        payload["Attachments"] = attachments
    if message_stream:
        payload["MessageStream"] = message_stream
    return payload, warnings


def _headers(parsed: ParsedMessage, warnings: list[str]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    dropped: list[str] = []
    for name, value in parsed.headers:
        if name.lower() in DROPPED_HEADERS:
            dropped.append(name)
        else:
            out.append({"Name": name, "Value": value})
    if dropped:
        warnings.append(f"trace headers dropped (Postmark writes its own): {summarize(dropped)}")
    return out


def _attachments(parsed: ParsedMessage, warnings: list[str]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for index, att in enumerate(parsed.attachments, 1):
        name = att.filename
        if not name:
            name = fallback_filename(att, index)
            warnings.append(f"attachment {index} ({att.content_type}) had no filename: {name}")
        item = {
            "Name": name,
            "Content": base64.b64encode(att.content).decode("ascii"),
            # With its parameters: a calendar invitation needs its method
            # ("text/calendar; charset=utf-8; method=REQUEST", Postmark's support
            # article 1101), a text file its charset.
            "ContentType": full_content_type(att),
        }
        if att.inline and att.content_id:
            item["ContentID"] = f"cid:{att.content_id}"
        elif att.inline:
            warnings.append(f"inline part {index} has no Content-ID: sent as an attachment")
        out.append(item)
    return out


class PostmarkProvider(HttpProvider):
    kind = "postmark"
    rebuilds_message = True
    smtputf8 = False  # refuses them: "Illegal email mailbox" (error 300); IDN as Punycode
    #: Raw bytes that still fit 10 MB after base64 (4/3) with room for the JSON around.
    max_message_size = REQUEST_LIMIT * 3 // 4 - 100_000
    max_recipients = FIELD_LIMIT

    def __init__(
        self,
        client: httpx.AsyncClient,
        server_token: SecretStr,
        api_url: str,
        message_stream: str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(client, name)
        self._token = server_token
        self.endpoint = api_url.rstrip("/") + "/email"
        self._target = PostTarget(
            self.endpoint,
            {
                "X-Postmark-Server-Token": server_token.get_secret_value(),
                "Accept": "application/json",
                "Content-Type": "application/json",
            },
        )
        self.message_stream = message_stream

    def build_request(self, message: OutboundMessage) -> Built:
        parsed = parse(message.raw, message.envelope)
        payload, warnings = build_payload(parsed, self.message_stream)
        body = json_body(payload)
        if len(body) > REQUEST_LIMIT:
            raise MessageRejected(
                f"request of {len(body)} bytes exceeds Postmark's 10 MB limit", provider=self.name
            )
        return Built(self._target.request(body), tuple(warnings))

    def parse_response(self, response: httpx.Response, message: OutboundMessage) -> SendResult:
        warnings: tuple[str, ...] = ()
        answer = _json(response)
        if answer is None or "ErrorCode" not in answer:
            raise ProviderConfigError(
                f"HTTP {response.status_code} is not a Postmark answer (check"
                f" ESPRELAY_POSTMARK_API_URL): {excerpt(response)}",
                provider=self.name,
                status_code=response.status_code,
            )
        if answer.get("ErrorCode") != 0:
            raise self._error_for_code(response, answer)
        note = answer.get("Message")
        if isinstance(note, str) and note.strip() and note.strip().upper() != "OK":
            warnings += (f"Postmark: {note.strip()[:300]}",)  # e.g. inactive recipients skipped
        provider_id = answer.get("MessageID")
        return SendResult(
            provider_message_id=str(provider_id) if provider_id else None, warnings=warnings
        )

    def classify_error(self, response: httpx.Response) -> DeliveryError:
        status = response.status_code
        answer = _json(response)
        if status in (400, 422) and answer is not None and isinstance(answer.get("ErrorCode"), int):
            return self._error_for_code(response, answer)
        if status in (404, 405):
            return ProviderConfigError(
                f"HTTP {status} (check ESPRELAY_POSTMARK_API_URL): {excerpt(response)}",
                provider=self.name,
                status_code=status,
            )
        return classify_status(response, provider=self.name)

    def _error_for_code(self, response: httpx.Response, answer: dict[str, Any]) -> DeliveryError:
        code = answer.get("ErrorCode")
        status = response.status_code
        detail = f"HTTP {status} ErrorCode {code}: {str(answer.get('Message', ''))[:300]}"
        if code in CONFIG_CODES:
            return ProviderConfigError(detail, provider=self.name, status_code=status)
        if code == 429:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            return RateLimited(
                detail, provider=self.name, status_code=status, retry_after=retry_after
            )
        if code == 100:  # maintenance
            return ProviderUnavailable(detail, provider=self.name, status_code=status)
        return MessageRejected(detail, provider=self.name, status_code=status)


def _json(response: httpx.Response) -> dict[str, Any] | None:
    try:
        answer = response.json()
    except (ValueError, UnicodeDecodeError):
        return None
    return answer if isinstance(answer, dict) else None


class PostmarkSettings(ProviderSettings):
    """``ESPRELAY_POSTMARK_*``: a server token, and the message stream (Postmark's
    default, ``outbound``, when unset)."""

    server_token: SecretStr
    api_url: str = "https://api.postmarkapp.com"
    message_stream: str | None = None

    def api_urls(self) -> tuple[str, ...]:
        return (self.api_url,)


def build(settings: PostmarkSettings, client: httpx.AsyncClient) -> PostmarkProvider:
    return PostmarkProvider(
        client, settings.server_token, settings.api_url, settings.message_stream or None
    )


KIND = ProviderKind("postmark", PostmarkSettings, build, "Postmark /email (JSON)")
