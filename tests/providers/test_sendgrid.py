"""SendGrid: the pure request builder, and end to end over SMTP to a loopback fake that
validates like SendGrid's v3 Mail Send API and answers as it does."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import smtplib
import threading
import time
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from esprelay.errors import MessageRejected, ProviderConfigError, RateLimited
from esprelay.message.mime import parse
from esprelay.models import Envelope, OutboundMessage
from esprelay.providers.sendgrid import (
    REQUEST_LIMIT,
    SendGridProvider,
    build_payload,
    rate_limit_reset,
)
from esprelay.testing.fakeesp import FakeESP, Recorded, Reply
from tests.messages import Case, corpus, crlf
from tests.providers.common import queue, send_case
from tests.relayproc import RelayProcess

KEY = "SG.test-key-not-secret"
RESERVED = {
    "x-sg-id",
    "x-sg-eid",
    "received",
    "dkim-signature",
    "content-type",
    "content-transfer-encoding",
    "to",
    "from",
    "subject",
    "reply-to",
    "cc",
    "bcc",
}


# --- a fake that validates like SendGrid ------------------------------------------


def _errors(status: int, *errors: tuple[str | None, str]) -> Reply:
    body = {"errors": [{"message": m, "field": f, "help": None} for f, m in errors]}
    return Reply(status, body)


def validate(payload: Any) -> list[tuple[str | None, str]]:
    """What SendGrid's Mail Send documents as required or forbidden."""
    errors: list[tuple[str | None, str]] = []
    if not isinstance(payload, dict):
        return [(None, "Bad Request")]
    if not isinstance(payload.get("from"), dict) or "@" not in payload["from"].get("email", ""):
        errors.append(("from.email", "The from object must be provided for every email send."))
    persons = payload.get("personalizations")
    if not isinstance(persons, list) or not 1 <= len(persons) <= 1000:
        errors.append(("personalizations", "The personalizations field is required."))
        persons = []
    total = 0
    for i, p in enumerate(persons):
        if not p.get("to"):
            errors.append((f"personalizations.{i}.to", "The to array is required."))
        seen: set[str] = set()
        for kind in ("to", "cc", "bcc"):
            for box in p.get(kind, []):
                email = box.get("email", "")
                total += 1
                if "@" not in email:
                    errors.append((f"personalizations.{i}.{kind}", "Invalid email address."))
                if email.lower() in seen:
                    errors.append((f"personalizations.{i}", "Each email address must be unique."))
                seen.add(email.lower())
                name = box.get("name", "")
                if ("," in name or ";" in name) and not name.startswith('"'):
                    errors.append((f"personalizations.{i}.{kind}.name", "comma in name"))
        if not payload.get("subject") and not p.get("subject"):
            errors.append(("subject", "The subject is required."))
    if total > 1000:
        errors.append(("personalizations", "The total number of recipients must be <= 1000."))
    content = payload.get("content")
    if not isinstance(content, list) or not content:
        errors.append(("content", "Unless a valid template_id is provided, content is required."))
        content = []
    types = [c.get("type") for c in content]
    for c in content:
        if not c.get("type") or not c.get("value"):
            errors.append(("content", "The content value must be a string at least one character"))
    if "text/plain" in types and types[0] != "text/plain":
        errors.append(("content", "text/plain must be first"))
    if "text/html" in types and "text/plain" in types and types[1] != "text/html":
        errors.append(("content", "text/html must follow text/plain"))
    for i, att in enumerate(payload.get("attachments", [])):
        if not att.get("filename"):
            errors.append((f"attachments.{i}.filename", "The attachment filename is required."))
        try:
            if not base64.b64decode(att.get("content", ""), validate=True):
                raise binascii.Error
        except (binascii.Error, ValueError):
            errors.append((f"attachments.{i}.content", "The attachment content must be base64."))
        if any(c in att.get("type", "") for c in ";\r\n"):
            errors.append((f"attachments.{i}.type", "The attachment type cannot contain ;"))
        if att.get("disposition", "attachment") not in ("inline", "attachment"):
            errors.append((f"attachments.{i}.disposition", "invalid disposition"))
        if att.get("disposition") == "inline" and not att.get("content_id"):
            errors.append((f"attachments.{i}.content_id", "content_id required when inline"))
    headers = payload.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        errors.append(("headers", "Invalid type. Expected: object of strings"))
    else:
        bad = [h for h in headers if h.lower() in RESERVED or h.lower().startswith("x-sg-")]
        if bad:
            errors.append(("headers", f"The following header(s) are reserved: {', '.join(bad)}"))
    if "reply_to" in payload and "reply_to_list" in payload:
        errors.append(("reply_to", "Use reply_to or reply_to_list, not both."))
    errors += validate_fields(payload)
    return errors


