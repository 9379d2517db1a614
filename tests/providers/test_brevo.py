"""Brevo: the pure request builder, the attachment refusal, the rate-limit window, and
end to end over SMTP to a loopback fake that validates like Brevo's POST /v3/smtp/email
and answers as it does."""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.header
import hashlib
import smtplib
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from esprelay.errors import (
    DeliveryError,
    MessageRejected,
    ProviderConfigError,
    ProviderUnavailable,
    RateLimited,
)
from esprelay.message import mime
from esprelay.message.mime import parse
from esprelay.models import Envelope, OutboundMessage
from esprelay.providers import brevo as brevo_module
from esprelay.providers.brevo import (
    ALLOWED_EXTENSIONS,
    MAX_RECIPIENTS,
    BrevoProvider,
    build_payload,
    window_reset,
)
from esprelay.ratelimit import RateLimit
from esprelay.testing.fakeesp import FakeESP, Recorded, Reply
from tests.fakeclock import FakeClock
from tests.messages import Case, corpus, crlf
from tests.providers.common import queue, send_case
from tests.providers.test_mailgun import DOMAIN, form_fields, mailgun
from tests.providers.test_mailgun import KEY as MAILGUN_KEY
from tests.relayproc import RelayProcess

KEY = "xkeysib-not-a-secret-0123456789"
FIELDS = {
    "sender",
    "to",
    "cc",
    "bcc",
    "htmlContent",
    "textContent",
    "subject",
    "replyTo",
    "attachment",
    "headers",
    "templateId",
    "params",
    "messageVersions",
    "tags",
    "scheduledAt",
    "batchId",
}
#: What Brevo's reference calls standard headers, refused here so that a test fails if
#: the adapter ever sends one ("Standard email headers are not supported").
STANDARD = {"date", "message-id", "in-reply-to", "references", "from", "to", "cc", "bcc"}
STANDARD |= {"subject", "reply-to", "sender", "received", "return-path", "mime-version"}
STANDARD |= {"content-type", "content-transfer-encoding", "dkim-signature"}
#: The cases of the corpus Brevo can send (the rest has a .dat attachment).
SENDABLE = ("utf8-alternative", "latin1", "bcc", "printer")


# --- a fake that validates like Brevo -------------------------------------------------


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, {"code": code, "message": message}, headers or {})


def _window(remaining: int = 999, reset: int = 1) -> dict[str, str]:
    return {
        "x-sib-ratelimit-limit": "1000",
        "x-sib-ratelimit-remaining": str(remaining),
        "x-sib-ratelimit-reset": str(reset),
    }


def _people(value: Any, field: str, errors: list[str]) -> int:
    if not isinstance(value, list) or not value:
        errors.append(f"{field} must be a non-empty list")
        return 0
    for item in value:
        if not isinstance(item, dict) or "@" not in str(item.get("email", "")):
            errors.append(f"{field}: email is missing or invalid")
        elif set(item) - {"email", "name"}:
            errors.append(f"{field}: unknown key")
    return len(value)


