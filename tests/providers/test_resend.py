"""Resend: the pure request builder, and end to end over SMTP to a loopback fake that
validates requests against Resend's own OpenAPI description and answers as Resend does
(idempotency keys and rate-limit headers included)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import re
import smtplib
import threading
import time
import uuid
from email.header import decode_header, make_header
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from pydantic import SecretStr

from esprelay.errors import (
    DeliveryError,
    MessageRejected,
    PermanentDeliveryError,
    ProviderConfigError,
    ProviderUnavailable,
    RateLimited,
)
from esprelay.message.mime import Mailbox, address_key, parse
from esprelay.models import Envelope, OutboundMessage
from esprelay.providers.resend import (
    BLOCKED_EXTENSIONS,
    ID_TAG,
    REQUEST_LIMIT,
    ResendProvider,
    ResendSettings,
    build,
    build_payload,
    format_address,
    format_from,
)
from esprelay.testing.fakeesp import FakeESP, Recorded, Reply
from tests.fakeclock import FakeClock
from tests.messages import Case, corpus, crlf
from tests.providers.common import queue, send_case
from tests.providers.test_mailgun import DOMAIN, mailgun
from tests.providers.test_mailgun import KEY as MAILGUN_KEY
from tests.relayproc import RelayProcess
from tests.test_corpora import FILES as CORPUS_FILES
from tests.test_corpora import envelope_for

API_KEY = "re_test_key_not_secret"

# --- Resend's OpenAPI description, the part POST /emails uses -------------------------
#
# The components.schemas SendEmailRequest, EmailTemplateInput, Attachment and Tag of
# resend/resend-openapi resend.json @fd6f395f2114e13806025f0c330921c901d62bb1
# (OpenAPI 3.1.2, info.version 1.5.0), verbatim but for their descriptions (the rules
# for tags, which the fake checks below, are in those).  POST /emails also takes the
# header parameter Idempotency-Key (string, maxLength 256).
# Copyright 2026 Plus Five Five, Inc. Licensed under the MIT License: permission is
# granted to use, copy, modify, merge, publish, distribute, sublicense and/or sell copies,
# provided that the copyright notice and this permission notice are included; the
# software is provided "as is", without warranty of any kind.
SCHEMAS: dict[str, Any] = json.loads(
    r"""
{
    "SendEmailRequest": {
        "type": "object",
        "required": [
            "from",
            "to",
            "subject"
        ],
        "properties": {
            "from": {
                "type": "string"
            },
            "to": {
                "oneOf": [
                    {
                        "type": "string"
                    },
                    {
                        "type": "array",
                        "items": {
                            "type": "string"
                        },
                        "minItems": 1,
                        "maxItems": 50
                    }
                ]
            },
            "subject": {
                "type": "string"
            },
            "bcc": {
                "oneOf": [
                    {
                        "type": "string"
                    },
                    {
                        "type": "array",
                        "items": {
                            "type": "string"
                        }
                    }
                ]
            },
            "cc": {
                "oneOf": [
                    {
                        "type": "string"
                    },
                    {
                        "type": "array",
                        "items": {
                            "type": "string"
                        }
                    }
                ]
            },
            "reply_to": {
                "oneOf": [
                    {
                        "type": "string"
                    },
                    {
                        "type": "array",
                        "items": {
                            "type": "string"
                        }
                    }
                ]
            },
            "html": {
                "type": "string"
            },
            "text": {
                "type": "string"
            },
            "template": {
                "allOf": [
                    {
                        "$ref": "#/components/schemas/EmailTemplateInput"
                    },
                    {}
                ]
            },
            "headers": {
                "type": "object"
            },
            "scheduled_at": {
                "type": "string"
            },
            "attachments": {
                "type": "array",
                "items": {
                    "$ref": "#/components/schemas/Attachment"
                }
            },
            "tags": {
                "type": "array",
                "items": {
                    "$ref": "#/components/schemas/Tag"
                }
            },
            "topic_id": {
                "type": "string"
            }
        }
    },
    "EmailTemplateInput": {
        "type": "object",
        "properties": {
            "id": {
                "type": "string"
            },
            "variables": {
                "type": "object",
                "additionalProperties": {
                    "oneOf": [
                        {
                            "type": "string"
                        },
                        {
                            "type": "number"
                        }
                    ]
                }
            }
        },
        "required": [
            "id"
        ]
    },
    "Attachment": {
        "type": "object",
        "properties": {
            "content": {
                "type": "string",
                "format": "binary"
            },
            "filename": {
                "type": "string"
            },
            "path": {
                "type": "string"
            },
            "content_type": {
                "type": "string"
            },
            "content_id": {
                "type": "string"
            }
        }
    },
    "Tag": {
        "type": "object",
        "properties": {
            "name": {
                "type": "string"
            },
            "value": {
                "type": "string"
            }
        }
    }
}
"""
)
SEND_EMAIL_REQUEST = jsonschema.Draft202012Validator(
    {"$ref": "#/components/schemas/SendEmailRequest", "components": {"schemas": SCHEMAS}}
)
TAG_TEXT = re.compile(r"[A-Za-z0-9_-]{1,256}")
WINDOW = {"ratelimit-limit": "2", "ratelimit-remaining": "1", "ratelimit-reset": "1"}


# --- a fake that validates like Resend ------------------------------------------------


def error(status: int, name: str, message: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(
        status,
        {"statusCode": status, "name": name, "message": message},
        {**WINDOW, **(headers or {})},
    )


def as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def addresses(value: Any) -> list[tuple[str, str]]:
    """(decoded display name, address) of each entry of an address field."""
    out = []
    for entry in as_list(value):
        for name, addr in getaddresses([entry]):
            out.append((str(make_header(decode_header(name))) if name else "", addr))
    return out


def validate(payload: Any) -> Reply | None:
    """The error Resend answers for ``payload``, or None: its OpenAPI schema first, then
    what its error reference and django-anymail's notes say it checks."""
    problems = sorted(SEND_EMAIL_REQUEST.iter_errors(payload), key=str)
    if problems:
        return error(422, "validation_error", problems[0].message)
    for field in ("from", "subject"):
        if not payload.get(field):
            return error(422, "missing_required_field", f"Missing `{field}` field.")
    sender = payload["from"]
    if "=?" in sender:
        return error(451, "security_error", "The email payload contain invalid characters.")
    if sender.lstrip().startswith('"') or len(addresses(sender)) != 1:
        return error(422, "validation_error", "Invalid `from` field.")
    for field in ("to", "cc", "bcc", "reply_to"):
        for entry in as_list(payload.get(field)):
            boxes = addresses(entry)
            if entry.lstrip().startswith('"') or len(boxes) != 1 or "@" not in boxes[0][1]:
                return error(422, "validation_error", f"Invalid `{field}` field.")
    for value in (payload.get("headers") or {}).values():
        if not isinstance(value, str):
            return error(422, "validation_error", "Header values must be strings.")
    for tag in payload.get("tags", []):
        if not TAG_TEXT.fullmatch(tag.get("name", "")) or not TAG_TEXT.fullmatch(
            tag.get("value", "")
        ):
            return error(422, "validation_error", "Tags may only contain ASCII letters, ...")
    for att in payload.get("attachments", []):
        if not att.get("content") and not att.get("path"):
            return error(422, "invalid_attachment", "Attachment must have a content or path.")
        try:
            base64.b64decode(att["content"], validate=True)
        except (binascii.Error, ValueError):
            return error(422, "validation_error", "Attachment content must be base64.")
    return None


