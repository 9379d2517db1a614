"""Postmark: the pure request builder, and end to end over SMTP to a loopback fake that
validates like Postmark's /email API and answers as it does."""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
import time
import uuid
from email.utils import getaddresses
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
from esprelay.message.mime import Mailbox, parse
from esprelay.models import Envelope, OutboundMessage
from esprelay.providers.postmark import (
    REQUEST_LIMIT,
    PostmarkProvider,
    build_payload,
    format_address,
)
from esprelay.testing.fakeesp import FakeESP, Recorded, Reply
from tests.messages import Case, corpus, crlf
from tests.providers.common import queue, send_case
from tests.relayproc import RelayProcess

TOKEN = "pm-server-token-not-secret"
STREAM = "outbound-test"
#: The other streams of the fake's server (a message may choose one: X-PM-Message-Stream).
OTHER_STREAMS = frozenset({"broadcast-test"})
FIELDS = {
    "From",
    "To",
    "Cc",
    "Bcc",
    "Subject",
    "Tag",
    "HtmlBody",
    "TextBody",
    "ReplyTo",
    "Headers",
    "TrackOpens",
    "TrackLinks",
    "Attachments",
    "Metadata",
    "MessageStream",
}


# --- a fake that validates like Postmark ------------------------------------------


def _error(status: int, code: int, message: str) -> Reply:
    return Reply(status, {"ErrorCode": code, "Message": message})


def addresses(value: str | None) -> list[tuple[str, str]]:
    return [(n, a) for n, a in getaddresses([value or ""]) if a]


def validate(payload: Any, stream: str | None = STREAM) -> list[str]:
    """What Postmark's /email documents as required or limited (ErrorCode 300 and friends)."""
    if not isinstance(payload, dict):
        return ["Invalid JSON"]
    errors = [f"unknown field {k}" for k in payload if k not in FIELDS]
    if len(addresses(payload.get("From"))) != 1:
        errors.append("Invalid 'From' address")
    counts = {f: len(addresses(payload.get(f))) for f in ("To", "Cc", "Bcc")}
    if not sum(counts.values()):
        errors.append("Zero recipients specified")
    if any(n > 50 for n in counts.values()) or sum(counts.values()) > 50:
        errors.append("Maximum of 50 recipients allowed per email message")
    if not payload.get("TextBody") and not payload.get("HtmlBody"):
        errors.append("Provide either email TextBody or HtmlBody or both.")
    for body in ("TextBody", "HtmlBody"):
        if len(str(payload.get(body, "")).encode()) > 5_000_000:
            errors.append(f"{body} exceeds 5 MB")
    for header in payload.get("Headers", []):
        if set(header) != {"Name", "Value"} or not all(isinstance(v, str) for v in header.values()):
            errors.append("Headers must be Name/Value pairs")
    for att in payload.get("Attachments", []):
        if not att.get("Name") or not att.get("ContentType"):
            errors.append("Attachments need a Name and a ContentType")
        try:
            base64.b64decode(att.get("Content", ""), validate=True)
        except (binascii.Error, ValueError):
            errors.append("Attachment content must be base64")
        if "ContentID" in att and not att["ContentID"].startswith("cid:"):
            errors.append("ContentID must start with cid:")
    errors += _control_fields(payload)
    unknown_stream = stream_error(payload, stream)
    if unknown_stream:
        errors.append(unknown_stream)
    return errors


def _control_fields(payload: dict[str, Any]) -> list[str]:
    """Tag, Metadata, TrackOpens and TrackLinks as Postmark documents them: one tag of at
    most 1,000 characters (send-email-with-smtp); at most 10 metadata fields, keys of at
    most 20 characters, string values of at most 80, no key twice even in another case
    (Custom metadata FAQ); TrackOpens a boolean; TrackLinks one of the enum of
    ../shared/specs/postmark."""
    errors = []
    tag = payload.get("Tag")
    if "Tag" in payload and (not isinstance(tag, str) or not tag or len(tag) > 1000):
        errors.append("Tag must be a string of 1 to 1000 characters")
    metadata = payload.get("Metadata", {})
    if not isinstance(metadata, dict) or len(metadata) > 10:
        errors.append("Metadata must be an object of at most 10 fields")
    else:
        if len({k.lower() for k in metadata}) != len(metadata):
            errors.append("Metadata keys must be unique (case-insensitive)")
        for key, value in metadata.items():
            if not key or len(key) > 20:
                errors.append("Metadata keys are 1 to 20 characters")
            if not isinstance(value, str) or len(value) > 80:
                errors.append("Metadata values are strings of at most 80 characters")
    if "TrackOpens" in payload and not isinstance(payload["TrackOpens"], bool):
        errors.append("TrackOpens must be a boolean")
    if "TrackLinks" in payload and payload["TrackLinks"] not in (
        "None",
        "HtmlAndText",
        "HtmlOnly",
        "TextOnly",
    ):
        errors.append("TrackLinks must be one of None, HtmlAndText, HtmlOnly, TextOnly")
    return errors