def validate(payload: Any) -> list[str]:
    """What Brevo's sendTransacEmail documents as required or limited."""
    if not isinstance(payload, dict):
        return ["Invalid JSON"]
    errors = [f"unknown field {k}" for k in payload if k not in FIELDS]
    sender = payload.get("sender")
    if not isinstance(sender, dict) or "@" not in str(sender.get("email", "")):
        errors.append("sender is missing")
    if "messageVersions" in payload:
        for version in payload["messageVersions"]:
            count = sum(
                _people(version[f], f"messageVersions.{f}", errors)
                for f in ("to", "cc", "bcc")
                if f in version
            )
            if "to" not in version or count > 99:
                errors.append("each version needs a to, at most 99 recipients")
    else:
        count = _people(payload.get("to"), "to", errors)
        count += sum(_people(payload[f], f, errors) for f in ("cc", "bcc") if f in payload)
        if count > 99:
            errors.append("at most 99 recipients")
    if not payload.get("subject"):
        errors.append("subject is missing")
    if not payload.get("htmlContent"):
        errors.append("htmlContent is missing")  # required without a templateId
    reply_to = payload.get("replyTo")
    if reply_to is not None and (not isinstance(reply_to, dict) or "email" not in reply_to):
        errors.append("replyTo needs an email")
    for att in payload.get("attachment", []):
        name = att.get("name", "")
        if not name:
            errors.append("attachment name is required with content")
        elif name.rpartition(".")[2].lower() not in ALLOWED_EXTENSIONS:
            errors.append(f"Unsupported file extension: {name}")
        try:
            base64.b64decode(att.get("content", ""), validate=True)
        except (binascii.Error, ValueError):
            errors.append("attachment content must be base64")
    headers = payload.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        errors.append("headers must map names to strings")
    elif STANDARD & {n.lower() for n in headers}:
        errors.append("standard headers are not supported")
    tags = payload.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
        errors.append("tags must be strings")
    return errors


class BrevoAPI:
    def __call__(self, request: Recorded) -> Reply:
        if request.method != "POST" or request.path != "/v3/smtp/email":
            return Reply(404, "Not Found")
        if request.headers.get("api-key") != KEY:
            return _error(401, "unauthorized", "Key not found")
        if not request.headers.get("content-type", "").startswith("application/json"):
            return _error(400, "bad_request", "JSON required")
        try:
            payload = request.json()
        except ValueError:
            return _error(400, "bad_request", "Invalid JSON")
        errors = validate(payload)
        if errors:
            return _error(400, "invalid_parameter", "; ".join(errors), _window())
        if "messageVersions" in payload:
            ids = [f"<{uuid.uuid4().hex}@smtp-relay.mailin.fr>" for _ in payload["messageVersions"]]
            return Reply(201, {"messageIds": ids}, _window())
        return Reply(201, {"messageId": f"<{uuid.uuid4().hex}@smtp-relay.mailin.fr>"}, _window())


def _decoded(name: str) -> str:
    return str(email.header.make_header(email.header.decode_header(name)))


# --- pure builder ---------------------------------------------------------------------


def check_payload(payload: dict[str, Any], case: Case) -> None:
    assert validate(payload) == []
    people = {f: [p["email"].lower() for p in payload.get(f, [])] for f in ("to", "cc", "bcc")}
    assert people == {"to": list(case.to), "cc": list(case.cc), "bcc": list(case.bcc)}
    assert payload["sender"]["email"] == case.from_addr
    assert payload["subject"] == case.subject
    assert (payload.get("textContent") or "").replace("\r\n", "\n") == (case.text or "")
    if case.html:
        assert payload["htmlContent"].replace("\r\n", "\n") == case.html
    else:
        assert payload["htmlContent"].startswith("<pre")
    got = [
        (a["name"], hashlib.sha256(base64.b64decode(a["content"])).hexdigest())
        for a in payload.get("attachment", [])
    ]
    assert got == [(a.filename, a.sha256) for a in case.attachments]
    headers = payload.get("headers", {})
    for name, value in case.headers.items():
        if name.lower() not in STANDARD:
            assert headers[name] == value
    assert headers.get("X-Case") == case.id
    visible = repr(headers) + repr(people["to"] + people["cc"])
    for hidden in case.hidden:
        assert hidden not in visible


@pytest.mark.parametrize("case", [c for c in corpus() if c.id in SENDABLE], ids=lambda c: c.id)
def test_build_payload_for_corpus(case: Case) -> None:
    parsed = parse(case.raw, Envelope(case.mail_from, case.rcpts))
    payload, warnings = build_payload(parsed)
    check_payload(payload, case)
    for expected in case.warnings:
        assert any(expected in w for w in warnings), warnings


