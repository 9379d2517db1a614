"""Public MIME corpora (real-world and malformed messages) through mime.py and both JSON
builders: no exception, a payload each fake ESP accepts, and the recipient-union rule.

The corpora live outside the project (``../shared/corpora``); without them this skips.
"""

from __future__ import annotations

import base64
import email.policy
from email.message import EmailMessage
from email.parser import BytesHeaderParser, BytesParser
from email.utils import getaddresses
from pathlib import Path

import pytest

from esprelay.errors import MessageRejected
from esprelay.message.mime import address_key, parse
from esprelay.models import Envelope
from esprelay.providers import postmark, sendgrid
from tests.providers import test_postmark, test_sendgrid

CORPORA = Path(__file__).resolve().parents[1].parent / "shared" / "corpora"
FILES = sorted(CORPORA.rglob("*.eml")) if CORPORA.is_dir() else []


def envelope_for(raw: bytes) -> Envelope:
    """Header recipients (the first few) plus one envelope-only recipient."""
    headers = BytesHeaderParser(policy=email.policy.default).parsebytes(raw)
    values = [str(v) for name in ("to", "cc") for v in headers.get_all(name) or []]
    rcpts = [addr for _, addr in getaddresses(values) if "@" in addr][:10]
    return Envelope("sender@example.com", (*rcpts, "envelope-only@example.org"))


@pytest.mark.slow
@pytest.mark.skipif(not FILES, reason=f"no MIME corpora at {CORPORA} (optional test data)")
def test_every_corpus_message_maps_to_both_providers() -> None:
    problems: list[str] = []
    for path in FILES:
        name = str(path.relative_to(CORPORA))
        raw = path.read_bytes()
        if b"\r\n" not in raw:
            raw = raw.replace(b"\n", b"\r\n")  # as an SMTP client would send it
        envelope = envelope_for(raw)
        parsed = parse(raw, envelope)
        sent = {address_key(m.addr) for m in parsed.recipients.all()}
        if sent != {address_key(a) for a in envelope.rcpt_tos}:
            problems.append(f"{name}: recipients {sorted(sent)} != envelope")
        try:
            payload, _ = sendgrid.build_payload(parsed)
        except MessageRejected as exc:
            problems.append(f"{name}: sendgrid rejected: {exc}")
        else:
            errors = test_sendgrid.validate(payload)
            if errors:
                problems.append(f"{name}: sendgrid fake refuses: {errors}")
        try:
            pm_payload, _ = postmark.build_payload(parsed)
        except MessageRejected as exc:
            problems.append(f"{name}: postmark rejected: {exc}")
        else:
            pm_errors = test_postmark.validate(pm_payload, stream=None)
            if pm_errors:
                problems.append(f"{name}: postmark fake refuses: {pm_errors}")
    assert not problems, "\n".join(problems)


# --- the JSON adapters against the email package's own reading -----------------------

_PARSER = BytesParser(policy=email.policy.default)
#: Files where the comparison needs an exception beyond the general rules of
#: ``_compare`` (a text that differs with a warning that says why, a message whose
#: multipart structure is broken), and why.
EXCEPTIONS: dict[str, str] = {}


def _email_body(message: EmailMessage, subtype: str) -> tuple[EmailMessage | None, str | None]:
    part = message.get_body((subtype,))
    if part is None:
        return None, None
    try:
        return part, str(part.get_content())
    except (LookupError, UnicodeError, ValueError, AssertionError) as exc:
        return part, f"<{type(exc).__name__}>"


def _leaves(part: EmailMessage) -> list[EmailMessage]:
    """The leaf parts under ``part``; an attached message (message/*) is one leaf."""
    if part.get_content_maintype() == "multipart" and part.is_multipart():
        out: list[EmailMessage] = []
        for sub in part.iter_parts():
            assert isinstance(sub, EmailMessage)
            out += _leaves(sub)
        return out
    return [part]


def _signatures(message: EmailMessage) -> list[EmailMessage]:
    """The signature parts of every multipart/signed (all parts but the first)."""
    out: list[EmailMessage] = []
    for part in message.walk():
        if part.get_content_type() == "multipart/signed" and part.is_multipart():
            for sub in list(part.iter_parts())[1:]:
                assert isinstance(sub, EmailMessage)
                out += _leaves(sub)
    return out


def _email_attachments(message: EmailMessage, bodies: list[EmailMessage]) -> list[EmailMessage]:
    """The email package's attachments: ``iter_attachments()``, with a multipart one
    opened up to its leaves (an attached message stays whole), less the body parts."""
    out: list[EmailMessage] = []
    for part in message.iter_attachments():
        assert isinstance(part, EmailMessage)
        out += _leaves(part)
    return [p for p in out if not any(p is b for b in bodies)]