def stream_error(payload: Any, stream: str | None = STREAM) -> str | None:
    """Postmark's ErrorCode 1235 text when the MessageStream is not one of the server's
    (the configured one, or another one of the server's streams)."""
    if stream is None or not isinstance(payload, dict):
        return None
    chosen = payload.get("MessageStream")
    if chosen == stream or chosen in OTHER_STREAMS:
        return None
    return "The message stream for the provided 'MessageStream' was not found"


class PostmarkAPI:
    def __call__(self, request: Recorded) -> Reply:
        if request.method != "POST" or request.path != "/email":
            return Reply(404, "Not Found")
        if request.headers.get("x-postmark-server-token") != TOKEN:
            return _error(401, 10, "No Account or Server API tokens were supplied")
        if request.headers.get("accept") != "application/json" or not request.headers.get(
            "content-type", ""
        ).startswith("application/json"):
            return _error(422, 409, "JSON required")
        if len(request.body) > REQUEST_LIMIT:
            return _error(422, 300, "Message size exceeds 10 MB")
        try:
            payload = request.json()
        except ValueError:
            return _error(422, 402, "Invalid JSON")
        unknown_stream = stream_error(payload)
        if unknown_stream:
            return _error(422, 1235, unknown_stream)
        errors = validate(payload, stream=None)
        if errors:
            return _error(422, 300, "; ".join(errors))
        return Reply(
            200,
            {
                "To": payload.get("To", ""),
                "SubmittedAt": "2024-10-01T10:00:00.0000000-04:00",
                "MessageID": str(uuid.uuid4()),
                "ErrorCode": 0,
                "Message": "OK",
            },
        )


# --- pure builder -----------------------------------------------------------------


def check_payload(payload: dict[str, Any], case: Case) -> None:
    assert validate(payload) == []
    r = {f: [a.lower() for _, a in addresses(payload.get(f))] for f in ("To", "Cc", "Bcc")}
    assert r == {"To": list(case.to), "Cc": list(case.cc), "Bcc": list(case.bcc)}
    assert addresses(payload["From"])[0][1] == case.from_addr
    assert payload.get("Subject") == case.subject
    assert (payload.get("TextBody") or "").replace("\r\n", "\n") == (case.text or "")
    assert (payload.get("HtmlBody") or "").replace("\r\n", "\n") == (case.html or "")
    got = [
        (
            a["Name"],
            a["ContentType"],
            hashlib.sha256(base64.b64decode(a["Content"])).hexdigest(),
            a.get("ContentID"),
        )
        for a in payload.get("Attachments", [])
    ]
    expected = [
        (a.filename, a.content_type, a.sha256, a.content_id and f"cid:{a.content_id}")
        for a in case.attachments
    ]
    assert got == expected
    headers = {h["Name"]: h["Value"] for h in payload.get("Headers", [])}
    for name, value in case.headers.items():
        assert headers[name] == value
    assert headers.get("X-Case") == case.id
    assert not {"bcc", "to", "from", "cc", "subject"} & {n.lower() for n in headers}
    visible = repr(headers) + repr(r["To"] + r["Cc"])
    for hidden in case.hidden:
        assert hidden not in visible


@pytest.mark.parametrize("case", corpus(), ids=lambda c: c.id)
def test_build_payload_for_corpus(case: Case) -> None:
    parsed = parse(case.raw, Envelope(case.mail_from, case.rcpts))
    payload, warnings = build_payload(parsed, STREAM)
    check_payload(payload, case)
    for expected in case.warnings:
        assert any(expected in w for w in warnings), warnings


def test_display_names_are_quoted_when_needed() -> None:
    assert format_address(Mailbox("", "a@x.org")) == "a@x.org"
    assert format_address(Mailbox("Jürgen", "j@x.org")) == "Jürgen <j@x.org>"
    assert format_address(Mailbox('Doe, "JD"', "j@x.org")) == '"Doe, \\"JD\\"" <j@x.org>'
    assert addresses(format_address(Mailbox("Doe, Jane", "j@x.org"))) == [("Doe, Jane", "j@x.org")]