def test_names_brevo_would_drop_are_encoded() -> None:
    (case,) = [c for c in corpus() if c.id == "utf8-alternative"]
    payload, warnings = build_payload(parse(case.raw, Envelope(case.mail_from, case.rcpts)))
    hans = payload["to"][0]
    # Non-ASCII and a comma: Brevo drops such a name, so it goes as an encoded word.
    assert hans["name"].startswith("=?utf-8?") and _decoded(hans["name"]) == "Müller, Hans"
    assert payload["sender"] == {"email": "app@example.com", "name": "Jürgen Müller"}
    long = brevo_module._mailbox(mime.Mailbox("Müller, Hans — " + "sehr lang " * 12, "h@x.org"))
    words = long["name"].split(" ")
    assert len(words) > 1 and all(len(w) <= 75 and w.startswith("=?utf-8?") for w in words)
    assert _decoded(long["name"]) == "Müller, Hans — " + "sehr lang " * 12
    assert payload["replyTo"] == {"email": "support@example.com", "name": "Support"}
    # Threading and identity headers are standard ones: dropped, and said so.
    assert not {"Message-ID", "In-Reply-To", "References", "Date"} & set(payload["headers"])
    assert any("Message-ID" in w and "In-Reply-To" in w for w in warnings), warnings


def test_text_only_gets_an_html_body() -> None:
    raw = crlf("From: s@example.com\nTo: r@example.org\nSubject: x\n\n<a> & b\n")
    payload, warnings = build_payload(parse(raw, Envelope("s@example.com", ("r@example.org",))))
    assert payload["htmlContent"] == '<pre style="white-space:pre-wrap">&lt;a&gt; &amp; b\r\n</pre>'
    assert payload["textContent"] == "<a> & b\r\n"
    assert any("no HTML body" in w for w in warnings)


def test_bcc_only_message_gets_one_version_per_recipient() -> None:
    raw = crlf("From: s@example.com\nTo: undisclosed-recipients:;\nSubject: x\n\nhi\n")
    rcpts = ("a@example.org", "b@example.org")
    payload, warnings = build_payload(parse(raw, Envelope("s@example.com", rcpts)))
    assert "to" not in payload and "bcc" not in payload
    assert payload["messageVersions"] == [
        {"to": [{"email": "a@example.org"}]},
        {"to": [{"email": "b@example.org"}]},
    ]
    assert validate(payload) == [] and any("copy addressed to itself" in w for w in warnings)


def test_tags_from_x_mailin_tag_and_custom_header_kept() -> None:
    raw = crlf(
        "From: s@example.com\nTo: r@example.org\nSubject: x\nX-Mailin-Tag: welcome\n"
        "X-Mailin-Tag: =?utf-8?q?week_36?=\nX-Mailin-Tag: welcome\n"
        'X-Mailin-custom: {"order": 42}\nX-Note: café\nX-Twice: 1\nX-Twice: 2\n\nhi\n'
    )
    payload, warnings = build_payload(parse(raw, Envelope("s@example.com", ("r@example.org",))))
    assert payload["tags"] == ["welcome", "week 36"]
    assert payload["headers"] == {"X-Mailin-custom": '{"order": 42}', "X-Twice": "1"}
    assert any("non-ASCII" in w and "X-Note" in w for w in warnings)
    assert any("repeated" in w and "X-Twice" in w for w in warnings)


def test_sandbox_adds_brevos_drop_header() -> None:
    raw = crlf("From: s@example.com\nTo: r@example.org\nSubject: x\n\nhi\n")
    parsed = parse(raw, Envelope("s@example.com", ("r@example.org",)))
    assert "headers" not in build_payload(parsed)[0]
    assert build_payload(parsed, sandbox=True)[0]["headers"] == {"X-Sib-Sandbox": "drop"}


