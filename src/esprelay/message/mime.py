"""A pure, parsed view of a raw message, for providers that take JSON fields.

:func:`parse` turns the bytes received over SMTP (and their envelope) into a
:class:`ParsedMessage`: decoded subject, addresses, the first text and HTML bodies,
every attachment and inline part with its bytes, threading headers and the other
headers an API may carry.  It uses the standard library's ``email`` package with
``policy.default`` and never raises on broken MIME: whatever it cannot carry over
is named in ``ParsedMessage.warnings``, so nothing is dropped silently.

By default the message is parsed with :data:`esprelay.message.fastheaders.cheap`, which keeps
raw string headers and answers each header lookup with what ``policy.default`` would
give, computing it only when a value is not of a plain form; the result is the same
``ParsedMessage`` as ``parse(raw, envelope, exact=True)``, the original all-
``policy.default`` path, which stays as the reference (``tests/test_mime_fast.py``
compares the two) and takes over whenever the cheap path meets anything unexpected.
Before either, a message that is one text/plain or text/html body (the common case)
is read without the feedparser at all (:func:`_parse_single_text`, compared with the
reference by ``tests/test_mime_single.py``); anything else about it leaves the message
to the parser.

Recipients follow the envelope, which is authoritative (RFC 5321): a To or Cc
address that is also an envelope recipient is sent as To or Cc; every other envelope
recipient becomes Bcc; header addresses outside the envelope are not sent.  So the
union of recipients sent equals the envelope, no more, no less.  A Bcc header is
never carried as a visible header.
"""

from __future__ import annotations

import contextlib
import email.policy
import mimetypes
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import getaddresses

from esprelay.message import fastheaders
from esprelay.message.header import items as header_items
from esprelay.message.header import read_header
from esprelay.models import Envelope

#: Headers the parsed view maps to fields of its own, or blind ones that must never
#: become visible (Bcc, Resent-Bcc); none is passed on as a header.
MAPPED_HEADERS = frozenset({"from", "to", "cc", "bcc", "resent-bcc", "reply-to", "subject"})
#: MIME structure; the ESP writes its own.
STRUCTURAL_HEADERS = frozenset(
    {
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "content-disposition",
        "content-id",
        "content-length",
    }
)
MAX_DEPTH = 20
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # printable ASCII without ":" (RFC 5322 ftext)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_FOLD = re.compile(r"\s*[\r\n]+\s*")
_PARSER = BytesParser(policy=email.policy.default)
#: A message's raw header fields (name, value) in order, and by lower-cased name.
Items = list[tuple[str, str]]
Index = dict[str, list[str]]
_CHEAP_PARSER = BytesParser(policy=fastheaders.cheap)


@dataclass(frozen=True, slots=True)
class Mailbox:
    name: str
    addr: str


@dataclass(frozen=True, slots=True)
class Attachment:
    """A non-body part: an attachment, or an inline part (``inline``) such as a cid image."""

    content: bytes
    content_type: str
    filename: str | None
    content_id: str | None
    inline: bool


@dataclass(frozen=True, slots=True)
class Recipients:
    """Who receives the message, reconciled with the envelope."""

    to: tuple[Mailbox, ...]
    cc: tuple[Mailbox, ...]
    bcc: tuple[Mailbox, ...]

    def all(self) -> tuple[Mailbox, ...]:
        return self.to + self.cc + self.bcc


@dataclass(frozen=True)
class ParsedMessage:
    subject: str | None
    from_: Mailbox | None
    reply_to: tuple[Mailbox, ...]
    #: The To and Cc headers as written (for reference; send ``recipients``).
    to: tuple[Mailbox, ...]
    cc: tuple[Mailbox, ...]
    recipients: Recipients
    text: str | None
    html: str | None
    attachments: tuple[Attachment, ...]
    message_id: str | None
    in_reply_to: str | None
    references: str | None
    date: str | None
    #: Every header not mapped to a field and not MIME structure, in order, decoded
    #: (Date, Message-ID, In-Reply-To, References, X-*, List-*, Received, ...).
    headers: tuple[tuple[str, str], ...]
    warnings: tuple[str, ...] = field(default=())


