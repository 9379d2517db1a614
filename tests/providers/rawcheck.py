"""Checks for the raw-MIME providers (Mailgun, SES) against the shared message corpus.

Raw providers send the message itself, so "arrived as meant" is checked on the MIME
that reaches the ESP: the case's expected subject, bodies and custom headers; every
leaf part with the same type, filename, Content-ID and decoded bytes as sent; no
hidden recipient anywhere in the headers.
"""

from __future__ import annotations

import email.policy
import hashlib
import re
from email.message import EmailMessage
from email.parser import BytesParser

from tests.messages import Case

BCC_FIELD = re.compile(rb"(?im)^bcc[ \t]*:.*\r?\n(?:[ \t].*\r?\n)*")


def without_bcc(raw: bytes) -> bytes:
    """``raw`` minus its top-level Bcc field(s), written independently of rawmime."""
    head, separator, body = raw.partition(b"\r\n\r\n")
    return BCC_FIELD.sub(b"", head + b"\r\n").removesuffix(b"\r\n") + separator + body


def parse(raw: bytes) -> EmailMessage:
    message = BytesParser(policy=email.policy.default).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    return message


def leaves(message: EmailMessage) -> list[tuple[str, str | None, str | None, str]]:
    return [
        (
            part.get_content_type(),
            part.get_filename(),
            part.get("Content-ID"),
            hashlib.sha256(part.get_payload(decode=True) or b"").hexdigest(),
        )
        for part in message.walk()
        if not part.is_multipart()
    ]


def body_text(message: EmailMessage, subtype: str) -> str | None:
    part = message.get_body((subtype,))
    if part is None:
        return None
    return str(part.get_content()).replace("\r\n", "\n")


def assert_arrived_as_meant(case: Case, sent: bytes) -> None:
    original, arrived = parse(case.raw), parse(sent)
    assert arrived["Subject"] == case.subject
    assert arrived["X-Case"] == case.id
    assert arrived["Bcc"] is None
    head = sent.split(b"\r\n\r\n", 1)[0].decode("ascii", "replace")
    for hidden in case.hidden:
        assert hidden not in head, hidden
    for name, value in case.headers.items():
        assert arrived[name] == value, name
    for subtype, expected in (("plain", case.text), ("html", case.html)):
        got = body_text(arrived, subtype)
        assert (got or "").rstrip("\n") == (expected or "").rstrip("\n"), subtype
    assert leaves(arrived) == leaves(original)
    arrived_leaves = leaves(arrived)
    for attachment in case.attachments:
        cid = f"<{attachment.content_id}>" if attachment.content_id else None
        assert any(
            sha == attachment.sha256 and ctype == attachment.content_type and part_cid == cid
            for ctype, _, part_cid, sha in arrived_leaves
        ), attachment