def test_inline_image_is_sent_as_an_attachment_with_a_warning() -> None:
    raw = crlf(
        "From: s@example.com\nTo: r@example.org\nSubject: x\nMIME-Version: 1.0\n"
        'Content-Type: multipart/related; boundary="b"\n\n--b\n'
        'Content-Type: text/html\n\n<img src="cid:logo">\n--b\n'
        "Content-Type: image/png; name=logo.png\nContent-ID: <logo>\n"
        "Content-Disposition: inline; filename=logo.png\nContent-Transfer-Encoding: base64\n\n"
        "iVBORw0KGgo=\n--b--\n"
    )
    message = OutboundMessage("m", Envelope("s@example.com", ("r@example.org",)), raw)
    assert _provider().refusal(message) is None
    payload, warnings = build_payload(parse(raw, message.envelope))
    assert [a["name"] for a in payload["attachment"]] == ["logo.png"]
    assert any("no inline images" in w for w in warnings)


def test_an_invitation_loses_its_method_with_a_warning() -> None:
    raw = _with_attachment('text/calendar; method=REQUEST; charset="utf-8"; name="invite.ics"')
    payload, warnings = build_payload(parse(raw, Envelope("s@example.com", ("r@example.org",))))
    assert [a["name"] for a in payload["attachment"]] == ["invite.ics"]
    assert any("lost its parameters method=REQUEST (" in w for w in warnings), warnings


def _with_attachment(ctype: str, disposition: str = "") -> bytes:
    return crlf(
        "From: s@example.com\nTo: r@example.org\nSubject: x\nMIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="b"\n\n--b\nContent-Type: text/plain\n\nhi\n'
        f"--b\nContent-Type: {ctype}\n{disposition}Content-Transfer-Encoding: base64\n\n"
        "AAEC\n--b--\n"
    )


@pytest.mark.parametrize(
    ("raw", "refused"),
    [
        (_with_attachment("application/pdf", "Content-Disposition: attachment; filename=a.pdf\n"),
         None),
        (_with_attachment("application/octet-stream; name=\"A.PDF\""), None),
        (_with_attachment("image/jpeg"), None),  # attachment-1.jpg
        (_with_attachment("application/octet-stream", "Content-Disposition: attachment;"
                          " filename*=utf-8''r%C3%A9sum%C3%A9.docx\n"), None),
        (_with_attachment("application/octet-stream", "Content-Disposition: attachment;"
                          " filename=setup.exe\n"), "'setup.exe'"),
        (_with_attachment("application/x-sh; name=run"), "'run'"),
        (_with_attachment("application/octet-stream"), "'attachment-1.dat'"),
        (_with_attachment("APPLICATION/OCTET-STREAM"), "'attachment-1.dat'"),
        (crlf("Content-Type: application/octet-stream\nFrom: s@example.com\n\nAAEC\n"),
         "'attachment-1.dat'"),  # the message itself, its first field
        (_with_attachment("message/rfc822"), None),  # attachment-1.txt
        (_with_attachment("message/rfc822; name=fwd.eml"), "'fwd.eml'"),
        (_with_attachment("application/octet-stream", "Content-Disposition: attachment;"
                          " filename*=utf-8''r%C3%A9sum%C3%A9.exe\n"), "'résumé.exe'"),
    ],
)  # fmt: skip
def test_attachments_outside_brevos_list_are_refused(raw: bytes, refused: str | None) -> None:
    message = OutboundMessage("m", Envelope("s@example.com", ("r@example.org",)), raw)
    reason = _provider().refusal(message)
    if refused is None:
        assert reason is None
        payload, _ = build_payload(parse(raw, message.envelope))
        assert validate(payload) == []
    else:
        assert reason is not None and refused in reason, reason
        with pytest.raises(MessageRejected):  # a message spooled before: fails, not sent
            build_payload(parse(raw, message.envelope))