def parse(raw: bytes, envelope: Envelope, *, exact: bool = False) -> ParsedMessage:
    """The parsed view of ``raw``; never raises on malformed input.

    ``exact=True`` takes the reference path (every header through ``policy.default``);
    the default path gives the same result for less CPU.
    """
    if not exact:
        try:
            simple = _parse_single_text(raw, envelope)
            if simple is not None:
                return simple
            return _parse(raw, envelope, fast=True)
        except Exception:  # the reference path decides, and reports
            pass
    return _parse(raw, envelope, fast=False)


def _parse(raw: bytes, envelope: Envelope, *, fast: bool) -> ParsedMessage:
    warnings: list[str] = []
    if fast:
        msg = _CHEAP_PARSER.parsebytes(raw)  # a failure here goes to the reference path
    else:
        try:
            msg = _PARSER.parsebytes(raw)
        except Exception as exc:  # the parser is lenient; this is a last resort
            warnings.append(
                f"message could not be parsed ({type(exc).__name__}); sent as plain text"
            )
            msg = EmailMessage()
            msg.set_content(raw.decode("utf-8", "replace"))

    # The top-level fields come from the one header reader (the parser reads the same
    # fields from a message the intake made unambiguous; tests/test_message_header.py).
    items = header_items(raw, read_header(raw))

    def walk() -> tuple[str | None, str | None, tuple[Attachment, ...]]:
        walker = _Walker(warnings, fast)
        walker.walk(msg, 0)
        return walker.text, walker.html, tuple(walker.attachments)

    return _assemble(items, _index(items), envelope, warnings, fast, walk)


def _assemble(
    items: Items,
    index: Index,
    envelope: Envelope,
    warnings: list[str],
    fast: bool,
    walk: Callable[[], tuple[str | None, str | None, tuple[Attachment, ...]]],
) -> ParsedMessage:
    """The parsed view from the top-level raw headers and ``walk()``, which reads the
    bodies (after the recipients, so that the warnings keep their order)."""
    subject = _single(index, "subject", warnings, fast)
    from_ = _from_address(index, envelope, warnings, fast)
    reply_to = _addresses(index, "reply-to", warnings, fast)
    to = _addresses(index, "to", warnings, fast)
    cc = _addresses(index, "cc", warnings, fast)
    recipients = reconcile(to, cc, envelope.rcpt_tos, warnings)

    text, html, attachments = walk()

    headers = _other_headers(items, warnings, fast)
    lookup = {name.lower(): value for name, value in reversed(headers)}
    return ParsedMessage(
        subject=subject,
        from_=from_,
        reply_to=reply_to,
        to=to,
        cc=cc,
        recipients=recipients,
        text=text,
        html=html,
        attachments=attachments,
        message_id=lookup.get("message-id"),
        in_reply_to=lookup.get("in-reply-to"),
        references=lookup.get("references"),
        date=lookup.get("date"),
        headers=headers,
        warnings=tuple(warnings),
    )


# --- one text part, without the parser -------------------------------------------

# What the cheap policy answers for a Content-Type of the plain form (see
# fastheaders._parameterized): the type, then "; name" or '; name="value"' each, with
# no quote, backslash or ";" in a value, so that email.message reads the parameters
# exactly as written.
_TOKEN = r"[!#$%&'*+.0-9A-Z^_`a-z{|}~-]+"
_PARAM_TEXT = r"; [!#$&+.0-9A-Z^_`a-z{|}~-]+(?:=\"[^\"\\;]*\")?"
_SIMPLE_CTYPE = re.compile(rf"[ \t]*({_TOKEN}/{_TOKEN})[ \t]*((?:{_PARAM_TEXT})*)")
_CTYPE_PARAM = re.compile(r'; ([^=;]+)(?:="([^"]*)")?')
_BODY_TYPES = frozenset({"text/plain", "text/html"})
_PLAIN_CTES = frozenset({"", "7bit", "8bit", "binary"})