def test_bcc_only_message_and_dropped_trace_headers() -> None:
    raw = crlf(
        "From: s@example.com\nTo: undisclosed-recipients:;\nSubject: x\n"
        "Received: from a by b\nX-Tag: one\nX-Tag: two\n\nhi\n"
    )
    payload, warnings = build_payload(
        parse(raw, Envelope("s@example.com", ("a@example.org", "b@example.org")))
    )
    assert "To" not in payload and payload["Bcc"] == "a@example.org, b@example.org"
    assert payload["Headers"] == [
        {"Name": "X-Tag", "Value": "one"},
        {"Name": "X-Tag", "Value": "two"},
    ]
    assert any("Received" in w for w in warnings)
    assert validate(payload, stream=None) == []


def test_more_than_fifty_recipients_is_rejected() -> None:
    rcpts = tuple(f"r{i}@example.org" for i in range(51))
    with pytest.raises(MessageRejected):
        build_payload(parse(crlf("From: s@example.com\n\nhi\n"), Envelope("s@x.org", rcpts)))
    assert PostmarkProvider.max_recipients == 50
    assert PostmarkProvider.max_message_size * 4 / 3 < REQUEST_LIMIT


def test_no_body_gets_a_blank_text_body() -> None:
    payload, warnings = build_payload(
        parse(
            crlf("From: s@example.com\nTo: r@example.org\n\n"),
            Envelope("s@x.org", ("r@example.org",)),
        )
    )
    assert payload["TextBody"] == " " and "HtmlBody" not in payload
    assert any("no text or HTML body" in w for w in warnings)


def _provider() -> PostmarkProvider:
    return PostmarkProvider(
        httpx.AsyncClient(), SecretStr(TOKEN), "https://api.postmarkapp.com/", STREAM
    )


def test_request_shape() -> None:
    message = OutboundMessage(
        "m1", Envelope("s@example.com", ("r@example.org",)), crlf("To: r@example.org\n\nhi\n")
    )
    request = _provider().build_request(message).request
    assert str(request.url) == "https://api.postmarkapp.com/email"
    assert request.headers["x-postmark-server-token"] == TOKEN
    assert request.headers["accept"] == "application/json"
    assert request.headers["content-type"] == "application/json"
    assert TOKEN not in repr(_provider())


_REQUEST = httpx.Request("POST", "https://api.postmarkapp.com/email")


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (422, {"ErrorCode": 300, "Message": "Invalid email request"}, MessageRejected),
        (422, {"ErrorCode": 406, "Message": "Inactive recipient"}, MessageRejected),
        (422, {"ErrorCode": 411, "Message": "Forbidden attachment type"}, MessageRejected),
        (422, {"ErrorCode": 400, "Message": "Sender signature not found"}, ProviderConfigError),
        (422, {"ErrorCode": 401, "Message": "Sender signature not confirmed"}, ProviderConfigError),
        (422, {"ErrorCode": 412, "Message": "Account is pending"}, ProviderConfigError),
        (422, {"ErrorCode": 1235, "Message": "Message stream not found"}, ProviderConfigError),
        (401, {"ErrorCode": 10, "Message": "Bad or missing API token"}, ProviderConfigError),
        (429, {"ErrorCode": 429, "Message": "Rate limit exceeded"}, RateLimited),
        (500, "Internal Server Error", ProviderUnavailable),
        (503, {"ErrorCode": 100, "Message": "Maintenance"}, ProviderUnavailable),
        (404, "Not Found", ProviderConfigError),
    ],
)
def test_error_classification(status: int, body: Any, error: type[DeliveryError]) -> None:
    kwargs: dict[str, Any] = {"json": body} if isinstance(body, dict) else {"text": body}
    response = httpx.Response(status, request=_REQUEST, **kwargs)
    assert type(_provider().classify_error(response)) is error