# The other Mail Send fields, as the v3 spec documents them (../shared/specs/sendgrid/
# tsg_mail_v3.json): types, limits, the properties of each setting.
MESSAGE_FIELDS = {
    "personalizations",
    "from",
    "reply_to",
    "reply_to_list",
    "subject",
    "content",
    "attachments",
    "template_id",
    "headers",
    "categories",
    "custom_args",
    "send_at",
    "batch_id",
    "asm",
    "ip_pool_name",
    "mail_settings",
    "tracking_settings",
}
PERSONALIZATION_FIELDS = {
    "from",
    "to",
    "cc",
    "bcc",
    "subject",
    "headers",
    "substitutions",
    "dynamic_template_data",
    "custom_args",
    "send_at",
}
BYPASS = (
    "bypass_spam_management",
    "bypass_bounce_management",
    "bypass_unsubscribe_management",
)
ENABLE = {"enable": bool}
SETTINGS: dict[str, dict[str, dict[str, type]]] = {
    "mail_settings": {
        "bypass_list_management": ENABLE,
        **{name: ENABLE for name in BYPASS},
        "footer": {"enable": bool, "text": str, "html": str},
        "sandbox_mode": ENABLE,
    },
    "tracking_settings": {
        "click_tracking": {"enable": bool, "enable_text": bool},
        "open_tracking": {"enable": bool, "substitution_tag": str},
        "subscription_tracking": {
            "enable": bool,
            "text": str,
            "html": str,
            "substitution_tag": str,
        },
        "ganalytics": {
            "enable": bool,
            **{f"utm_{k}": str for k in ("source", "medium", "term", "content", "campaign")},
        },
    },
}
ARGS_LIMIT = 10_000  # custom_args and substitutions, bytes


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _string_object(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


def _json_size(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def validate_fields(
    payload: dict[str, Any], now: float | None = None
) -> list[tuple[str | None, str]]:
    errors: list[tuple[str | None, str]] = []
    for key in payload:
        if key not in MESSAGE_FIELDS:
            errors.append((key, "Unknown field."))
    for i, p in enumerate(payload.get("personalizations") or []):
        where = f"personalizations.{i}"
        for key in p:
            if key not in PERSONALIZATION_FIELDS:
                errors.append((f"{where}.{key}", "Unknown field."))
        for key in ("custom_args", "substitutions"):
            if key not in p:
                continue
            # custom_args values reach the event webhook as strings; substitutions:
            # "additionalProperties": {"type": "string"}.
            if not _string_object(p[key]):
                errors.append((f"{where}.{key}", "Invalid type. Expected: object of strings"))
            elif _json_size(p[key]) > ARGS_LIMIT:
                errors.append((f"{where}.{key}", "may not exceed 10,000 bytes"))
        if "send_at" in p and not _integer(p["send_at"]):
            errors.append((f"{where}.send_at", "Invalid type. Expected: integer"))
    if "custom_args" in payload and not isinstance(payload["custom_args"], str):
        errors.append(("custom_args", "Invalid type. Expected: string"))
    if "categories" in payload:
        categories = payload["categories"]
        if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
            errors.append(("categories", "Invalid type. Expected: array of strings"))
        elif len(categories) > 10:
            errors.append(("categories", "Too many categories: at most 10"))
        elif len(set(categories)) != len(categories):
            errors.append(("categories", "The categories must be unique"))
        elif any(len(c) > 255 or not c.isascii() for c in categories):
            # The spec's maxLength; US-ASCII: SendGrid's Categories page.
            errors.append(("categories", "A category must be US-ASCII, at most 255 characters"))
    if "send_at" in payload:
        send_at = payload["send_at"]
        if not _integer(send_at):
            errors.append(("send_at", "Invalid type. Expected: integer"))
        elif send_at > (time.time() if now is None else now) + 72 * 3600:
            errors.append(("send_at", "A send cannot be scheduled more than 72 hours in advance"))
    for key in ("batch_id", "template_id"):
        if key in payload and not isinstance(payload[key], str):
            errors.append((key, "Invalid type. Expected: string"))
    if "ip_pool_name" in payload:
        pool = payload["ip_pool_name"]
        if not isinstance(pool, str) or not 2 <= len(pool) <= 64:
            errors.append(("ip_pool_name", "must be a string of 2 to 64 characters"))
    if "asm" in payload:
        asm = payload["asm"]
        if not isinstance(asm, dict) or not _integer(asm.get("group_id")):
            errors.append(("asm.group_id", "The group_id is required and must be an integer"))
        elif set(asm) - {"group_id", "groups_to_display"}:
            errors.append(("asm", "Unknown field."))
        elif "groups_to_display" in asm:
            groups = asm["groups_to_display"]
            if not isinstance(groups, list) or not all(_integer(g) for g in groups):
                errors.append(("asm.groups_to_display", "Expected: array of integers"))
            elif len(groups) > 25:
                errors.append(("asm.groups_to_display", "at most 25 groups"))
    for where, known in SETTINGS.items():
        if where not in payload:
            continue
        settings = payload[where]
        if not isinstance(settings, dict):
            errors.append((where, "Invalid type. Expected: object"))
            continue
        for name, value in settings.items():
            if name not in known or not isinstance(value, dict):
                errors.append((f"{where}.{name}", "Unknown setting."))
                continue
            for prop, setting in value.items():
                if prop not in known[name] or type(setting) is not known[name][prop]:
                    errors.append((f"{where}.{name}.{prop}", f"Expected: {known[name].get(prop)}"))
        combined = any(b in settings for b in BYPASS)
        if where == "mail_settings" and "bypass_list_management" in settings and combined:
            errors.append(("mail_settings", "bypass_list_management cannot be combined"))
    return errors


class SendGridAPI:
    """The responder: auth, endpoint, content type, validation; 202 + X-Message-Id."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    def __call__(self, request: Recorded) -> Reply:
        if request.method != "POST" or request.path != "/v3/mail/send":
            return _errors(404, (None, "Not Found"))
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return _errors(401, (None, "The provided authorization grant is invalid"))
        if not request.headers.get("content-type", "").startswith("application/json"):
            return _errors(400, (None, "Content-Type should be application/json."))
        if len(request.body) >= REQUEST_LIMIT:
            return _errors(413, (None, "content too large"))
        try:
            payload = request.json()
        except ValueError:
            return _errors(400, (None, "Bad Request"))
        errors = validate(payload)
        if errors:
            return _errors(400, *errors)
        with self.lock:
            self.count += 1
            return Reply(202, b"", {"X-Message-Id": f"sg-{self.count}"})


# --- pure builder -----------------------------------------------------------------


def recipients(payload: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"to": [], "cc": [], "bcc": []}
    for p in payload["personalizations"]:
        for kind in out:
            out[kind] += [b["email"].lower() for b in p.get(kind, [])]
    return out


def attachments(payload: dict[str, Any]) -> list[tuple[str, str, str, str | None]]:
    return [
        (
            a["filename"],
            a["type"],
            hashlib.sha256(base64.b64decode(a["content"])).hexdigest(),
            a.get("content_id") if a["disposition"] == "inline" else None,
        )
        for a in payload.get("attachments", [])
    ]


def check_payload(payload: dict[str, Any], case: Case) -> None:
    """The payload says what the case says, field by field."""
    assert validate(payload) == []
    r = recipients(payload)
    assert r == {"to": list(case.to), "cc": list(case.cc), "bcc": list(case.bcc)}
    assert sorted(r["to"] + r["cc"] + r["bcc"]) == sorted(a.lower() for a in case.rcpts)
    assert payload["from"]["email"] == case.from_addr
    assert payload["subject"] == case.subject
    content = {c["type"]: c["value"].replace("\r\n", "\n") for c in payload["content"]}
    assert content.get("text/plain") == case.text
    assert content.get("text/html") == case.html
    expected = [(a.filename, a.content_type, a.sha256, a.content_id) for a in case.attachments]
    assert attachments(payload) == expected
    headers = payload.get("headers", {})
    for name, value in case.headers.items():
        assert headers[name] == value
    assert headers.get("X-Case") == case.id
    visible = repr(headers) + repr(r["to"] + r["cc"])
    for hidden in case.hidden:
        assert hidden not in visible


@pytest.mark.parametrize("case", corpus(), ids=lambda c: c.id)
def test_build_payload_for_corpus(case: Case) -> None:
    payload, warnings = build_payload(parse(case.raw, Envelope(case.mail_from, case.rcpts)))
    check_payload(payload, case)
    for expected in case.warnings:
        assert any(expected in w for w in warnings), warnings


def build(raw: bytes, rcpts: tuple[str, ...]) -> tuple[dict[str, Any], list[str]]:
    return build_payload(parse(raw, Envelope("s@example.com", rcpts)))


def test_only_blind_recipients_get_one_personalization_each() -> None:
    raw = crlf("From: s@example.com\nTo: undisclosed-recipients:;\nSubject: x\n\nhi\n")
    payload, warnings = build(raw, ("a@example.org", "b@example.org"))
    assert payload["personalizations"] == [
        {"to": [{"email": "a@example.org"}]},
        {"to": [{"email": "b@example.org"}]},
    ]
    assert any("no visible recipient" in w for w in warnings)
    assert validate(payload) == []


def test_cc_without_to_is_sent_as_to() -> None:
    raw = crlf("From: s@example.com\nCc: c@example.org\nSubject: x\n\nhi\n")
    payload, warnings = build(raw, ("c@example.org", "hidden@example.org"))
    assert payload["personalizations"] == [
        {"to": [{"email": "c@example.org"}], "bcc": [{"email": "hidden@example.org"}]}
    ]
    assert any("Cc recipients are sent as To" in w for w in warnings)


def test_reserved_headers_dropped_with_a_warning_and_names_quoted() -> None:
    raw = crlf(
        'From: "Shop, Inc." <s@example.com>\nTo: "Doe, Jane" <j@example.org>\n'
        "Subject: x\nReceived: from a by b\nDKIM-Signature: v=1\nX-SG-EID: abc\n"
        "X-Tag: one\nX-Tag: two\nReturn-Path: <s@example.com>\n\nhi\n"
    )
    payload, warnings = build(raw, ("j@example.org",))
    assert payload["headers"] == {"X-Tag": "one"}
    assert payload["from"] == {"email": "s@example.com", "name": "Shop, Inc."}
    assert payload["personalizations"][0]["to"] == [
        {"email": "j@example.org", "name": '"Doe, Jane"'}
    ]
    (warning,) = [w for w in warnings if "dropped" in w]
    for name in ("Received", "DKIM-Signature", "X-SG-EID", "X-Tag (repeated)", "Return-Path"):
        assert name in warning
    assert validate(payload) == []


def test_no_subject_no_body_and_empty_attachment() -> None:
    raw = crlf(
        'From: s@example.com\nTo: r@example.org\nContent-Type: multipart/mixed; boundary="B"\n\n'
        "--B\nContent-Type: application/pdf\nContent-Disposition: attachment; filename=e.pdf\n\n"
        "\n--B--\n"
    )
    payload, warnings = build(raw, ("r@example.org",))
    assert payload["subject"] == "(no subject)"
    assert payload["content"] == [{"type": "text/plain", "value": " "}]
    assert "attachments" not in payload
    assert len(warnings) == 3
    assert validate(payload) == []


def test_reply_to_list_for_several_reply_to_addresses() -> None:
    raw = crlf("From: s@example.com\nTo: r@example.org\nReply-To: a@x.org, B <b@x.org>\n\nhi\n")
    payload, _ = build(raw, ("r@example.org",))
    assert payload["reply_to_list"] == [{"email": "a@x.org"}, {"email": "b@x.org", "name": "B"}]
    assert "reply_to" not in payload


def test_request_and_limits() -> None:
    provider = SendGridProvider(httpx.AsyncClient(), SecretStr(KEY), "https://api.eu.sendgrid.com/")
    message = OutboundMessage(
        "m1", Envelope("s@example.com", ("r@example.org",)), crlf("To: r@example.org\n\nhi\n")
    )
    request = provider.build_request(message).request
    assert str(request.url) == "https://api.eu.sendgrid.com/v3/mail/send"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"
    assert KEY not in repr(provider)
    assert SendGridProvider.max_recipients == 1000
    # The largest raw message still fits 30 MB once base64 inflates it by 4/3.
    assert SendGridProvider.max_message_size * 4 / 3 < REQUEST_LIMIT


def test_no_from_at_all_is_rejected_permanently() -> None:
    with pytest.raises(MessageRejected):
        build_payload(parse(crlf("To: r@example.org\n\nhi\n"), Envelope("", ("r@example.org",))))


def test_rate_limit_reset_and_wrong_200() -> None:
    request = httpx.Request("POST", "http://x/v3/mail/send")
    reset = httpx.Response(429, headers={"X-RateLimit-Reset": "1005"}, request=request)
    assert rate_limit_reset(reset, now=1000.0) == 5.0
    provider = SendGridProvider(httpx.AsyncClient(), SecretStr(KEY), "http://x")
    error = provider.classify_error(reset)
    assert isinstance(error, RateLimited) and error.retry_after is not None
    assert isinstance(
        provider.classify_error(httpx.Response(404, request=request)), ProviderConfigError
    )
    message = OutboundMessage("m", Envelope("s@x.org", ("r@x.org",)), b"\r\n")
    with pytest.raises(ProviderConfigError):
        provider.parse_response(httpx.Response(200, text="<html>", request=request), message)


# --- end to end: SMTP in, SendGrid's API out -------------------------------------


def relay_env(esp: FakeESP, **extra: str) -> dict[str, str]:
    return {
        "ESPRELAY_PROVIDER": "sendgrid",
        "ESPRELAY_SENDGRID_API_KEY": KEY,
        "ESPRELAY_SENDGRID_API_URL": esp.url,
        "ESPRELAY_RETRY_INITIAL": "0.2s",
        "ESPRELAY_RETRY_CONFIG_ERROR": "1s",
        **extra,
    }


def test_corpus_end_to_end(relay_factory: type[RelayProcess]) -> None:
    cases = corpus()
    with FakeESP(SendGridAPI()) as esp:
        # Settings above SendGrid's limits: the provider's own limits must win.
        env = relay_env(esp, ESPRELAY_MAX_MESSAGE_SIZE="100M", ESPRELAY_MAX_RECIPIENTS="5000")
        relay = relay_factory(env).start()
        ids = {case.id: send_case(relay, case) for case in cases}
        esp.wait_for(len(cases))
        relay.wait_for_log(r"delivered id=\S+ provider=sendgrid", count=len(cases))
    assert len(esp.requests) == len(cases)
    by_case = {r.json()["headers"]["X-Case"]: r for r in esp.requests}
    for case in cases:
        request = by_case[case.id]
        assert request.headers["authorization"] == f"Bearer {KEY}"
        check_payload(request.json(), case)
    # Every change is logged with the message id; the key never is.
    relay.wait_for_log(rf"id={ids['printer']} provider=sendgrid changed the message: .*filename")
    assert KEY not in relay.log
    assert "Scan attached" not in relay.log


def test_error_mapping_end_to_end(relay_factory: type[RelayProcess]) -> None:
    attempts: dict[str, list[float]] = {}
    lock = threading.Lock()
    api = SendGridAPI()

    def respond(request: Recorded) -> Reply:
        subject = request.json().get("subject", "")
        with lock:
            seen = attempts.setdefault(subject, [])
            seen.append(time.monotonic())
            n = len(seen)
        if subject == "rate-limited" and n == 1:
            reset = str(int(time.time()) + 2)
            return Reply(
                429, {"errors": [{"message": "too many requests"}]}, {"X-RateLimit-Reset": reset}
            )
        if subject == "server-error" and n == 1:
            return _errors(500, (None, "internal server error"))
        if subject == "bad-request":
            return _errors(400, ("from.email", "The from address does not match a verified Sender"))
        if subject == "unauthorized" and n == 1:
            return _errors(401, (None, "The provided authorization grant is invalid"))
        return api(request)

    with FakeESP(respond) as esp:
        relay = relay_factory(relay_env(esp)).start()
        ids = {}
        for subject in ("rate-limited", "server-error", "bad-request", "unauthorized"):
            raw = crlf(f"From: s@example.com\nTo: r@example.org\nSubject: {subject}\n\nhi\n")
            case = Case(
                subject, raw, "s@example.com", ("r@example.org",), "", (), (), (), None, None, None
            )
            ids[subject] = send_case(relay, case)
        relay.wait_for_log(r"delivered id=", count=3, timeout=30)
        failed = queue(relay, "failed")
        # Give a wrongly scheduled retry of the 400 the time to show up.
        time.sleep(1.0)

    assert [m["id"] for m in failed] == [ids["bad-request"]]
    assert "verified Sender" in failed[0]["last_error"]
    assert len(attempts["bad-request"]) == 1
    for subject in ("rate-limited", "server-error", "unauthorized"):
        assert len(attempts[subject]) == 2, subject
        relay.wait_for_log(rf"delivered id={ids[subject]} provider=sendgrid attempt=2")
    # X-RateLimit-Reset (1-2 s ahead) was honoured rather than RETRY_INITIAL (0.2 s).
    first, second = attempts["rate-limited"]
    assert second - first >= 0.9
    # The 401 was logged as an operator problem and retried no sooner than RETRY_CONFIG_ERROR.
    relay.wait_for_log(rf"deferred id={ids['unauthorized']} .*configuration problem")
    first, second = attempts["unauthorized"]
    assert second - first >= 0.9


def test_smtp_enforces_sendgrid_limits(relay_factory: type[RelayProcess]) -> None:
    env = {
        "ESPRELAY_PROVIDER": "sendgrid",
        "ESPRELAY_SENDGRID_API_KEY": KEY,
        "ESPRELAY_SENDGRID_API_URL": "http://127.0.0.1:9",
        "ESPRELAY_MAX_MESSAGE_SIZE": "100M",
        "ESPRELAY_MAX_RECIPIENTS": "5000",
    }
    relay = relay_factory(env).start()
    limit = SendGridProvider.max_message_size
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        assert int(smtp.esmtp_features["size"]) == limit
        assert smtp.mail("s@example.com", [f"SIZE={limit + 1}"])[0] == 552
        smtp.rset()
        assert smtp.mail("s@example.com", [f"SIZE={limit}"])[0] == 250
        for i in range(1000):
            assert smtp.rcpt(f"r{i}@example.org")[0] == 250
        assert smtp.rcpt("r1000@example.org")[0] == 452