def _parse_single_text(raw: bytes, envelope: Envelope) -> ParsedMessage | None:
    """``parse(raw, envelope)`` for the common message that is one text/plain or
    text/html body (no multipart, no attachment), without the feedparser; None when
    the message is anything else or has anything unusual (the parser decides then).

    The header fields are split as the feedparser splits them (the raw values that
    ``raw_items()`` gives), the body is the rest after the blank line, and every
    header the parser would consult is read through the same cheap policy.
    """
    header = read_header(raw)
    if not header.separator:
        return None  # no blank line after the headers, or a line that is not a field
    if raw.count(b"\r", 0, header.body) != raw.count(b"\r\n", 0, header.body):
        return None  # a lone CR ends a line for the parser
    items = header_items(raw, header)
    pos = header.body

    ctype = "text/plain"
    charset: str | None = None
    index = _index(items)
    if "content-disposition" in index:
        return None
    values = index.get("content-type")
    if values is not None:
        if len(values) > 1:
            return None
        match = _SIMPLE_CTYPE.fullmatch(
            fastheaders.cheap.header_fetch_parse("Content-Type", values[0])
        )
        if match is None:
            return None
        ctype = match[1].lower()
        for param in _CTYPE_PARAM.finditer(match[2]):
            name = param[1].lower()
            if name == "name":
                return None  # a filename: an attachment
            if name == "charset" and charset is None:
                charset = (param[2] or "").lower()
    if ctype not in _BODY_TYPES:
        return None
    data = raw[pos:]  # one character per byte: positions agree
    values = index.get("content-transfer-encoding")
    if values is not None:
        if len(values) > 1:
            return None
        cte = fastheaders.cheap.header_fetch_parse("Content-Transfer-Encoding", values[0]).lower()
        if cte not in _PLAIN_CTES:
            # quoted-printable, base64, ...: the part the parser would have made, as
            # far as decoding its payload goes, decoded by email.message itself.
            part = Message(policy=fastheaders.cheap)
            part.set_raw("Content-Transfer-Encoding", values[0])
            part.set_payload(raw[pos:].decode("ascii", "surrogateescape"))
            data = _payload(part)

    warnings: list[str] = []

    def body() -> tuple[str | None, str | None, tuple[Attachment, ...]]:
        decoded = _decode_text(data, charset, warnings)
        if ctype == "text/html":
            return None, decoded, ()
        return decoded, None, ()

    return _assemble(items, index, envelope, warnings, True, body)


# --- recipients -----------------------------------------------------------------


def address_key(addr: str) -> str:
    """Addresses compare exactly on the local part and case-insensitively on the domain."""
    local, at, domain = addr.rpartition("@")
    return f"{local}@{domain.lower()}" if at else addr


def reconcile(
    to: tuple[Mailbox, ...],
    cc: tuple[Mailbox, ...],
    rcpt_tos: tuple[str, ...],
    warnings: list[str],
) -> Recipients:
    """To/Cc as far as the envelope allows; every other envelope recipient as Bcc."""
    remaining: dict[str, str] = {}
    for rcpt in rcpt_tos:
        remaining.setdefault(address_key(rcpt), rcpt)
    seen: set[str] = set()
    outside = 0

    def take(box: Mailbox) -> Mailbox | None:
        nonlocal outside
        key = address_key(box.addr)
        if key in seen:
            return None  # the same address twice in the headers
        if key not in remaining:
            # An envelope that lower-cased the whole address still matches, if unambiguous.
            matches = [k for k in remaining if k.lower() == key.lower()]
            if len(matches) != 1:
                outside += 1
                return None
            key = matches[0]
        seen.add(key)
        return Mailbox(box.name, remaining.pop(key))

    sent_to = tuple(m for m in map(take, to) if m is not None)
    sent_cc = tuple(m for m in map(take, cc) if m is not None)
    bcc = tuple(Mailbox("", addr) for addr in remaining.values())
    if outside:
        warnings.append(
            f"{outside} To/Cc header address(es) are not envelope recipients:"
            " not sent and not shown (the envelope decides who receives)"
        )
    return Recipients(sent_to, sent_cc, bcc)


# --- headers --------------------------------------------------------------------


def clean(value: str) -> str:
    """One line: folds and CR/LF become a space, other control characters go."""
    return _CONTROL.sub("", _FOLD.sub(" ", value)).strip()


def _legacy_text(raw: str) -> str:
    """A raw value's 8-bit bytes (kept as surrogates) read as UTF-8, else as cp1252."""
    data = raw.encode("utf-8", "surrogateescape")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


