"""DSNs read back as valid RFC 3464 reports with Python's email package."""

from __future__ import annotations

import email
import email.policy

from esprelay.errors import MessageRejected, ProviderUnavailable
from esprelay.message.dsn import build_dsn, is_dsn, status_for

RAW = (
    b"From: app@example.com\r\nTo: b@example.org\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    b"Message-ID: <orig@example.com>\r\n\r\nsecret body\r\n"
)


def build(**overrides: object) -> bytes:
    args: dict[str, object] = {
        "raw": RAW,
        "failed_recipients": ["b@example.org", "c@example.net"],
        "original_sender": "app@example.com",
        "reason": "HTTP 422: recipient suppressed (provider=sg, status=422)",
        "status": "5.0.0",
        "reporting_mta": "relay.example.com",
        "from_address": "MAILER-DAEMON@relay.example.com",
        "to_address": "app@example.com",
        "arrival_date": 1_700_000_000.0,
        "message_id": "abc123",
    }
    args.update(overrides)
    return build_dsn(**args)  # type: ignore[arg-type]


def test_dsn_structure() -> None:
    dsn = build()
    message = email.message_from_bytes(dsn, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert message["Auto-Submitted"] == "auto-replied"
    human, status, headers = message.iter_parts()
    assert human.get_content_type() == "text/plain"
    assert "b@example.org" in human.get_content()
    assert status.get_content_type() == "message/delivery-status"
    per_message, *per_recipient = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; relay.example.com"
    assert [b["Final-Recipient"] for b in per_recipient] == [
        "rfc822; b@example.org",
        "rfc822; c@example.net",
    ]
    assert {b["Action"] for b in per_recipient} == {"failed"}
    assert {b["Status"] for b in per_recipient} == {"5.0.0"}
    assert "recipient suppressed" in per_recipient[0]["Diagnostic-Code"]
    assert headers.get_content_type() == "text/rfc822-headers"
    assert b"Message-ID: <orig@example.com>" in dsn
    assert b"secret body" not in dsn  # headers only, never the body
    assert b"\r\n" in dsn and b"\n" not in dsn.replace(b"\r\n", b"")


def test_8bit_headers_survive() -> None:
    raw = "Subject: Grüße\r\nFrom: a@example.com\r\n\r\nx\r\n".encode()
    message = email.message_from_bytes(build(raw=raw), policy=email.policy.default)
    headers = list(message.iter_parts())[2]
    assert "Grüße" in headers.get_payload(decode=True).decode()


def test_is_dsn() -> None:
    assert is_dsn(build())
    assert not is_dsn(RAW)
    assert not is_dsn(
        b"Content-Type: multipart/report; report-type=disposition-notification\r\n\r\n"
    )
    assert not is_dsn(b"")


def test_status_codes() -> None:
    assert status_for(MessageRejected("x", status_code=422), expired=False) == "5.0.0"
    assert status_for(MessageRejected("x", status_code=413), expired=False) == "5.3.4"
    assert status_for(ProviderUnavailable("x"), expired=True) == "5.4.7"