class ResendAPI:
    """POST /emails as Resend answers it, with its idempotency keys: the same key and
    the same request within 24 hours get the first answer again without a second send;
    the same key with another request is a 409."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self._keys: dict[str, tuple[bytes, Reply]] = {}
        self._lock = threading.Lock()

    def __call__(self, request: Recorded) -> Reply:
        if request.path not in ("/emails", "/emails/batch"):
            return error(404, "not_found", "The requested endpoint does not exist.")
        if request.method != "POST":
            return error(405, "method_not_allowed", "Method is not allowed.")
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            return error(401, "missing_api_key", "Missing API key in the authorization header.")
        if auth != f"Bearer {API_KEY}":
            return error(403, "invalid_api_key", "API key is invalid.")
        if not request.headers.get("content-type", "").startswith("application/json"):
            return error(422, "validation_error", "Content-Type must be application/json.")
        key = request.headers.get("idempotency-key")
        if key is not None and not 1 <= len(key) <= 256:
            return error(400, "invalid_idempotency_key", "The key must be between 1-256 chars.")
        try:
            payload = request.json()
        except ValueError:
            return error(400, "validation_error", "Invalid JSON.")
        if len(request.body) > REQUEST_LIMIT:
            return error(422, "validation_error", "The email exceeds 40MB.")
        with self._lock:
            if key is not None and key in self._keys:
                body, reply = self._keys[key]
                if body != request.body:
                    return error(
                        409,
                        "invalid_idempotent_request",
                        "Same idempotency key used with a different request payload.",
                    )
                return reply
            emails = payload if request.path == "/emails/batch" else [payload]
            problem = self.validate_batch(emails) if request.path == "/emails/batch" else None
            for email in emails:
                problem = problem or validate(email)
            if problem is not None:
                return problem
            ids = [{"id": str(uuid.uuid4())} for _ in emails]
            answer = {"data": ids} if request.path == "/emails/batch" else ids[0]
            reply = Reply(200, answer, dict(WINDOW))
            self.sent.extend(emails)
            if key is not None:
                self._keys[key] = (request.body, reply)
            return reply

    @staticmethod
    def validate_batch(emails: Any) -> Reply | None:
        """POST /emails/batch: an array of 1 to 100 emails without attachments
        ("Trigger up to 100 batch emails at once"; batches take no attachments)."""
        if not isinstance(emails, list) or not 1 <= len(emails) <= 100:
            return error(422, "validation_error", "A batch is an array of 1 to 100 emails.")
        if any(isinstance(e, dict) and "attachments" in e for e in emails):
            return error(422, "validation_error", "Attachments are not supported in batch.")
        return None


# --- pure builder ---------------------------------------------------------------------


def check_payload(payload: dict[str, Any], case: Case) -> None:
    assert validate(payload) is None
    got = {f: [a.lower() for _, a in addresses(payload.get(f))] for f in ("to", "cc", "bcc")}
    assert got == {"to": list(case.to), "cc": list(case.cc), "bcc": list(case.bcc)}
    assert addresses(payload["from"])[0][1] == case.from_addr
    assert payload["subject"] == case.subject
    assert payload.get("text", "").replace("\r\n", "\n") == (case.text or "")
    assert (payload.get("html") or "").replace("\r\n", "\n") == (case.html or "")
    attachments = [
        (
            a["filename"],
            a["content_type"].split(";")[0],
            hashlib.sha256(base64.b64decode(a["content"])).hexdigest(),
            a.get("content_id"),
        )
        for a in payload.get("attachments", [])
    ]
    assert attachments == [
        (a.filename, a.content_type, a.sha256, a.content_id) for a in case.attachments
    ]
    headers = payload.get("headers", {})
    for name, value in case.headers.items():
        assert headers[name] == value
    assert headers.get("X-Case") == case.id
    assert not {"bcc", "to", "from", "cc", "subject"} & {n.lower() for n in headers}
    visible = repr(headers) + repr(got["to"] + got["cc"])
    for hidden in case.hidden:
        assert hidden not in visible


@pytest.mark.parametrize("case", corpus(), ids=lambda c: c.id)
def test_build_payload_for_corpus(case: Case) -> None:
    parsed = parse(case.raw, Envelope(case.mail_from, case.rcpts))
    payload, warnings = build_payload(parsed, "0190f3a1b2c3d4e5f6a7b")
    assert isinstance(payload, dict)
    check_payload(payload, case)
    assert payload["tags"] == [{"name": ID_TAG, "value": "0190f3a1b2c3d4e5f6a7b"}]
    for expected in case.warnings:
        assert any(expected in w for w in warnings), warnings


def test_display_names_as_resend_takes_them() -> None:
    assert format_address(Mailbox("", "a@x.org")) == "a@x.org"
    assert format_address(Mailbox("Ann Lee", "a@x.org")) == "Ann Lee <a@x.org>"
    # Resend refuses a quoted name, so a name with specials or non-ASCII is an encoded word.
    for name in ("Doe, Jane", 'Doe "JD"', "Jürgen", "J. Smith"):
        formatted = format_address(Mailbox(name, "j@x.org"))
        assert formatted.startswith("=?utf-8?q?"), formatted
        assert addresses(formatted) == [(name, "j@x.org")]
    # ...but from takes neither: the name goes unquoted, without what would break it.
    warnings: list[str] = []
    assert format_from(Mailbox("Jürgen Müller", "a@x.org"), warnings) == "Jürgen Müller <a@x.org>"
    assert format_from(Mailbox("a@x.org", "a@x.org"), warnings) == "a@x.org"
    assert warnings == []
    assert format_from(Mailbox("Doe, Jane", "a@x.org"), warnings) == "Doe Jane <a@x.org>"
    assert "'Doe, Jane'" in warnings[0]


def _message(
    raw: bytes, rcpts: tuple[str, ...] = ("r@example.org",), id: str = "m1"
) -> OutboundMessage:
    return OutboundMessage(id, Envelope("s@example.com", rcpts), raw)


def _provider(url: str = "https://api.resend.com/", **kwargs: Any) -> ResendProvider:
    return ResendProvider(httpx.AsyncClient(), SecretStr(API_KEY), url, **kwargs)


def test_request_shape_and_idempotency_key() -> None:
    spool_id = "0190f3a1b2c3d4e5f6a7b"
    raw = crlf("From: s@example.com\nTo: r@example.org\nSubject: hi\n\n<p>hi</p>\n")
    raw = raw.replace(b"\r\n\r\n", b"\r\nContent-Type: text/html\r\n\r\n", 1)
    built = _provider().build_request(_message(raw, id=spool_id))
    request = built.request
    assert str(request.url) == "https://api.resend.com/emails"
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.headers["content-type"] == "application/json"
    # The spool id is the key: every attempt of this message sends the same one.
    assert request.headers["idempotency-key"] == spool_id
    payload = json.loads(request.read())
    assert payload["html"] == "<p>hi</p>\r\n" and payload["text"] == ""  # no generated text
    assert API_KEY not in repr(_provider())


def test_resend_idempotency_key_header_wins_and_is_not_sent_on() -> None:
    raw = crlf(
        "From: s@example.com\nTo: r@example.org\nSubject: hi\n"
        "Resend-Idempotency-Key: welcome-user/123456789\nX-Entity-Ref-ID: 42\n\nhi\n"
    )
    provider = _provider()
    assert provider.refusal(_message(raw)) is None
    request = provider.build_request(_message(raw)).request
    assert request.headers["idempotency-key"] == "welcome-user/123456789"
    payload = json.loads(request.read())
    assert payload["headers"] == {"X-Entity-Ref-ID": "42"}
    # The same bytes submitted again (another spool id) make the same request, which
    # Resend answers as the first time instead of refusing the key (409).
    again = provider.build_request(_message(raw, id="another-spool-id")).request
    assert "tags" not in payload and again.read() == request.read()
    for bad in ("x" * 257, "caf\u00e9"):
        raw = crlf(f"From: s@example.com\nResend-Idempotency-Key: {bad}\n\nhi\n")
        assert "Resend-Idempotency-Key" in (provider.refusal(_message(raw)) or "")
        with pytest.raises(MessageRejected):
            provider.build_request(_message(raw))


def test_attachments_resend_would_not_send_are_left_out_with_a_warning() -> None:
    raw = crlf(
        "From: s@example.com\nTo: r@example.org\nSubject: files\nMIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="b"\n\n--b\nContent-Type: text/plain\n\nsee\n'
        "--b\nContent-Type: application/octet-stream\n"
        'Content-Disposition: attachment; filename="Setup.EXE"\n\nMZ\n'
        "--b\nContent-Type: application/javascript\n\nalert(1)\n"
        "--b\nContent-Type: application/pdf\n"
        'Content-Disposition: attachment; filename="r.pdf"\n\n%PDF\n--b--\n'
    )
    assert {"exe", "js", "bat", "vbs", "ps1", "msi"} <= BLOCKED_EXTENSIONS
    built = _provider().build_request(_message(raw))
    names = [a["filename"] for a in json.loads(built.request.read())["attachments"]]
    assert names == ["attachment-2.dat", "r.pdf"]  # a nameless script gets no .js name
    assert any("'Setup.EXE' left out: Resend does not send .exe" in w for w in built.warnings)


def test_recipient_rules() -> None:
    def payload(raw: str, rcpts: tuple[str, ...]) -> tuple[dict[str, Any], list[str]]:
        return build_payload(parse(crlf(raw), Envelope("s@example.com", rcpts)))

    only_cc, _ = payload("From: s@example.com\nCc: c@example.org\n\nhi\n", ("c@example.org",))
    assert only_cc["to"] == ["c@example.org"] and "cc" not in only_cc
    one_blind, _ = payload("From: s@example.com\n\nhi\n", ("b@example.org",))
    assert one_blind["to"] == ["b@example.org"] and "bcc" not in one_blind
    assert one_blind["subject"] == "(no subject)" and validate(one_blind) is None
    # Several blind recipients and no To: one copy each, addressed to itself, as a batch.
    blind, warnings = payload(
        "From: s@example.com\nTo: undisclosed-recipients:;\nBcc: a@example.org\n\nhi\n",
        ("a@example.org", "b@example.org"),
    )
    assert isinstance(blind, list) and [e["to"] for e in blind] == [
        ["a@example.org"],
        ["b@example.org"],
    ]
    assert all("bcc" not in e and "cc" not in e for e in blind)
    assert ResendAPI.validate_batch(blind) is None and all(validate(e) is None for e in blind)
    assert any("addressed to itself" in w for w in warnings)
    with pytest.raises(MessageRejected, match="no attachments"):
        payload(
            "From: s@example.com\nContent-Type: application/pdf\n"
            "Content-Disposition: attachment; filename=a.pdf\n\n%PDF\n",
            ("a@example.org", "b@example.org"),
        )
    many = tuple(f"r{i}@example.org" for i in range(51))
    with pytest.raises(MessageRejected, match="at most 50"):
        payload("From: s@example.com\nTo: " + ", ".join(many) + "\n\nhi\n", many)
    assert ResendProvider.max_recipients == 50
    assert ResendProvider.max_message_size * 4 / 3 < REQUEST_LIMIT


_REQUEST = httpx.Request("POST", "https://api.resend.com/emails")


def _answer(status: int, name: str = "", headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"statusCode": status, "name": name, "message": "..."} if name else {}
    return httpx.Response(status, json=body, headers=headers or {}, request=_REQUEST)


def test_settings_and_rate() -> None:
    settings = ResendSettings(api_key=SecretStr(API_KEY), rate=5)
    provider = build(settings, httpx.AsyncClient())
    assert provider.endpoint == "https://api.resend.com/emails"
    assert provider.rate_limit is not None
    assert (provider.rate_limit.rate, provider.rate_limit.burst) == (5.0, 5)
    assert settings.api_urls() == ("https://api.resend.com",)
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError):
            ResendSettings(api_key=SecretStr(API_KEY), rate=bad)


@pytest.mark.parametrize(
    ("status", "name", "expected"),
    [
        (422, "validation_error", MessageRejected),
        (422, "missing_required_field", MessageRejected),
        (422, "invalid_attachment", MessageRejected),
        (400, "validation_error", MessageRejected),
        (451, "security_error", PermanentDeliveryError),
        (409, "invalid_idempotent_request", MessageRejected),
        (409, "concurrent_idempotent_requests", ProviderUnavailable),
        (401, "missing_api_key", ProviderConfigError),
        (401, "restricted_api_key", ProviderConfigError),
        (403, "invalid_api_key", ProviderConfigError),
        (403, "validation_error", ProviderConfigError),  # unverified domain, test sender
        (403, "invalid_from_address", ProviderConfigError),
        (404, "not_found", ProviderConfigError),
        (429, "rate_limit_exceeded", RateLimited),
        (429, "daily_quota_exceeded", RateLimited),
        (500, "application_error", ProviderUnavailable),
        (500, "internal_server_error", ProviderUnavailable),
        (502, "", ProviderUnavailable),
    ],
)
def test_error_classification(status: int, name: str, expected: type[DeliveryError]) -> None:
    assert type(_provider().classify_error(_answer(status, name))) is expected


async def test_a_429_holds_every_request_until_the_window_resets() -> None:
    clock = FakeClock()
    provider = _provider(clock=clock)
    headers = {"ratelimit-remaining": "0", "ratelimit-reset": "5"}
    error = provider.classify_error(_answer(429, "rate_limit_exceeded", headers))
    assert isinstance(error, RateLimited) and error.retry_after == 5.0
    assert provider.rate_limit is not None
    task = asyncio.create_task(provider.rate_limit.acquire())
    await clock.waiting(1)
    clock.advance(4.9)
    await asyncio.sleep(0)
    assert not task.done()
    clock.advance(0.2)
    await asyncio.wait_for(task, 1)
    # retry-after, when given, is the wait; a daily quota holds nothing (the spool waits).
    assert provider.classify_error(_answer(429, "x", {"retry-after": "2"})).retry_after == 2.0
    quota = provider.classify_error(_answer(429, "daily_quota_exceeded", {"retry-after": "9000"}))
    assert quota.retry_after == 9000.0


async def test_a_spent_window_on_a_success_holds_the_next_request() -> None:
    clock = FakeClock()
    provider = _provider(clock=clock)
    assert provider.rate_limit is not None and provider.rate_limit.rate == 2.0
    ok = httpx.Response(
        200,
        json={"id": "49a3999c-0ce1-4ea6-ab68-afcd6dc2e794"},
        headers={"ratelimit-limit": "2", "ratelimit-remaining": "0", "ratelimit-reset": "1"},
        request=_REQUEST,
    )
    result = provider.parse_response(ok, _message(b"\r\n"))
    assert result.provider_message_id == "49a3999c-0ce1-4ea6-ab68-afcd6dc2e794"
    task = asyncio.create_task(provider.rate_limit.acquire())
    await clock.waiting(1)
    assert not task.done()
    clock.advance(1.0)
    await asyncio.wait_for(task, 1)
    with pytest.raises(ProviderConfigError, match="ESPRELAY_RESEND_API_URL"):
        provider.parse_response(httpx.Response(200, text="<html>", request=_REQUEST), _message(b""))


# --- end to end: SMTP in, Resend's API out --------------------------------------------


def relay_env(esp: FakeESP, **extra: str) -> dict[str, str]:
    return {
        "ESPRELAY_PROVIDER": "resend",
        "ESPRELAY_RESEND_API_KEY": API_KEY,
        "ESPRELAY_RESEND_API_URL": esp.url,
        "ESPRELAY_RETRY_INITIAL": "0.2s",
        "ESPRELAY_RETRY_CONFIG_ERROR": "1s",
        **extra,
    }


def test_corpus_end_to_end(relay_factory: type[RelayProcess]) -> None:
    cases = corpus()
    api = ResendAPI()
    with FakeESP(api) as esp:
        # A relay limit above Resend's, so that SIZE shows the provider's own.
        relay = relay_factory(relay_env(esp, ESPRELAY_MAX_MESSAGE_SIZE="50000000")).start()
        ids = {case.id: send_case(relay, case) for case in cases}
        esp.wait_for(len(cases))
        relay.wait_for_log(r"delivered id=\S+ provider=resend", count=len(cases))
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
            smtp.ehlo("client.test")
            assert int(smtp.esmtp_features["size"]) == ResendProvider.max_message_size
            # A malformed Resend-Idempotency-Key is refused at the end of DATA.
            key = "k" * 300
            bad = crlf(f"From: s@example.com\nResend-Idempotency-Key: {key}\n\nhi\n")
            with pytest.raises(smtplib.SMTPDataError) as refused:
                smtp.sendmail("s@example.com", ["r@example.org"], bad)
            assert refused.value.smtp_code == 550
            assert b"Resend-Idempotency-Key" in refused.value.smtp_error
            # SMTP enforces Resend's 50 recipients: the 51st RCPT gets 452.
            smtp.mail("s@example.com")
            for i in range(50):
                assert smtp.rcpt(f"r{i}@example.org")[0] == 250
            assert smtp.rcpt("r50@example.org")[0] == 452
    assert len(api.sent) == len(cases)
    for request in esp.requests:
        payload = request.json()
        case_id = payload["headers"]["X-Case"]
        check_payload(payload, next(c for c in cases if c.id == case_id))
        # Every request carries its spool id as its key and as a tag.
        assert request.headers["idempotency-key"] == ids[case_id]
        assert payload["tags"] == [{"name": ID_TAG, "value": ids[case_id]}]
    assert API_KEY not in relay.log


def _case(subject: str, sender: str = "s@example.com") -> Case:
    raw = crlf(f"From: {sender}\nTo: r@example.org\nSubject: {subject}\n\nhi\n")
    return Case(subject, raw, sender, ("r@example.org",), "", (), (), (), None, None, None)


def test_a_retry_sends_the_same_key_and_never_a_second_copy(
    relay_factory: type[RelayProcess],
) -> None:
    """A 500, then a timeout after Resend took the message: each message is retried with
    its spool id as the key, and Resend sends each once."""
    api = ResendAPI()
    answered: dict[str, int] = {}
    lock = threading.Lock()

    def respond(request: Recorded) -> Reply:
        subject = request.json().get("subject", "")
        with lock:
            answered[subject] = n = answered.get(subject, 0) + 1
        if subject == "server-error" and n == 1:
            return error(500, "internal_server_error", "An unexpected error occurred.")
        reply = api(request)
        if subject == "timeout" and n == 1:
            # Resend took it (and sent it), but the answer comes after the relay gave up.
            return Reply(reply.status, reply.body, reply.headers, delay=3.0)
        return reply

    with FakeESP(respond) as esp:
        relay = relay_factory(relay_env(esp, ESPRELAY_PROVIDER_TIMEOUT="1s")).start()
        ids = {s: send_case(relay, _case(s)) for s in ("server-error", "timeout")}
        for subject in ids:
            relay.wait_for_log(rf"delivered id={ids[subject]} provider=resend attempt=2")
    for subject, spool_id in ids.items():
        keys = [
            r.headers["idempotency-key"] for r in esp.requests if r.json()["subject"] == subject
        ]
        assert keys == [spool_id, spool_id], subject
    assert sorted(p["subject"] for p in api.sent) == ["server-error", "timeout"]


def test_a_429_waits_for_the_window_end_to_end(relay_factory: type[RelayProcess]) -> None:
    api = ResendAPI()
    seen: list[float] = []
    limited = error(
        429,
        "rate_limit_exceeded",
        "Too many requests.",
        {"ratelimit-remaining": "0", "ratelimit-reset": "1"},
    )

    def respond(request: Recorded) -> Reply:
        seen.append(time.monotonic())
        return limited if len(seen) == 1 else api(request)

    with FakeESP(respond) as esp:
        relay = relay_factory(relay_env(esp)).start()
        spool_id = send_case(relay, _case("limited"))
        relay.wait_for_log(rf"delivered id={spool_id} provider=resend attempt=2")
    assert len(api.sent) == 1 and seen[1] - seen[0] >= 0.9
    assert queue(relay, "failed") == []


def test_blind_recipients_get_a_copy_each_end_to_end(relay_factory: type[RelayProcess]) -> None:
    api = ResendAPI()
    raw = crlf("From: s@example.com\nTo: undisclosed-recipients:;\nSubject: blind\n\nhi\n")
    rcpts = ("a@example.org", "b@example.org", "c@example.org")
    case = Case("blind", raw, "s@example.com", rcpts, "", (), (), rcpts, None, None, None)
    with FakeESP(api) as esp:
        relay = relay_factory(relay_env(esp)).start()
        spool_id = send_case(relay, case)
        relay.wait_for_log(rf"delivered id={spool_id} provider=resend")
    (request,) = esp.requests
    assert request.path == "/emails/batch"
    assert request.headers["idempotency-key"] == spool_id
    assert [e["to"] for e in api.sent] == [[r] for r in rcpts]
    assert not any("bcc" in e or "cc" in e for e in api.sent)


def test_failover_between_resend_and_an_older_provider(
    relay_factory: type[RelayProcess], tmp_path: Path
) -> None:
    """A route from Mailgun (down) to Resend, and one from Resend (down) to Mailgun."""
    api = ResendAPI()
    down = Reply(503, "Service Unavailable")
    resend_down = error(500, "internal_server_error", "An unexpected error occurred.")
    with (
        FakeESP(lambda r: down) as mg_down,
        FakeESP(mailgun) as mg,
        FakeESP(lambda r: resend_down) as rs_down,
        FakeESP(api) as rs,
    ):
        routes = "".join(
            f'[providers.{name}]\nkind = "mailgun"\napi_key_env = "TEST_MAILGUN_KEY"\n'
            f'domain = "{DOMAIN}"\napi_url = "{esp.url}"\n'
            for name, esp in (("mg-down", mg_down), ("mg", mg))
        ) + "".join(
            f'[providers.{name}]\nkind = "resend"\napi_key_env = "TEST_RESEND_KEY"\n'
            f'api_url = "{esp.url}"\n'
            for name, esp in (("rs-down", rs_down), ("rs", rs))
        )
        routes += (
            '[[routes]]\nsender_domains = ["a.example"]\nproviders = ["mg-down", "rs"]\n'
            '[[routes]]\nsender_domains = ["b.example"]\nproviders = ["rs-down", "mg"]\n'
            '[default]\nproviders = ["rs"]\n'
        )
        (tmp_path / "routes.toml").write_text(routes)
        env = {
            "TEST_MAILGUN_KEY": MAILGUN_KEY,
            "TEST_RESEND_KEY": API_KEY,
            "ESPRELAY_ROUTES_FILE": str(tmp_path / "routes.toml"),
        }
        relay = relay_factory(env).start()
        to_resend = send_case(relay, _case("a", "s@a.example"))
        to_mailgun = send_case(relay, _case("b", "s@b.example"))
        relay.wait_for_log(rf"delivered id={to_resend} provider=rs attempt=1")
        relay.wait_for_log(rf"delivered id={to_mailgun} provider=mg attempt=1")
    assert [p["subject"] for p in api.sent] == ["a"]
    assert rs.requests[0].headers["idempotency-key"] == to_resend
    assert len(mg.requests) == 1 and len(mg_down.requests) == 1 and len(rs_down.requests) == 1


@pytest.mark.slow
@pytest.mark.skipif(not CORPUS_FILES, reason="no MIME corpora (optional test data)")
def test_public_corpora_make_requests_resend_accepts() -> None:
    """Real-world and malformed messages: a request the fake accepts, or a clear refusal
    (several blind recipients with attachments), and exactly the envelope's recipients."""
    problems: list[str] = []
    for path in CORPUS_FILES:
        raw = path.read_bytes()
        if b"\r\n" not in raw:
            raw = raw.replace(b"\n", b"\r\n")
        envelope = envelope_for(raw)
        try:
            payload, _ = build_payload(parse(raw, envelope), "0190f3a1b2c3d4e5f6a7b")
        except MessageRejected as exc:
            if "blind recipients" not in str(exc):
                problems.append(f"{path.name}: {exc}")
            continue
        emails = payload if isinstance(payload, list) else [payload]
        problem = ResendAPI.validate_batch(emails) if isinstance(payload, list) else None
        for email in emails:
            problem = problem or validate(email)
        if problem is not None:
            problems.append(f"{path.name}: the fake refuses: {problem.body!r}")
        sent = {
            address_key(a)
            for e in emails
            for f in ("to", "cc", "bcc")
            for _, a in addresses(e.get(f))
        }
        if sent != {address_key(a) for a in envelope.rcpt_tos}:
            problems.append(f"{path.name}: recipients {sorted(sent)} != the envelope")
    assert not problems, "\n".join(problems)