def _decode_raw(name: str, raw: str, fast: bool = False) -> str:
    """A header's decoded value, tolerating legacy 8-bit (non-UTF-8) bytes."""
    value: str | None
    try:
        if fast:
            value = fastheaders.header_str(name, raw)
            if raw.isascii():  # no undecodable bytes (surrogates): no legacy repair
                return clean(value)
        else:
            value = str(email.policy.default.header_fetch_parse(name, raw))
    except Exception:
        value = None
    legacy_8bit = any("\udc80" <= c <= "\udcff" for c in raw)  # undecodable raw bytes
    if value is None or ("\ufffd" in value and legacy_8bit):
        text = _legacy_text(raw)
        if value is None and "=?" in text:
            with contextlib.suppress(Exception):
                text = str(make_header(decode_header(text)))
        value = text
    return clean(value)


def _index(items: Items) -> Index:
    """Raw values by lower-cased header name, in order."""
    index: Index = {}
    for name, value in items:
        index.setdefault(name.lower(), []).append(value)
    return index


def _single(index: Index, name: str, warnings: list[str], fast: bool) -> str | None:
    values = index.get(name)
    if not values:
        return None
    if len(values) > 1:
        warnings.append(f"{len(values)} {name.title()} headers; the first one is used")
    return _decode_raw(name, values[0], fast)


def _addresses(index: Index, name: str, warnings: list[str], fast: bool) -> tuple[Mailbox, ...]:
    boxes: list[Mailbox] = []
    for raw in index.get(name, ()):
        if not raw.isascii():
            raw = _legacy_text(raw)  # UTF-8 (or legacy 8-bit) names and addresses
        simple = fastheaders.simple_addresses(raw) if fast else None
        if simple is not None:
            pairs = simple
        else:
            try:
                if fast:
                    header = fastheaders.exact_header(name, raw)
                else:
                    header = email.policy.default.header_fetch_parse(name, raw)
                pairs = [(a.display_name, a.addr_spec) for a in header.addresses if a.username]
            except Exception:
                pairs = getaddresses([_decode_raw("x-address", raw, fast)])
        for display, addr in pairs:
            addr = clean(addr)
            if addr and addr != "<>":
                boxes.append(Mailbox(clean(display), addr))
    return tuple(boxes)


def header_index(raw: bytes) -> Index:
    """The raw values of the top-level fields by lower-cased name, as :func:`parse` reads them."""
    return _index(header_items(raw, read_header(raw)))


def mailboxes(index: Index, name: str) -> tuple[Mailbox, ...]:
    """The mailboxes of the ``name`` fields in ``index``, as :func:`parse` reads them."""
    return _addresses(index, name, [], True)


def _from_address(
    index: Index, envelope: Envelope, warnings: list[str], fast: bool
) -> Mailbox | None:
    boxes = [b for b in _addresses(index, "from", warnings, fast) if "@" in b.addr]
    if len(boxes) > 1:
        warnings.append(f"{len(boxes)} From addresses; only the first one is sent")
    if boxes:
        return boxes[0]
    if envelope.mail_from:
        warnings.append("no usable From header; the envelope sender is used as From")
        return Mailbox("", envelope.mail_from)
    return None


def _other_headers(items: Items, warnings: list[str], fast: bool) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    bad: list[str] = []
    for name, raw in items:
        lname = name.lower()
        if lname in MAPPED_HEADERS or lname in STRUCTURAL_HEADERS:
            continue
        if not _HEADER_NAME.match(name):
            bad.append("a header with an invalid name")
            continue
        value = _decode_raw(name, raw, fast)
        if not value:
            bad.append(f"empty {name}")
            continue
        out.append((name, value))
    if bad:
        warnings.append(f"headers dropped: {summarize(bad)}")
    return tuple(out)


# --- bodies and attachments -----------------------------------------------------