def test_refusal_does_not_parse_a_plain_message(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_parse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("parsed at the end of DATA")

    monkeypatch.setattr(brevo_module, "parse", no_parse)
    provider = _provider()
    for raw in (
        crlf("From: s@example.com\nTo: r@example.org\nSubject: x\n\nhi, my name=Bob\n"),
        _with_attachment("application/pdf", "Content-Disposition: attachment; filename=a.pdf\n"),
        _with_attachment('image/png; name="chart.png"'),
    ):
        message = OutboundMessage("m", Envelope("s@example.com", ("r@example.org",)), raw)
        assert provider.refusal(message) is None


def test_more_than_99_recipients_is_rejected() -> None:
    rcpts = tuple(f"r{i}@example.org" for i in range(MAX_RECIPIENTS + 1))
    with pytest.raises(MessageRejected):
        build_payload(parse(crlf("From: s@example.com\n\nhi\n"), Envelope("s@x.org", rcpts)))
    assert BrevoProvider.max_recipients == 99
    assert BrevoProvider.max_message_size == 20_000_000


def _provider(**kwargs: Any) -> BrevoProvider:
    return BrevoProvider(httpx.AsyncClient(), SecretStr(KEY), "https://api.brevo.com/", **kwargs)


def test_request_shape() -> None:
    message = OutboundMessage(
        "m1", Envelope("s@example.com", ("r@example.org",)), crlf("To: r@example.org\n\nhi\n")
    )
    request = _provider().build_request(message).request
    assert str(request.url) == "https://api.brevo.com/v3/smtp/email"
    assert request.headers["api-key"] == KEY
    assert request.headers["accept"] == "application/json"
    assert request.headers["content-type"] == "application/json"
    assert KEY not in repr(_provider())


_REQUEST = httpx.Request("POST", "https://api.brevo.com/v3/smtp/email")


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (400, {"code": "invalid_parameter", "message": "Invalid email"}, MessageRejected),
        (400, {"code": "missing_parameter", "message": "subject is missing"}, MessageRejected),
        (400, {"code": "unauthorized", "message": "Sender not valid"}, ProviderConfigError),
        (400, {"code": "permission_denied", "message": "IP not allowed"}, ProviderConfigError),
        (400, {"code": "not_enough_credits", "message": "No credits"}, ProviderConfigError),
        (403, {"code": "account_under_validation", "message": "Pending"}, ProviderConfigError),
        (401, {"code": "unauthorized", "message": "Key not found"}, ProviderConfigError),
        (429, {"code": "too_many_requests", "message": "slow down"}, RateLimited),
        (500, "Internal Server Error", ProviderUnavailable),
        (503, {"code": "service_unavailable", "message": "maintenance"}, ProviderUnavailable),
        (404, "Not Found", ProviderConfigError),
    ],
)
def test_error_classification(status: int, body: Any, error: type[DeliveryError]) -> None:
    kwargs: dict[str, Any] = {"json": body} if isinstance(body, dict) else {"text": body}
    response = httpx.Response(status, request=_REQUEST, **kwargs)
    assert type(_provider().classify_error(response)) is error


def test_success_needs_a_message_id() -> None:
    message = OutboundMessage("m", Envelope("s@x.org", ("r@x.org",)), b"\r\n")
    provider = _provider()
    ok = httpx.Response(201, json={"messageId": "<1@smtp-relay.mailin.fr>"}, request=_REQUEST)
    assert provider.parse_response(ok, message).provider_message_id == "<1@smtp-relay.mailin.fr>"
    versions = httpx.Response(201, json={"messageIds": ["<a@x>", "<b@x>"]}, request=_REQUEST)
    assert provider.parse_response(versions, message).provider_message_id == "<a@x> <b@x>"
    with pytest.raises(ProviderConfigError):
        provider.parse_response(httpx.Response(200, text="<html>", request=_REQUEST), message)


# --- Brevo's rate-limit window ------------------------------------------------------------


def test_window_reset_reads_the_headers() -> None:
    def reset(status: int, headers: dict[str, str]) -> float | None:
        return window_reset(httpx.Response(status, headers=headers, request=_REQUEST))

    assert reset(201, _window(remaining=0, reset=5)) == 5.0
    assert reset(201, {}) is None
    assert reset(429, {"Retry-After": "7", "x-sib-ratelimit-reset": "3"}) == 7.0
    assert reset(201, {"Retry-After": "7"}) is None  # only a 429's Retry-After counts
    assert reset(429, {"x-sib-ratelimit-reset": "999999999"}) == brevo_module.MAX_HOLD
    assert reset(201, {"x-sib-ratelimit-reset": "nan"}) is None