def test_a_200_is_only_a_success_with_error_code_zero() -> None:
    message = OutboundMessage("m", Envelope("s@x.org", ("r@x.org",)), b"\r\n")
    provider = _provider()
    ok = httpx.Response(
        200, json={"ErrorCode": 0, "Message": "OK", "MessageID": "pm-1"}, request=_REQUEST
    )
    assert provider.parse_response(ok, message).provider_message_id == "pm-1"
    partial = httpx.Response(
        200,
        json={
            "ErrorCode": 0,
            "MessageID": "pm-2",
            "Message": "Message OK, but will not deliver to these inactive addresses: x@y.org",
        },
        request=_REQUEST,
    )
    assert "inactive" in provider.parse_response(partial, message).warnings[-1]
    with pytest.raises(MessageRejected):
        provider.parse_response(
            httpx.Response(200, json={"ErrorCode": 406, "Message": "Inactive"}, request=_REQUEST),
            message,
        )
    with pytest.raises(ProviderConfigError):
        provider.parse_response(
            httpx.Response(200, text="<html>welcome</html>", request=_REQUEST), message
        )


# --- end to end: SMTP in, Postmark's API out --------------------------------------


def relay_env(esp: FakeESP) -> dict[str, str]:
    return {
        "ESPRELAY_PROVIDER": "postmark",
        "ESPRELAY_POSTMARK_SERVER_TOKEN": TOKEN,
        "ESPRELAY_POSTMARK_API_URL": esp.url,
        "ESPRELAY_POSTMARK_MESSAGE_STREAM": STREAM,
        "ESPRELAY_RETRY_INITIAL": "0.2s",
        "ESPRELAY_RETRY_CONFIG_ERROR": "1s",
    }


def test_corpus_end_to_end(relay_factory: type[RelayProcess]) -> None:
    cases = corpus()
    with FakeESP(PostmarkAPI()) as esp:
        relay = relay_factory(relay_env(esp)).start()
        ids = {case.id: send_case(relay, case) for case in cases}
        esp.wait_for(len(cases))
        relay.wait_for_log(r"delivered id=\S+ provider=postmark", count=len(cases))
    assert len(esp.requests) == len(cases)
    by_case = {}
    for request in esp.requests:
        headers = {h["Name"]: h["Value"] for h in request.json()["Headers"]}
        by_case[headers["X-Case"]] = request
    for case in cases:
        check_payload(by_case[case.id].json(), case)
    relay.wait_for_log(rf"id={ids['related']} provider=postmark changed the message: .*filename")
    assert TOKEN not in relay.log
    # SMTP enforces Postmark's recipient limit: the 51st RCPT gets 452.
    import smtplib

    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        assert int(smtp.esmtp_features["size"]) == PostmarkProvider.max_message_size
        smtp.mail("s@example.com")
        for i in range(50):
            assert smtp.rcpt(f"r{i}@example.org")[0] == 250
        assert smtp.rcpt("r50@example.org")[0] == 452


def test_error_mapping_end_to_end(relay_factory: type[RelayProcess]) -> None:
    attempts: dict[str, list[float]] = {}
    lock = threading.Lock()
    api = PostmarkAPI()

    def respond(request: Recorded) -> Reply:
        subject = request.json().get("Subject", "")
        with lock:
            seen = attempts.setdefault(subject, [])
            seen.append(time.monotonic())
            n = len(seen)
        if subject == "rate-limited" and n == 1:
            return _error(429, 429, "Rate limit exceeded")
        if subject == "server-error" and n == 1:
            return Reply(500, "Internal Server Error")
        if subject == "invalid":
            return _error(422, 300, "Invalid 'To' address: 'r@example.org'.")
        if subject == "inactive":
            return _error(200, 406, "You tried to send to recipient(s) marked as inactive.")
        if subject == "unauthorized" and n == 1:
            return _error(401, 10, "Bad or missing API token")
        if subject == "signature" and n == 1:
            return _error(422, 400, "Sender signature not found")
        return api(request)

    subjects = ("rate-limited", "server-error", "invalid", "inactive", "unauthorized", "signature")
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

    assert sorted(m["id"] for m in failed) == sorted([ids["invalid"], ids["inactive"]])
    assert all("ErrorCode" in m["last_error"] for m in failed)
    assert len(attempts["invalid"]) == 1 and len(attempts["inactive"]) == 1
    for subject in ("rate-limited", "server-error", "unauthorized", "signature"):
        assert len(attempts[subject]) == 2, subject
        relay.wait_for_log(rf"delivered id={ids[subject]} provider=postmark attempt=2")
    for subject in ("unauthorized", "signature"):
        relay.wait_for_log(rf"deferred id={ids[subject]} .*configuration problem")
        first, second = attempts[subject]
        assert second - first >= 0.9