class _Walker:
    def __init__(self, warnings: list[str], fast: bool) -> None:
        self.warnings = warnings
        self.fast = fast
        self.text: str | None = None
        self.html: str | None = None
        self.attachments: list[Attachment] = []

    def walk(self, part: Message, depth: int) -> None:
        if depth > MAX_DEPTH:
            self.warnings.append(f"MIME nested deeper than {MAX_DEPTH} levels; the rest dropped")
            return
        maintype = part.get_content_maintype()
        if part.is_multipart():
            if maintype == "message":  # an attached message (rfc822, delivery-status...)
                self._attach(part, _message_bytes(part, self.warnings))
                return
            payload = part.get_payload()
            assert isinstance(payload, list)
            for sub in payload:
                if isinstance(sub, Message):
                    self.walk(sub, depth + 1)
            return
        if maintype == "multipart":
            self.warnings.append("multipart part without a usable boundary; sent as plain text")
            self._body("text/plain", _text(part, self.warnings))
            return
        ctype = part.get_content_type()
        disposition = _disposition(part)
        if (
            ctype in ("text/plain", "text/html")
            and disposition != "attachment"
            and not _filename(part)
        ):
            if (ctype == "text/plain" and self.text is None) or (
                ctype == "text/html" and self.html is None
            ):
                self._body(ctype, _text(part, self.warnings))
                return
            self.warnings.append(f"a second {ctype} body is sent as an attachment")
        self._attach(part, _payload(part))

    def _body(self, ctype: str, text: str) -> None:
        if ctype == "text/html":
            self.html = text
        else:
            self.text = text

    def _attach(self, part: Message, content: bytes) -> None:
        cid = _content_id(part, self.fast)
        disposition = _disposition(part)
        inline = disposition == "inline" or (disposition is None and cid is not None)
        self.attachments.append(
            Attachment(
                content=content,
                content_type=part.get_content_type(),
                filename=_filename(part),
                content_id=cid,
                inline=inline,
            )
        )


def _disposition(part: Message) -> str | None:
    try:
        return part.get_content_disposition()
    except Exception:
        return None


def _filename(part: Message) -> str | None:
    try:
        name = part.get_filename()
    except Exception:
        name = None
    if not name:
        return None
    if "=?" in name:  # RFC 2047 inside a parameter: wrong, but common
        with contextlib.suppress(Exception):
            name = str(make_header(decode_header(name)))
    return clean(name) or None


def _content_id(part: Message, fast: bool) -> str | None:
    values = [v for k, v in part.raw_items() if k.lower() == "content-id"]
    if not values:
        return None
    cid = _decode_raw("content-id", values[0], fast).strip().strip("<>").strip()
    return cid or None


def _payload(part: Message) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    if isinstance(data, bytes):
        return data
    payload = part.get_payload()
    if isinstance(payload, str):
        return payload.encode("utf-8", "surrogateescape")
    return b""


def _message_bytes(part: Message, warnings: list[str]) -> bytes:
    """The body of a message/* part (an attached message), serialised."""
    try:
        data = part.as_bytes(policy=email.policy.default.clone(linesep="\r\n"))
    except Exception:
        warnings.append("an attached message could not be re-serialised; sent empty")
        return b""
    _head, sep, body = data.partition(b"\r\n\r\n")
    return body if sep else b""


def _text(part: Message, warnings: list[str]) -> str:
    data = _payload(part)
    charset = None
    with contextlib.suppress(Exception):
        charset = part.get_content_charset()
    return _decode_text(data, charset, warnings)


def _decode_text(data: bytes, charset: str | None, warnings: list[str]) -> str:
    """A text part's bytes as text, by its declared (lower-cased) charset if any."""
    if charset:
        try:
            return data.decode(charset)
        except LookupError:
            warnings.append(f"unknown charset {clean(charset)[:40]!r} in a text part")
            charset = None
        except UnicodeDecodeError:
            pass
    try:
        text = data.decode("utf-8")
        if charset:
            warnings.append(f"a text part declared {charset} is UTF-8; decoded as UTF-8")
        return text
    except UnicodeDecodeError:
        pass
    if charset:
        warnings.append(f"a text part is not valid {charset}; bad bytes replaced")
        return data.decode(charset, "replace")
    warnings.append("a text part with 8-bit bytes and no charset decoded as windows-1252")
    return data.decode("cp1252", "replace")


def fallback_filename(attachment: Attachment, index: int) -> str:
    """A filename for a part that has none (``attachment-3.pdf``)."""
    if attachment.content_type == "message/rfc822":
        ext = ".eml"
    else:
        ext = mimetypes.guess_extension(attachment.content_type, strict=False) or ".dat"
    if ext in (".bin", ".exe", ".bat", ".com"):
        ext = ".dat"  # never invent a name that an ESP's executable filter refuses
    return f"attachment-{index}{ext}"


def summarize(names: list[str]) -> str:
    """``Received x3, DKIM-Signature`` for a list of header names."""
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(n if c == 1 else f"{n} x{c}" for n, c in counts.items())