async def test_a_spent_window_holds_every_request() -> None:
    clock = FakeClock()
    replies = [Reply(201, {"messageId": "<1@x>"}, _window(remaining=0, reset=5))]
    with FakeESP(BrevoAPI()) as esp:
        esp.then(*replies)
        async with httpx.AsyncClient() as client:
            provider = BrevoProvider(client, SecretStr(KEY), esp.url)
            provider.rate_limit = RateLimit(1000.0, burst=1000, clock=clock)
            raw = crlf("From: s@example.com\nTo: r@example.org\nSubject: x\n\nhi\n")
            message = OutboundMessage("m", Envelope("s@example.com", ("r@example.org",)), raw)
            assert (await provider.send(message)).provider_message_id == "<1@x>"
            second = asyncio.create_task(provider.send(message))
            await clock.waiting(1, seconds=5.0)  # held until Brevo's window resets
            assert len(esp.requests) == 1
            clock.advance(5.0)
            assert (await asyncio.wait_for(second, 30)).provider_message_id
    assert len(esp.requests) == 2


async def test_a_429_holds_every_request_and_is_rate_limited() -> None:
    clock = FakeClock()
    with FakeESP(BrevoAPI()) as esp:
        esp.then(_error(429, "too_many_requests", "slow down", {"Retry-After": "7"}))
        async with httpx.AsyncClient() as client:
            provider = BrevoProvider(client, SecretStr(KEY), esp.url)
            provider.rate_limit = RateLimit(1000.0, burst=1000, clock=clock)
            raw = crlf("From: s@example.com\nTo: r@example.org\nSubject: x\n\nhi\n")
            message = OutboundMessage("m", Envelope("s@example.com", ("r@example.org",)), raw)
            with pytest.raises(RateLimited) as limited:
                await provider.send(message)
            assert limited.value.retry_after == 7.0
            retry = asyncio.create_task(provider.send(message))
            await clock.waiting(1, seconds=7.0)
            clock.advance(7.0)
            assert (await asyncio.wait_for(retry, 30)).provider_message_id


# --- end to end: SMTP in, Brevo's API out -------------------------------------------------


def relay_env(esp: FakeESP, **extra: str) -> dict[str, str]:
    return {
        "ESPRELAY_PROVIDER": "brevo",
        "ESPRELAY_BREVO_API_KEY": KEY,
        "ESPRELAY_BREVO_API_URL": esp.url,
        "ESPRELAY_RETRY_INITIAL": "0.2s",
        "ESPRELAY_RETRY_CONFIG_ERROR": "1s",
        **extra,
    }


def test_corpus_end_to_end(relay_factory: type[RelayProcess]) -> None:
    cases = [c for c in corpus() if c.id in SENDABLE]
    with FakeESP(BrevoAPI()) as esp:
        relay = relay_factory(relay_env(esp)).start()
        ids = {case.id: send_case(relay, case) for case in cases}
        esp.wait_for(len(cases))
        relay.wait_for_log(r"delivered id=\S+ provider=brevo", count=len(cases))
        # The attachment Brevo would refuse (données.dat) is refused at the end of DATA.
        (related,) = [c for c in corpus() if c.id == "related"]
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
            smtp.ehlo("client.test")
            assert int(smtp.esmtp_features["size"]) == BrevoProvider.max_message_size
            smtp.mail(related.mail_from)
            for rcpt in related.rcpts:
                assert smtp.rcpt(rcpt)[0] == 250
            code, reply = smtp.data(related.raw)
            assert (code, reply[:5]) == (550, b"5.6.0"), reply
            assert b"'donn es.dat'" in reply  # the reply line is ASCII
            smtp.rset()
            # SMTP enforces Brevo's recipient limit: the 100th RCPT gets 452.
            smtp.mail("s@example.com")
            for i in range(99):
                assert smtp.rcpt(f"r{i}@example.org")[0] == 250
            assert smtp.rcpt("r99@example.org")[0] == 452
    assert len(esp.requests) == len(cases)
    by_case = {r.json()["headers"]["X-Case"]: r for r in esp.requests}
    for case in cases:
        request = by_case[case.id]
        assert "X-Sib-Sandbox" not in request.json()["headers"]
        check_payload(request.json(), case)
    relay.wait_for_log(rf"id={ids['printer']} provider=brevo changed the message: .*filename")
    assert KEY not in relay.log
    assert "providers=brevo(brevo)" in relay.log