def _attachment_bytes(part: EmailMessage) -> bytes | None:
    if part.get_content_maintype() == "message":
        return None  # compared by type and count only: re-serialised on both sides
    data = part.get_payload(decode=True)
    return data if isinstance(data, bytes) else None


def _sent(provider: str, raw: bytes, envelope: Envelope) -> tuple[dict[str, object], list[str]]:
    """What the adapter sends, read back: text, html, attachments (type, bytes)."""
    parsed = parse(raw, envelope)
    if provider == "sendgrid":
        payload, warnings = sendgrid.build_payload(parsed)
        content = {c["type"]: c["value"] for c in payload["content"]}
        attachments = [
            (a["type"], base64.b64decode(a["content"])) for a in payload.get("attachments", [])
        ]
        text, html = content.get("text/plain"), content.get("text/html")
        if text == " " and not parsed.text:
            text = parsed.text  # SendGrid's required blank body
        calendar = [v for k, v in content.items() if k.startswith("text/calendar")]
    else:
        payload, warnings = postmark.build_payload(parsed)
        attachments = [
            (a["ContentType"].split(";")[0], base64.b64decode(a["Content"]))
            for a in payload.get("Attachments", [])
        ]
        text, html = payload.get("TextBody"), payload.get("HtmlBody")
        if text == " " and not parsed.text:
            text = parsed.text  # Postmark's required blank body
        calendar = []
    return {"text": text, "html": html, "attachments": attachments, "calendar": calendar}, warnings


def _compare(name: str, raw: bytes, provider: str) -> list[str]:
    message = _PARSER.parsebytes(raw)
    assert isinstance(message, EmailMessage)
    try:
        sent, warnings = _sent(provider, raw, envelope_for(raw))
    except MessageRejected as exc:
        return [f"{name}: {provider} rejected: {exc}"]
    problems: list[str] = []
    broken = any("without a usable boundary" in w for w in warnings)
    charset_notes = [w for w in warnings if "a text part" in w or "unknown charset" in w]
    bodies: list[EmailMessage] = []
    for subtype in ("plain", "html"):
        part, theirs = _email_body(message, subtype)
        if part is not None:
            bodies.append(part)
        ours = sent[subtype if subtype == "html" else "text"]
        if (theirs or None) == (ours or None):
            continue
        if broken:
            continue  # a multipart without its boundary: sent as the text it is
        gave_up = theirs is not None and ("\ufffd" in theirs or theirs.startswith("<"))
        if gave_up and ours and "\ufffd" not in str(ours):
            continue  # decoded where the email package replaced bytes or gave up
        if charset_notes:
            continue  # read otherwise than the label says, and the warning says how
        problems.append(f"{name}: {provider} {subtype} {str(ours)[:60]!r} != {theirs!r:.60}")
    signed = any("-signed (" in w for w in warnings)
    signatures = _signatures(message) if signed else []
    ours_all = [data for _, data in sent["attachments"]]  # type: ignore[attr-defined]
    ours_all += [str(v).encode() for v in sent["calendar"]]  # type: ignore[attr-defined]
    for text in (sent["text"], sent["html"]):
        if text:
            ours_all.append(str(text).encode())
    for part in _email_attachments(message, bodies):
        if any(part is s for s in signatures):
            continue  # not sent, by design: the message says so in a warning
        if broken:
            continue
        data = _attachment_bytes(part)
        if data is None:
            if not any(t == part.get_content_type() for t, _ in sent["attachments"]):  # type: ignore[attr-defined]
                problems.append(f"{name}: {provider} lost a {part.get_content_type()} part")
            continue
        if not data and provider == "sendgrid":
            continue  # SendGrid refuses an empty attachment: dropped with a warning
        if data not in ours_all and data.rstrip(b"\r\n") not in ours_all:
            problems.append(
                f"{name}: {provider} lost the attachment {part.get_content_type()}"
                f" {part.get_filename()!r} ({len(data)} bytes)"
            )
    return problems


@pytest.mark.slow
@pytest.mark.skipif(not FILES, reason=f"no MIME corpora at {CORPORA} (optional test data)")
@pytest.mark.parametrize("provider", ["sendgrid", "postmark"])
def test_adapters_carry_what_the_email_package_reads(provider: str) -> None:
    """Every corpus file through the adapter: the text and HTML bodies and every
    attachment the email package finds (get_body, iter_attachments) are sent."""
    problems: list[str] = []
    for path in FILES:
        name = str(path.relative_to(CORPORA))
        if name in EXCEPTIONS:
            continue
        raw = path.read_bytes()
        if b"\r\n" not in raw:
            raw = raw.replace(b"\n", b"\r\n")
        problems += _compare(name, raw, provider)
    assert not problems, "\n".join(problems)
