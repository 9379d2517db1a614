"""DSNs read back as valid RFC 3464 reports with Python's email package."""

from __future__ import annotations

import email
import email.policy
import json

from esprelay.errors import MessageRejected, ProviderUnavailable
from esprelay.message.dsn import (
    RETURN_FULL_LIMIT,
    EnvelopeDSN,
    RecipientDSN,
    address_field,
    build_dsn,
    from_meta,
    is_dsn,
    status_for,
    wants_failure_report,
)

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


# region the client's DSN parameters (RFC 3461)


def test_envid_and_orcpt_echoed() -> None:
    parameters = EnvelopeDSN(
        envid="Q+1.x",
        recipients={"c@example.net": RecipientDSN(orcpt="rfc822;C+x@Example.net")},
    )
    message = email.message_from_bytes(build(parameters=parameters), policy=email.policy.default)
    per_message, first, second = list(message.iter_parts())[1].get_payload()
    assert per_message["Original-Envelope-Id"] == "Q+1.x"
    assert list(per_message.keys())[:2] == ["Original-Envelope-Id", "Reporting-MTA"]
    assert "Original-Recipient" not in first
    assert second["Original-Recipient"] == "rfc822;C+x@Example.net"
    assert list(second.keys())[:2] == ["Original-Recipient", "Final-Recipient"]


def test_no_parameters_no_original_fields() -> None:
    dsn = build()
    assert b"Original-Envelope-Id" not in dsn and b"Original-Recipient" not in dsn


def test_ret_hdrs_returns_headers_only() -> None:
    dsn = build(parameters=EnvelopeDSN(ret="HDRS"))
    assert b"secret body" not in dsn
    message = email.message_from_bytes(dsn, policy=email.policy.default)
    assert list(message.iter_parts())[2].get_content_type() == "text/rfc822-headers"


def test_ret_full_returns_the_message_byte_for_byte() -> None:
    raw = RAW + "--boundary-like\r\n.\r\nGrüße\r\n".encode()
    dsn = build(raw=raw, parameters=EnvelopeDSN(ret="FULL"))
    assert raw in dsn
    message = email.message_from_bytes(dsn, policy=email.policy.default)
    human, _, returned = message.iter_parts()
    assert "The message is attached." in human.get_content()
    assert returned.get_content_type() == "message/rfc822"
    assert returned["Content-Transfer-Encoding"] == "8bit"
    [inner] = returned.get_payload()
    assert inner["Message-ID"] == "<orig@example.com>"
    assert is_dsn(dsn)


def test_ret_full_of_an_ascii_message_is_7bit() -> None:
    message = email.message_from_bytes(
        build(parameters=EnvelopeDSN(ret="FULL")), policy=email.policy.default
    )
    returned = list(message.iter_parts())[2]
    assert returned["Content-Transfer-Encoding"] == "7bit"
    assert b"secret body" in returned.as_bytes()


def test_ret_full_beyond_the_limit_returns_headers_only() -> None:
    raw = RAW + b"x" * RETURN_FULL_LIMIT
    dsn = build(raw=raw, parameters=EnvelopeDSN(ret="FULL"))
    assert len(dsn) < RETURN_FULL_LIMIT
    message = email.message_from_bytes(dsn, policy=email.policy.default)
    human, _, headers = message.iter_parts()
    assert headers.get_content_type() == "text/rfc822-headers"
    assert f"larger than the {RETURN_FULL_LIMIT} bytes" in " ".join(human.get_content().split())


def test_notify_decides_who_is_reported() -> None:
    assert wants_failure_report(None)
    assert wants_failure_report(RecipientDSN(orcpt="rfc822;a@b"))
    assert wants_failure_report(RecipientDSN(notify=("FAILURE", "DELAY")))
    assert not wants_failure_report(RecipientDSN(notify=("NEVER",)))
    assert not wants_failure_report(RecipientDSN(notify=("SUCCESS", "DELAY")))


def test_parameters_round_trip_through_the_metadata() -> None:
    parameters = EnvelopeDSN(
        ret="FULL",
        envid="id 1",
        recipients={
            "a@example.org": RecipientDSN(notify=("NEVER",)),
            "b@example.org": RecipientDSN(notify=("SUCCESS",), orcpt="rfc822;b@example.org"),
        },
    )
    meta = json.loads(json.dumps(parameters.meta()))  # as the spool keeps it
    assert from_meta(meta) == parameters
    assert EnvelopeDSN().meta() == {}
    assert from_meta({}) == EnvelopeDSN()
    assert from_meta({"dsn_rcpts": "junk", "dsn_ret": 3}) == EnvelopeDSN()


# endregion


def test_utf8_addresses_are_never_encoded_words() -> None:
    """RFC 6533: a UTF-8 address in the report is of type utf-8, written with \\x{HEX};
    a UTF-8 sender gets the report addressed in UTF-8 (RFC 6532)."""
    dsn = build(
        failed_recipients=["jos\u00e9@b\u00fccher.de", "a+b@example.org"],
        original_sender="\u7528\u6237@example.com",
        to_address="\u7528\u6237@example.com",
    )
    assert b"=?utf-8?" not in dsn.split(b"\r\n\r\n", 1)[0]
    assert "To: \u7528\u6237@example.com\r\n".encode() in dsn
    message = email.message_from_bytes(dsn, policy=email.policy.default)
    per_message, first, second = list(message.iter_parts())[1].get_payload()
    assert per_message["X-Original-Envelope-From"] == "utf-8; \\x{7528}\\x{6237}@example.com"
    assert first["Final-Recipient"] == "utf-8; jos\\x{E9}@b\\x{FC}cher.de"
    assert second["Final-Recipient"] == "rfc822; a+b@example.org"
    assert address_field("a+b=c\\d\u00e9@x") == "utf-8; a\\x{2B}b\\x{3D}c\\x{5C}d\\x{E9}@x"