def test_sandbox_end_to_end(relay_factory: type[RelayProcess]) -> None:
    with FakeESP(BrevoAPI()) as esp:
        relay = relay_factory(relay_env(esp, ESPRELAY_BREVO_SANDBOX="true")).start()
        assert "providers=brevo(brevo:sandbox)" in relay.log
        (case,) = [c for c in corpus() if c.id == "printer"]
        send_case(relay, case)
        (request,) = esp.wait_for(1)
        relay.wait_for_log(r"delivered id=\S+ provider=brevo")
    assert request.json()["headers"]["X-Sib-Sandbox"] == "drop"
    assert validate(request.json()) == []


def test_error_mapping_end_to_end(relay_factory: type[RelayProcess]) -> None:
    attempts: dict[str, list[float]] = {}
    lock = threading.Lock()
    api = BrevoAPI()

    def respond(request: Recorded) -> Reply:
        subject = request.json().get("subject", "")
        with lock:
            seen = attempts.setdefault(subject, [])
            seen.append(time.monotonic())
            n = len(seen)
        if subject == "rate-limited" and n == 1:
            return _error(429, "too_many_requests", "slow down", _window(remaining=0, reset=2))
        if subject == "server-error" and n == 1:
            return Reply(500, "Internal Server Error")
        if subject == "invalid":
            return _error(400, "invalid_parameter", "email is not valid in to")
        if subject == "unauthorized" and n == 1:
            return _error(401, "unauthorized", "Key not found")
        if subject == "denied" and n == 1:
            return _error(400, "permission_denied", "Your SMTP account is not yet activated")
        return api(request)

    subjects = ("rate-limited", "server-error", "invalid", "unauthorized", "denied")
    with FakeESP(respond) as esp:
        relay = relay_factory(relay_env(esp)).start()
        ids = {}
        for subject in subjects:
            raw = crlf(f"From: s@example.com\nTo: r@example.org\nSubject: {subject}\n\nhi\n")
            case = Case(
                subject, raw, "s@example.com", ("r@example.org",), "", (), (), (), None, None, None
            )
            ids[subject] = send_case(relay, case)
        relay.wait_for_log(r"delivered id=", count=4, timeout=30)
        failed = queue(relay, "failed")
        time.sleep(1.0)  # room for a wrongly scheduled retry to show up

    assert [m["id"] for m in failed] == [ids["invalid"]], failed
    assert "invalid_parameter" in failed[0]["last_error"]
    # The bounce for it went out through Brevo too: its report parts as .txt files.
    (bounce,) = [r.json() for r in esp.requests if r.json()["to"][0]["email"] == "s@example.com"]
    assert [a["name"].rpartition(".")[2] for a in bounce["attachment"]] == ["txt", "txt"]
    assert len(attempts["invalid"]) == 1
    for subject in ("rate-limited", "server-error", "unauthorized", "denied"):
        assert len(attempts[subject]) == 2, subject
        relay.wait_for_log(rf"delivered id={ids[subject]} provider=brevo attempt=2")
    # x-sib-ratelimit-reset (2 s) was honoured rather than RETRY_INITIAL (0.2 s).
    first, second = attempts["rate-limited"]
    assert second - first >= 1.9
    for subject in ("unauthorized", "denied"):
        relay.wait_for_log(rf"deferred id={ids[subject]} .*configuration problem")
        first, second = attempts[subject]
        assert second - first >= 0.9


def test_spent_window_holds_the_next_message_end_to_end(
    relay_factory: type[RelayProcess],
) -> None:
    seen: list[float] = []
    api = BrevoAPI()

    def respond(request: Recorded) -> Reply:
        seen.append(time.monotonic())
        if len(seen) == 1:
            return Reply(201, {"messageId": "<spent@x>"}, _window(remaining=0, reset=2))
        return api(request)

    with FakeESP(respond) as esp:
        relay = relay_factory(relay_env(esp)).start()
        for subject in ("first", "second"):
            raw = crlf(f"From: s@example.com\nTo: r@example.org\nSubject: {subject}\n\nhi\n")
            case = Case(
                subject, raw, "s@example.com", ("r@example.org",), "", (), (), (), None, None, None
            )
            # Once the first is delivered, its answer (window spent) has been read.
            relay.wait_for_log(rf"delivered id={send_case(relay, case)} ")
        assert len(esp.requests) == 2
    # The first answer said the window was spent for 2 s: the second request waited.
    assert seen[1] - seen[0] >= 1.9


def test_failover_between_brevo_and_mailgun_end_to_end(
    relay_factory: type[RelayProcess], tmp_path: Path
) -> None:
    """A route mixing Brevo and an older provider fails over both ways."""
    api = BrevoAPI()

    def brevo_down_for_some(request: Recorded) -> Reply:
        if request.json()["to"][0]["email"].startswith("via-mailgun"):
            return _error(503, "service_unavailable", "maintenance")
        return api(request)

    def mailgun_down_for_some(request: Recorded) -> Reply:
        rcpts = [v.decode() for n, _, v in form_fields(request) if n == "to"]
        if rcpts[0].startswith("via-brevo"):
            return Reply(503, "Service Unavailable")
        return mailgun(request)

    with FakeESP(brevo_down_for_some) as brevo, FakeESP(mailgun_down_for_some) as mg:
        routes = tmp_path / "routes.toml"
        routes.write_text(
            f'[providers.br]\nkind = "brevo"\napi_key_env = "TEST_BREVO_KEY"\n'
            f'api_url = "{brevo.url}"\n'
            f'[providers.mg]\nkind = "mailgun"\napi_key_env = "TEST_MAILGUN_KEY"\n'
            f'domain = "{DOMAIN}"\napi_url = "{mg.url}"\n'
            '[[routes]]\nsender_domains = ["old.example"]\nproviders = ["mg", "br"]\n'
            '[default]\nproviders = ["br", "mg"]\n'
        )
        relay = relay_factory(
            {
                "TEST_BREVO_KEY": KEY,
                "TEST_MAILGUN_KEY": MAILGUN_KEY,
                "ESPRELAY_ROUTES_FILE": str(routes),
                "ESPRELAY_RETRY_INITIAL": "0.2s",
            }
        ).start()
        for sender, rcpt in (
            ("app@example.com", "via-mailgun@example.org"),
            ("app@old.example", "via-brevo@example.org"),
        ):
            raw = crlf(f"From: {sender}\nTo: {rcpt}\nSubject: failover\n\nhi\n")
            send_case(relay, Case(rcpt, raw, sender, (rcpt,), "", (), (), (), None, None, None))
        relay.wait_for_log(r"delivered id=\S+ provider=mg", timeout=30)
        relay.wait_for_log(r"delivered id=\S+ provider=br", timeout=30)
    # Each was tried first on its route's first provider, then delivered by the other.
    assert [r.json()["to"][0]["email"] for r in brevo.requests] == [
        "via-mailgun@example.org",
        "via-brevo@example.org",
    ]
    assert validate(brevo.requests[1].json()) == []
    assert sorted(v.decode() for r in mg.requests for n, _, v in form_fields(r) if n == "to") == [
        "via-brevo@example.org",
        "via-mailgun@example.org",
    ]
