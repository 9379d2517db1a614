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

import codecs
import contextlib
import email.policy
import importlib
import io
import mimetypes
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.errors import MessageDefect
from email.generator import BytesGenerator
from email.header import decode_header
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import collapse_rfc2231_value, getaddresses
from typing import cast

from esprelay.message import fastheaders
from esprelay.message.header import items as header_items
from esprelay.message.header import raw_value, read_header
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
#: Names the message's charset when asked (see :class:`_Legacy`).
Hint = Callable[[], str | None] | None
_CHEAP_PARSER = BytesParser(policy=fastheaders.cheap)
_AS_RECEIVED = email.policy.compat32.clone(linesep="\r\n", max_line_length=0)


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
    #: Content-Type parameters but name and boundary, in order: ``(("method", "REQUEST"),)``.
    params: tuple[tuple[str, str], ...] = ()


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
        # A failure here goes to the reference path.
        shrunk = _without_long_runs(raw)
        if shrunk is None:
            msg = _CHEAP_PARSER.parsebytes(raw)
        else:
            msg = _CHEAP_PARSER.parsebytes(shrunk[0])
            _restore_runs(msg, shrunk[1])
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

    index = _index(items)

    def walk(legacy: _Legacy) -> tuple[str | None, str | None, tuple[Attachment, ...]]:
        walker = _Walker(warnings, fast, legacy)
        walker.walk(msg, 0)
        return walker.text, walker.html, tuple(walker.attachments)

    return _assemble(
        items, index, envelope, warnings, fast, walk, lambda: _message_charset(msg, index)
    )


def _assemble(
    items: Items,
    index: Index,
    envelope: Envelope,
    warnings: list[str],
    fast: bool,
    walk: Callable[[_Legacy], tuple[str | None, str | None, tuple[Attachment, ...]]],
    charset: Callable[[], str | None],
) -> ParsedMessage:
    """The parsed view from the top-level raw headers and ``walk()``, which reads the
    bodies (after the recipients, so that the warnings keep their order).  ``charset()``
    names the message's charset, for text that has none of its own (:class:`_Legacy`)."""
    legacy = _Legacy(warnings, charset)
    subject = _single(index, "subject", warnings, fast, legacy)
    from_ = _from_address(index, envelope, warnings, fast, legacy)
    reply_to = _addresses(index, "reply-to", warnings, fast, legacy)
    to = _addresses(index, "to", warnings, fast, legacy)
    cc = _addresses(index, "cc", warnings, fast, legacy)
    recipients = reconcile(to, cc, envelope.rcpt_tos, warnings)

    text, html, attachments = walk(legacy)

    headers = _other_headers(items, warnings, fast, legacy)
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


# --- long runs of base64 lines, without the parser's line-by-line reading -----------

#: A run of lines written in the base64 alphabet (an attachment's body, as mailers
#: write it), after the line ending before it.  Possessive: a run is matched once,
#: whole, and the search goes on after it (linear in the message).  The definition:
#: :func:`_runs` finds the same runs, faster.
_RUN = re.compile(rb"\n((?:[A-Za-z0-9+/=]{40,}+\r\n)++)")
#: Runs of fewer lines stay for the parser.
RUN_LINES = 256


def _without_long_runs(raw: bytes) -> tuple[bytes, dict[str, str]] | None:
    """``raw`` with each run of ``RUN_LINES`` or more base64-alphabet lines replaced by
    one line that stands for it, and what each such line stands for; None without one.

    The feedparser reads a message line by line (~1.5 us a line: ~100 ms for a 5 MB
    attachment).  It treats every line of such a run alike, and alike the line that
    replaces it: not empty, no colon, no leading white space, no leading ``--`` (so no
    header, continuation, boundary or blank line); it only collects them into a body,
    a preamble or an epilogue, where :func:`_restore_runs` puts the run back.
    """
    if len(raw) < RUN_LINES * 42:
        return None
    runs = list(_runs(raw, RUN_LINES))
    if not runs:
        return None
    stand_in = "Esprelay" + secrets.token_hex(12)
    if stand_in.encode() in raw:  # pragma: no cover - 96 random bits
        return None
    pieces: list[bytes | memoryview] = []
    originals: dict[str, str] = {}
    view = memoryview(raw)
    position = 0
    for index, (start, end) in enumerate(runs):
        name = f"{stand_in}{index:08d}"
        # The run's last line ending stays: the parser may take the one before a
        # boundary off the body, as it would have taken the run's.
        originals[name] = str(view[start : end - 2], "ascii")
        pieces += [view[position:start], name.encode()]
        position = end - 2
    pieces.append(view[position:])
    return b"".join(pieces), originals


def _runs(raw: bytes, min_lines: int) -> Iterator[tuple[int, int]]:
    """The runs that ``_RUN.finditer(raw)`` finds (group 1's spans) of ``min_lines``
    lines or more, found faster.

    The regular expression engine reads a run line by line (~8 ms for a 5 MB
    attachment).  Mailers write an attachment in lines of one length, so from a run's
    first line on, the lines of that length are checked a block at a time
    (:func:`_fixed_length_lines`: every line ending where that length puts one, and
    nothing but the base64 alphabet and those line endings in the block, a
    ``translate``).  The lines after the blocks, and a block that fails the check, are
    read by the expression.  Each line of a run stands on its own (``_RUN``), so the
    spans are the expression's (``tests/test_large_message_paths.py`` compares them).
    A run is where its first line is: where at least four lines follow (``_RUN_START``),
    none of a run of fewer is visited here."""
    starts = _RUN_START if min_lines >= _RUN_START_LINES else _ANY_RUN_START
    position = 0
    while (found := starts.search(raw, position)) is not None:
        start = found.end()
        lines, end = _fixed_length_lines(raw, start)
        tail = _RUN_LINES.match(raw, end)
        assert tail is not None  # (it matches the empty string)
        position = tail.end()
        if lines + raw.count(b"\n", end, position) >= min_lines:
            yield start, position


_RUN_LINE = rb"[A-Za-z0-9+/=]{40,}+\r\n"
#: Where a run of at least ``_RUN_START_LINES`` lines starts: after a line ending (no
#: earlier line ending is followed by so many of a run's lines, or the run would start
#: there), and where a run of any length starts.
_RUN_START_LINES = 4
_RUN_START = re.compile(rb"\n(?=(?:" + _RUN_LINE + rb"){%d})" % _RUN_START_LINES)
_ANY_RUN_START = re.compile(rb"\n(?=" + _RUN_LINE + rb")")
#: The lines of a run (none or more), as ``_RUN`` reads them.
_RUN_LINES = re.compile(rb"(?:" + _RUN_LINE + rb")*+")
_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="


def _fixed_length_lines(raw: bytes, start: int) -> tuple[int, int]:
    """How many lines from ``start`` on are of the first line's length, each of
    base64-alphabet characters ended by CRLF (as many as are checked: see below), and
    where they end.

    The lines are checked in blocks of 4, 8, 16... lines, each block whole: its CRs and
    LFs where the length puts them, and nothing else in it but the alphabet.  The first
    block that is not all such lines ends the count, and the expression reads that
    block's lines.  So a run costs no more than twice its length, and a line that is not
    a run's never has the rest of the message read for it (every line a run of its own,
    or a bad line in every tenth, must not make the search quadratic)."""
    width = raw.find(b"\r\n", start) - start + 2  # the first line's, with its CRLF
    last = width - 2
    if raw[start + width + last : start + 2 * width] != b"\r\n":
        return 0, start  # the next line is not as long: nothing for a block to save
    end = start
    counted = 0
    block_lines = 4
    while True:
        stop = end + block_lines * width
        crs = raw[end + last : stop : width]  # where each line's CR must be
        lfs = raw[end + last + 1 : stop : width]
        lines = min(len(crs) - len(crs.lstrip(b"\r")), len(lfs) - len(lfs.lstrip(b"\n")))
        block = raw[end : end + lines * width]
        # Nothing but the alphabet and the CRLF expected at the end of each line.
        if block.translate(None, _BASE64_ALPHABET) != b"\r\n" * lines:
            return counted, end
        counted += lines
        end += len(block)
        if lines < block_lines:
            return counted, end
        block_lines *= 2


def _restore_runs(msg: Message, originals: dict[str, str]) -> None:
    """Put the runs back where the parser collected the lines that stood for them."""
    for part in msg.walk():
        # The field as parsed (get_payload() would convert it); set_payload() sets it back.
        payload = getattr(part, "_payload", None)
        if isinstance(payload, str) and "Esprelay" in payload:
            part.set_payload(_restored(payload, originals))
        for name in ("preamble", "epilogue"):
            text = getattr(part, name, None)
            if isinstance(text, str) and "Esprelay" in text:
                setattr(part, name, _restored(text, originals))


def _restored(text: str, originals: dict[str, str]) -> str:
    for name, original in originals.items():
        if name in text:
            text = text.replace(name, original)
    return text


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
    data: bytes | None = None
    ascii_text: str | None = None
    values = index.get("content-transfer-encoding")
    cte = ""
    if values is not None:
        if len(values) > 1:
            return None
        cte = fastheaders.cheap.header_fetch_parse("Content-Transfer-Encoding", values[0]).lower()
    if cte not in _PLAIN_CTES:
        # quoted-printable, base64, ...: the part the parser would have made, as
        # far as decoding its payload goes, decoded by email.message itself.
        assert values is not None
        part = Message(policy=fastheaders.cheap)
        part.set_raw("Content-Transfer-Encoding", values[0])
        part.set_payload(raw[pos:].decode("ascii", "surrogateescape"))
        data = _payload(part)
    elif _ascii_body(raw, pos, charset):
        # What _decode_text gives for ASCII bytes in an ASCII-safe charset, read from
        # the message itself: no copy of the body as bytes before the text.
        ascii_text = str(memoryview(raw)[pos:], "ascii")
    else:
        data = raw[pos:]  # one character per byte: positions agree

    warnings: list[str] = []

    def body(legacy: _Legacy) -> tuple[str | None, str | None, tuple[Attachment, ...]]:
        if ascii_text is not None:
            decoded = ascii_text
        else:
            assert data is not None
            decoded = _decode_text(data, charset, warnings, legacy.charset)
        if ctype == "text/html":
            return None, decoded, ()
        return decoded, None, ()

    def message_charset() -> str | None:
        return charset if _legacy_charset(charset) else _words_charset(index)

    return _assemble(items, index, envelope, warnings, True, body, message_charset)


def _ascii_body(raw: bytes, pos: int, charset: str | None) -> bool:
    """``raw[pos:]`` is ASCII without an escape in a charset that reads ASCII as ASCII
    (so that :func:`_decode_text` would decode it as ASCII, with no warning)."""
    codec = codec_name(charset)
    return (codec is None or codec in _ASCII_SAFE) and raw.isascii() and raw.find(b"\x1b", pos) < 0


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


_WORD_CHARSET = re.compile(r"=\?([^?*]+)(?:\*[^?]*)?\?[bBqQ]\?")
_CHARSET_HEADERS = ("subject", "from", "to", "cc", "reply-to")


def _legacy_charset(charset: str | None) -> bool:
    """A charset that is neither ASCII nor UTF-8 (one worth guessing with)."""
    return codec_name(charset) not in (None, "ascii", "utf-8")


def _words_charset(index: Index) -> str | None:
    """The first legacy charset named by an encoded word in the main header fields."""
    for name in _CHARSET_HEADERS:
        for raw in index.get(name, ()):
            for match in _WORD_CHARSET.finditer(raw):
                if _legacy_charset(match[1]):
                    return match[1].lower()
    return None


def _message_charset(msg: Message, index: Index) -> str | None:
    """The message's charset, for text without a usable one of its own: the first
    legacy charset a text part declares, else one its header's encoded words use."""
    with contextlib.suppress(Exception):
        for part in msg.walk():
            if part.get_content_maintype() == "text":
                charset = part.get_content_charset()
                if _legacy_charset(charset):
                    return charset
    return _words_charset(index)


class _Legacy:
    """Where header decoding records its guesses, and the charset it guesses with: the
    message's own (:func:`_message_charset`), asked for only when a header needs it."""

    __slots__ = ("_charset", "_hint", "warnings")

    def __init__(self, warnings: list[str], hint: Callable[[], str | None] | None = None) -> None:
        self.warnings = warnings
        self._hint = hint
        self._charset: str | None = None

    def charset(self) -> str | None:
        if self._hint is not None:
            self._charset, self._hint = self._hint(), None
        return self._charset


def _legacy_bytes(data: bytes, legacy: _Legacy, what: str) -> str:
    """Header bytes that are not all ASCII: UTF-8 (RFC 6532) if they are, else the
    message's charset, else windows-1252; a guess is recorded."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    charset = legacy.charset()
    codec = codec_name(charset)
    if codec not in (None, "utf-8", "ascii"):
        with contextlib.suppress(UnicodeDecodeError):
            text = data.decode(codec)
            legacy.warnings.append(
                f"{what} has 8-bit bytes that are not UTF-8; read as {charset},"
                " the charset of the message's text"
            )
            return text
    legacy.warnings.append(f"{what} has 8-bit bytes that are not UTF-8; read as windows-1252")
    return data.decode("cp1252", "replace")


def _jis(raw: str, legacy: _Legacy, what: str) -> str:
    """Raw ISO-2022-JP (escape sequences, common in old Japanese mail headers) decoded."""
    if "\x1b" not in raw or not raw.isascii():
        return raw
    for codec in ("iso2022_jp", "iso2022_jp_2", "iso2022_jp_ext", "iso2022_jp_3"):
        with contextlib.suppress(UnicodeDecodeError):
            text = raw.encode("ascii").decode(codec)
            legacy.warnings.append(f"{what} has raw ISO-2022-JP text; decoded as {codec}")
            return text
    return raw


def _legacy_text(raw: str, legacy: _Legacy, what: str) -> str:
    """A raw value's 8-bit bytes (kept as surrogates) decoded (:func:`_legacy_bytes`)."""
    if raw.isascii():
        return _jis(raw, legacy, what)
    return _legacy_bytes(raw.encode("utf-8", "surrogateescape"), legacy, what)


def _redecode_words(text: str, legacy: _Legacy, what: str, *, phrase: bool = False) -> str | None:
    """``text`` with its encoded words decoded by :func:`_decode_text` (a label's larger
    table, UTF-8 under a wrong label...), for a value whose standard decoding left
    replacement characters or C1 controls; None if it has no encoded word.  With
    ``phrase`` each decoded word is quoted, so that it stays one display name."""
    try:
        chunks = decode_header(text)
    except Exception:
        return None
    if not any(charset for _, charset in chunks):
        return None
    out: list[str] = []
    notes: list[str] = []
    for data, charset in chunks:
        if isinstance(data, str):
            out.append(data)
            continue
        if charset is None or charset == "unknown-8bit":
            out.append(data.decode("ascii", "replace"))
            continue
        word = _decode_text(data, charset, notes, what=f"an encoded word in {what}")
        if phrase:
            word = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(word)
    legacy.warnings.extend(dict.fromkeys(notes))
    return "".join(out)


def _decode_raw(name: str, raw: str, fast: bool = False, legacy: _Legacy | None = None) -> str:
    """A header's decoded value, tolerating legacy 8-bit (non-UTF-8) bytes, raw
    ISO-2022-JP and encoded words in a charset other than the one they name."""
    value: str | None
    try:
        if fast:
            value = fastheaders.header_str(name, raw)
            if raw.isascii() and "\x1b" not in raw and ("=?" not in raw or _sound(value)):
                return clean(value)  # nothing undecodable: no repair
        else:
            value = str(email.policy.default.header_fetch_parse(name, raw))
    except Exception:
        value = None
    if legacy is None:
        legacy = _Legacy([])
    legacy_8bit = any("\udc80" <= c <= "\udcff" for c in raw)  # undecodable raw bytes
    if value is None or "\x1b" in raw or ("\ufffd" in value and legacy_8bit):
        what = name.title()
        text = _legacy_text(raw, legacy, what)
        if "=?" in text:
            text = _redecode_words(_FOLD.sub(" ", text), legacy, what) or text
        value = text
    elif "=?" in raw and not _sound(value):
        value = _redecode_words(_FOLD.sub(" ", raw), legacy, name.title()) or value
    return clean(value)


def _sound(value: str) -> bool:
    """No sign of a charset misread in a decoded value."""
    return _MISREAD.search(value) is None


def _index(items: Items) -> Index:
    """Raw values by lower-cased header name, in order."""
    index: Index = {}
    for name, value in items:
        index.setdefault(name.lower(), []).append(value)
    return index


def _single(
    index: Index, name: str, warnings: list[str], fast: bool, legacy: _Legacy | None = None
) -> str | None:
    values = index.get(name)
    if not values:
        return None
    if len(values) > 1:
        warnings.append(f"{len(values)} {name.title()} headers; the first one is used")
    return _decode_raw(name, values[0], fast, legacy)


def _addresses(
    index: Index, name: str, warnings: list[str], fast: bool, legacy: _Legacy | None = None
) -> tuple[Mailbox, ...]:
    """The mailboxes of the ``name`` fields.  Which addresses there are never depends
    on a guessed charset (the sender rules read From with :func:`mailboxes`, without
    one): 8-bit bytes that are not UTF-8 are parsed one character per byte, and only
    the display names are then decoded with the message's charset."""
    if legacy is None:
        legacy = _Legacy(warnings)
    what = name.title() if name != "reply-to" else "Reply-To"
    boxes: list[Mailbox] = []
    for raw in index.get(name, ()):
        legacy_names = False
        if not raw.isascii():
            data = raw.encode("utf-8", "surrogateescape")
            try:
                raw = data.decode("utf-8")  # UTF-8 names and addresses (RFC 6532)
            except UnicodeDecodeError:
                raw = data.decode("latin-1")  # reversible: names are decoded below
                legacy_names = True
        elif "\x1b" in raw:
            raw = _jis(raw, legacy, what)
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
            if "=?" in raw and not all(_sound(display) for display, _ in pairs):
                pairs = _redecoded_addresses(raw, legacy, what) or pairs
        for display, addr in pairs:
            addr = clean(addr)
            if addr and addr != "<>":
                if legacy_names and not display.isascii():
                    display = _legacy_bytes(display.encode("latin-1"), legacy, f"a {what} name")
                boxes.append(Mailbox(clean(display), addr))
    return tuple(boxes)


def _redecoded_addresses(raw: str, legacy: _Legacy, what: str) -> list[tuple[str, str]] | None:
    """The mailboxes of an address field whose encoded words name the wrong charset."""
    notes = _Legacy([])
    text = _redecode_words(_FOLD.sub(" ", raw), notes, what, phrase=True)
    if text is None:
        return None
    try:
        header = email.policy.default.header_fetch_parse("to", text)
        pairs = [(a.display_name, a.addr_spec) for a in header.addresses if a.username]
    except Exception:
        return None
    legacy.warnings.extend(notes.warnings)
    return pairs


def header_index(raw: bytes) -> Index:
    """The raw values of the top-level fields by lower-cased name, as :func:`parse` reads them."""
    return _index(header_items(raw, read_header(raw)))


def mailboxes(index: Index, name: str) -> tuple[Mailbox, ...]:
    """The mailboxes of the ``name`` fields in ``index``, as :func:`parse` reads them."""
    return _addresses(index, name, [], True)


def _from_address(
    index: Index, envelope: Envelope, warnings: list[str], fast: bool, legacy: _Legacy | None = None
) -> Mailbox | None:
    boxes = [b for b in _addresses(index, "from", warnings, fast, legacy) if "@" in b.addr]
    if len(boxes) > 1:
        warnings.append(f"{len(boxes)} From addresses; only the first one is sent")
    if boxes:
        return boxes[0]
    if envelope.mail_from:
        warnings.append("no usable From header; the envelope sender is used as From")
        return Mailbox("", envelope.mail_from)
    return None


def _other_headers(
    items: Items, warnings: list[str], fast: bool, legacy: _Legacy | None = None
) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    bad: list[str] = []
    for name, raw in items:
        lname = name.lower()
        if lname in MAPPED_HEADERS or lname in STRUCTURAL_HEADERS:
            continue
        if not _HEADER_NAME.match(name):
            bad.append("a header with an invalid name")
            continue
        value = _decode_raw(name, raw, fast, legacy)
        if not value:
            bad.append(f"empty {name}")
            continue
        out.append((name, value))
    if bad:
        warnings.append(f"headers dropped: {summarize(bad)}")
    return tuple(out)


# --- bodies and attachments -----------------------------------------------------


class _Walker:
    def __init__(self, warnings: list[str], fast: bool, legacy: _Legacy | None = None) -> None:
        self.warnings = warnings
        self.fast = fast
        self.legacy = legacy if legacy is not None else _Legacy(warnings)
        self.text: str | None = None
        self.html: str | None = None
        self.attachments: list[Attachment] = []
        self.secured = False

    def walk(self, part: Message, depth: int) -> None:
        if depth > MAX_DEPTH:
            self.warnings.append(f"MIME nested deeper than {MAX_DEPTH} levels; the rest dropped")
            return
        maintype = part.get_content_maintype()
        reason = secured_reason(part, depth)
        if reason is not None and not self.secured:
            self.secured = True
            self.warnings.append(_secured_warning(reason))
        if part.is_multipart():
            if maintype == "message":  # an attached message (rfc822, delivery-status...)
                self._attach(part, _message_bytes(part, self.warnings))
                return
            payload = part.get_payload()
            assert isinstance(payload, list)
            if reason is not None and part.get_content_subtype() == "signed":
                payload = payload[:1]  # the signature cannot verify any more: not sent
            for sub in payload:
                if isinstance(sub, Message):
                    self.walk(sub, depth + 1)
            return
        if maintype == "multipart":
            self.warnings.append("multipart part without a usable boundary; sent as plain text")
            self._body("text/plain", _text(part, self.warnings, self.legacy.charset))
            return
        ctype = part.get_content_type()
        disposition = _disposition(part)
        if (
            ctype in ("text/plain", "text/html")
            and disposition != "attachment"
            and not _filename(part, self.legacy)
        ):
            if (ctype == "text/plain" and self.text is None) or (
                ctype == "text/html" and self.html is None
            ):
                self._body(ctype, _text(part, self.warnings, self.legacy.charset))
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
                filename=_filename(part, self.legacy),
                content_id=cid,
                inline=inline,
                params=_params(part),
            )
        )


def _disposition(part: Message) -> str | None:
    try:
        return part.get_content_disposition()
    except Exception:
        return None


def _filename(part: Message, legacy: _Legacy) -> str | None:
    """The part's filename: RFC 2231 (continuations, charset, language) as the email
    package reads it, RFC 2047 words (wrong in a parameter, but common) and raw 8-bit
    bytes decoded like header text."""
    try:
        name = part.get_filename()
    except Exception:
        name = None
    if not name:
        return None
    if not _sound(name):
        name = _legacy_filename(part, legacy) or name
    if "=?" in name:
        name = _redecode_words(name, legacy, "a filename") or name
    return clean(name) or None


def _legacy_filename(part: Message, legacy: _Legacy) -> str | None:
    """A filename the standard reading garbled: raw 8-bit bytes (decoded like 8-bit
    header text) or encoded words naming the wrong charset (:func:`_redecode_words`)."""
    for header, param in (("content-disposition", "filename"), ("content-type", "name")):
        for key, raw in part.raw_items():
            if key.lower() != header:
                continue
            if not raw.isascii():
                text = _legacy_text(_FOLD.sub(" ", raw), legacy, "a filename")
                with contextlib.suppress(Exception):
                    value = email.policy.default.header_fetch_parse(header, text).params.get(param)
                    if value:
                        return str(value)
            elif "=?" in raw:
                # The parameter as written (compat32 leaves encoded words alone).
                written = Message()
                written[header] = _FOLD.sub(" ", raw)
                value = collapse_rfc2231_value(written.get_param(param, header=header) or "")
                if "=?" in value:
                    return _redecode_words(value, legacy, "a filename")
    return None


#: Content-Type parameters that are not the part's own: its name travels as the
#: filename, a boundary is MIME structure the ESP writes itself.
_NOT_PARAMS = frozenset({"name", "boundary"})


def _params(part: Message) -> tuple[tuple[str, str], ...]:
    """The Content-Type parameters of a part (charset, method, ...), but name and boundary."""
    out: list[tuple[str, str]] = []
    with contextlib.suppress(Exception):
        for key, value in (part.get_params(header="content-type") or [])[1:]:
            key = key.strip().lower()
            text = clean(collapse_rfc2231_value(value))
            if key and key not in _NOT_PARAMS and text and text.isascii():
                out.append((key, text))
    return tuple(out)


_PARAM_TOKEN = re.compile(r"[!#$%&'*+.0-9A-Z^_`a-z{|}~-]+")


def full_content_type(attachment: Attachment, keep: Callable[[str], bool] | None = None) -> str:
    """``type/subtype; name=value...`` with the attachment's parameters (those ``keep``
    accepts), each value a token or a quoted string (RFC 2045)."""
    out = [attachment.content_type]
    for key, value in attachment.params:
        if keep is not None and not keep(key):
            continue
        if not _PARAM_TOKEN.fullmatch(value):
            value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(f"{key}={value}")
    return "; ".join(out)


def attachment_text(attachment: Attachment, warnings: list[str]) -> str:
    """A text attachment's content as text, by its charset parameter."""
    charset = dict(attachment.params).get("charset")
    return _decode_text(attachment.content, charset, warnings, what=attachment.content_type)


# --- signed and encrypted messages -------------------------------------------------

#: Content types of which one must appear (in any case) for a message to be signed or
#: encrypted; looking for them in the lower-cased bytes costs about 2.5 ms per MB.
_SECURED_TYPES = (b"multipart/signed", b"multipart/encrypted", b"pkcs7-mime")


def secured_reason(part: Message, depth: int = 0) -> str | None:
    """What makes ``part`` signed or encrypted MIME (RFC 1847, S/MIME, PGP/MIME), or
    None.  An ``application/pkcs7-mime`` part counts only as the message itself
    (deeper, it is an attached file)."""
    ctype = part.get_content_type()
    if ctype in ("multipart/signed", "multipart/encrypted"):
        protocol = str(part.get_param("protocol") or "").lower()
        if "pkcs7" in protocol:
            kind = "S/MIME"
        elif "pgp" in protocol:
            kind = "PGP/MIME"
        else:
            kind = "MIME"
        what = "signed" if ctype == "multipart/signed" else "encrypted"
        return f"{kind}-{what} ({ctype}; protocol={clean(protocol)[:60] or 'none'})"
    if depth == 0 and ctype in ("application/pkcs7-mime", "application/x-pkcs7-mime"):
        smime = str(part.get_param("smime-type") or "").lower()
        what = {"signed-data": "signed", "enveloped-data": "encrypted"}.get(
            smime, "signed or encrypted"
        )
        return f"S/MIME-{what} ({ctype}; smime-type={clean(smime)[:40] or 'none'})"
    return None


def _secured_warning(reason: str) -> str:
    if "-signed (multipart/signed" in reason:
        outcome = "the content is sent unsigned and the signature part is not sent"
    else:
        outcome = "its parts are sent as attachments and no client will read them as such"
    return (
        f"the message is {reason}: rebuilding it for a JSON API breaks that, so {outcome}"
        " (ESPRELAY_SIGNED_MESSAGES=warn; a raw-MIME provider keeps it intact)"
    )


def signed_reason(raw: bytes) -> str | None:
    """Why ``raw`` cannot go through a JSON API unharmed (it is signed or encrypted
    MIME: ``"S/MIME-signed (multipart/signed; protocol=application/pkcs7-signature)"``),
    or None.  Pure.  Such a content type is looked for where clients put it: the
    message's own header and the header of its first part (a mailing list's footer
    wraps a signed message in a multipart/mixed, the signed part first); only then is
    the message parsed.  So a plain message costs two header reads, not a pass over its
    body (this runs at the end of DATA).  An attached message (``message/rfc822``) that is signed is
    kept whole and does not count."""
    if not _secured_hint(raw):
        return None
    try:
        msg = _CHEAP_PARSER.parsebytes(raw)
    except Exception:
        return None
    return _find_secured(msg, 0)


_SECURED = re.compile(rb"(?i)multipart/(?:signed|encrypted)|pkcs7-mime")
_PART_HEADER_LIMIT = 64 * 1024
#: How far past its header :func:`may_be_signed` may read a message.
SIGNED_HINT_READS = 2 * _PART_HEADER_LIMIT + 1024


def may_be_signed(raw: bytes) -> bool:
    """Whether :func:`signed_reason` could find ``raw`` signed or encrypted: False is
    sure, from reading its header and the first part's (at most
    :data:`SIGNED_HINT_READS` bytes past the header), so ``raw`` may be a message's
    first bytes only."""
    return _secured_hint(raw)


def _secured_hint(raw: bytes) -> bool:
    """A secured content type in the message's header or its first part's."""
    # The common message says neither word in its header (up to the first empty line,
    # which the intake has made the header's end): that answer costs no header read.
    end = raw.find(b"\r\n\r\n", 0, _PART_HEADER_LIMIT)
    head = raw[: _PART_HEADER_LIMIT if end < 0 else end].lower()
    if b"multipart" not in head and b"pkcs7" not in head:
        return False
    header = read_header(raw)
    if _SECURED.search(raw, 0, header.end):
        return True
    field = header.first(b"content-type")
    if field is None or b"multipart" not in raw[field.start : field.end].lower():
        return False  # one part: its own header was the one to look at
    holder = Message(policy=fastheaders.cheap)
    holder.set_raw("Content-Type", raw_value(raw, field))
    boundary = holder.get_boundary() if holder.get_content_maintype() == "multipart" else None
    if not boundary:
        return False
    marker = b"\n--" + boundary.encode("ascii", "surrogateescape")
    pos = header.body - 1  # the line ending before a delimiter right after the header
    found = raw.find(marker, pos, pos + _PART_HEADER_LIMIT)  # after a short preamble
    if found < 0:
        return False
    line_end = raw.find(b"\n", found + len(marker))
    if line_end < 0:
        return False
    part = raw[line_end + 1 : line_end + 1 + _PART_HEADER_LIMIT]
    return _SECURED.search(part, 0, read_header(part).end) is not None


def _find_secured(part: Message, depth: int) -> str | None:
    reason = secured_reason(part, depth)
    if reason is not None or depth >= MAX_DEPTH:
        return reason
    if part.get_content_maintype() == "multipart" and part.is_multipart():
        for sub in part.get_payload():
            if isinstance(sub, Message):
                reason = _find_secured(sub, depth + 1)
                if reason is not None:
                    return reason
    return None


def _content_id(part: Message, fast: bool) -> str | None:
    values = [v for k, v in part.raw_items() if k.lower() == "content-id"]
    if not values:
        return None
    cid = _decode_raw("content-id", values[0], fast).strip().strip("<>").strip()
    return cid or None


def _payload(part: Message) -> bytes:
    data: object
    try:
        encoded = getattr(part, "_payload", None)  # (what get_payload() starts from)
        if isinstance(encoded, str) and _transfer_encoding(part) == "base64":
            data = _base64_payload(part, encoded)
        else:
            data = part.get_payload(decode=True)
    except Exception:
        data = None
    if isinstance(data, bytes):
        return data
    payload = part.get_payload()
    if isinstance(payload, str):
        return payload.encode("utf-8", "surrogateescape")
    return b""


# The base64 decoding that Message.get_payload(decode=True) uses (email._encoded_words
# has no type stubs): lenient about padding and stray characters, with defects.
_decode_b = cast(
    Callable[[bytes], tuple[bytes, list[MessageDefect]]],
    importlib.import_module("email._encoded_words").decode_b,
)


def _transfer_encoding(part: Message) -> str:
    """The Content-Transfer-Encoding as ``get_payload()`` compares it."""
    return str(part.get("content-transfer-encoding", "")).lower()


def _base64_payload(part: Message, encoded: str) -> bytes:
    """``part.get_payload(decode=True)`` for a base64 part whose payload is ``encoded``:
    the same bytes and the same defects (``tests/test_mime_base64.py`` compares them).

    get_payload() takes out the line breaks by splitting the payload into its lines and
    joining them again (~69,000 bytes objects for a 5 MB attachment, 8 ms); one
    ``translate`` deletes the same CR and LF bytes (``bytes.splitlines`` breaks at
    nothing else) in 3 ms.
    """
    if encoded.isascii():
        data = encoded.encode("ascii")
    elif _has_surrogates(encoded):
        data = encoded.encode("ascii", "surrogateescape")  # raises as get_payload() does
    else:
        data = encoded.encode("raw-unicode-escape")
    value, defects = _decode_b(data.translate(None, b"\r\n"))
    for defect in defects:
        part.policy.handle_defect(part, defect)
    return value


def _has_surrogates(text: str) -> bool:
    """Bytes the parser kept as surrogates (email.utils._has_surrogates)."""
    try:
        text.encode()
    except UnicodeError:
        return True
    return False


def _message_bytes(part: Message, warnings: list[str]) -> bytes:
    """The body of a message/* part (an attached message), serialised as it came:
    compat32 writes each header as received (no refolding, 8-bit bytes kept), so a
    forwarded message keeps its exact header lines (and any DKIM signature holds)."""
    buffer = io.BytesIO()
    try:
        BytesGenerator(buffer, mangle_from_=False, policy=_AS_RECEIVED).flatten(part)
        data = buffer.getvalue()
    except Exception:
        warnings.append("an attached message could not be re-serialised; sent empty")
        return b""
    _head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return b""
    cte = str(part.get("content-transfer-encoding", "")).strip().lower()
    if cte in ("base64", "quoted-printable"):
        # Not allowed on message/* (RFC 2046), but some clients forward so: the parser
        # read the encoded text as the message; decode it as a leaf part's payload.
        encoded = Message()
        encoded["Content-Transfer-Encoding"] = cte
        encoded.set_payload(body.decode("ascii", "surrogateescape"))
        return _payload(encoded)
    return body


def _text(part: Message, warnings: list[str], hint: Hint = None) -> str:
    data = _payload(part)
    charset = None
    with contextlib.suppress(Exception):
        charset = part.get_content_charset()
    return _decode_text(data, charset, warnings, hint)


# --- charsets ---------------------------------------------------------------------

#: Charset labels seen in mail that Python's codecs do not know, and the codec meant.
_LABELS = {
    "iso-8859-6-i": "iso8859-6",
    "iso-8859-6-e": "iso8859-6",
    "iso-8859-8-i": "iso8859-8",
    "iso-8859-8-e": "iso8859-8",
    "windows-874": "cp874",
    "x-sjis": "cp932",
    "windows-31j": "cp932",
    "x-euc-jp": "euc_jp",
    "x-gbk": "gbk",
    "x-mac-roman": "mac-roman",
    "x-mac-cyrillic": "mac-cyrillic",
    "x-mac-greek": "mac-greek",
    "x-mac-turkish": "mac-turkish",
    "x-mac-ce": "mac-latin2",
    "cp-1252": "cp1252",
}
#: Codecs that are no charset, whatever a label says (they would rewrite the text).
_NOT_CHARSETS = frozenset({"unicode_escape", "raw_unicode_escape", "idna", "punycode"})
#: What mail clients really decode a label as when its own table fails (the WHATWG
#: Encoding Standard maps these labels to the larger table; Windows wrote them so):
#: curly quotes and the euro sign in "iso-8859-1", GBK in "gb2312", Windows-31J in
#: "shift_jis", the extended ISO-2022-JP sets (NEC and IBM characters), and so on.
_SUPERSETS: dict[str, tuple[str, ...]] = {
    "ascii": ("utf-8", "cp1252"),
    "iso8859-1": ("cp1252",),
    "iso8859-9": ("cp1254",),
    "iso8859-11": ("cp874",),
    "tis-620": ("cp874",),
    "gb2312": ("gbk", "gb18030"),
    "gbk": ("gb18030",),
    "shift_jis": ("cp932",),
    "euc_jp": ("euc_jis_2004",),
    "euc_kr": ("cp949",),
    "big5": ("big5hkscs", "cp950"),
    "iso2022_jp": ("iso2022_jp_2", "iso2022_jp_ext", "iso2022_jp_3"),
}
#: Codecs where every byte decodes to something, so a wrong label gives no error.
_ANY_BYTE = frozenset(
    {f"iso8859-{n}" for n in (1, 2, 4, 5, 9, 10, 13, 14, 15, 16)}
    | {f"cp125{n}" for n in range(9)}
    | {"koi8-r", "koi8-u", "mac-roman", "cp437", "cp850", "cp866"}
)
#: Codecs that read ASCII bytes as ASCII (not UTF-16, UTF-7, ISO-2022, EBCDIC...).
_ASCII_SAFE = (
    _ANY_BYTE
    | {f"iso8859-{n}" for n in range(1, 17)}
    | {"ascii", "utf-8", "tis-620", "cp874", "cp932", "cp949", "cp950", "big5hkscs"}
    | {k for k in _SUPERSETS if not k.startswith("iso2022")}
)
#: C1 control characters: what windows-1252 text gives when read as ISO-8859-1.
_C1 = re.compile("[\x80-\x9f]")
#: What a decoded header value holds when a charset did not fit: replacement
#: characters, undecodable bytes (surrogates) or C1 controls.
_MISREAD = re.compile("[\x80-\x9f\ufffd\udc80-\udcff]")


def codec_name(label: str | None) -> str | None:
    """Python's codec for a MIME charset label, or None when there is none."""
    if not label:
        return None
    label = label.strip().strip('"').lower()
    try:
        name = codecs.lookup(_LABELS.get(label, label)).name
    except (LookupError, ValueError):
        return None
    if name in _NOT_CHARSETS:
        return None
    return name


def _decode_text(
    data: bytes,
    charset: str | None,
    warnings: list[str],
    hint: Hint = None,
    *,
    what: str = "a text part",
) -> str:
    """A text part's bytes as text, by its declared (lower-cased) charset if any.

    The best reading wins and any guess is named in ``warnings``: a label's larger
    table when its own fails (gb2312 text with GBK characters), UTF-8 under a label
    that would read it as mojibake without an error (UTF-8 declared ISO-8859-1),
    windows-1252 for C1 controls under ISO-8859-1, ISO-2022-JP escapes under no or an
    ASCII label, and for 8-bit text without a usable label the message's other
    charset (``hint()``), else windows-1252.
    """
    codec = codec_name(charset)
    if data.isascii() and (codec is None or codec in _ASCII_SAFE):
        if b"\x1b" in data:
            return _iso2022(data, charset, warnings, what)
        return data.decode("ascii")  # the same in every charset of _ASCII_SAFE
    label = clean(charset)[:40] if charset else None
    if charset and codec is None:
        warnings.append(f"unknown charset {label!r} in {what}")
    if codec is not None:
        try:
            text = data.decode(codec)
        except UnicodeDecodeError:
            pass
        else:
            if codec in _ANY_BYTE:
                return _any_byte(data, text, codec, label, warnings, what)
            return text
        for larger in _SUPERSETS.get(codec, ()):
            with contextlib.suppress(UnicodeDecodeError):
                text = data.decode(larger)
                warnings.append(
                    f"{what} declared {label} has characters outside it; decoded as {larger}"
                )
                return text
    if codec is not None and codec not in _ASCII_SAFE:
        # UTF-16, UTF-7, EBCDIC...: no other reading is more likely than this one.
        warnings.append(f"{what} is not valid {label}; bad bytes replaced")
        return data.decode(codec, "replace")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        if label:
            warnings.append(f"{what} declared {label} is UTF-8; decoded as UTF-8")
        return text
    if codec is None or (codec == "utf-8" and not _has_utf8_sequence(data)):
        # Legacy 8-bit text (declared UTF-8 and without one UTF-8 sequence: not a few
        # bad bytes in UTF-8 text but another charset).
        return _legacy_body(data, label, warnings, hint, what)
    warnings.append(f"{what} is not valid {label}; bad bytes replaced")
    return data.decode(codec, "replace")


def _any_byte(
    data: bytes, text: str, codec: str, label: str | None, warnings: list[str], what: str
) -> str:
    """``text`` (``data`` read as a single-byte ``codec``), unless that is a misreading."""
    try:
        utf8 = data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        warnings.append(f"{what} declared {label} is UTF-8; decoded as UTF-8")
        return utf8
    if codec == "iso8859-1" and _C1.search(text):
        warnings.append(f"{what} declared {label} is windows-1252; decoded as windows-1252")
        return data.decode("cp1252", "replace")
    return text


def _iso2022(data: bytes, charset: str | None, warnings: list[str], what: str) -> str:
    for codec in ("iso2022_jp", "iso2022_jp_2", "iso2022_jp_ext", "iso2022_jp_3"):
        with contextlib.suppress(UnicodeDecodeError):
            text = data.decode(codec)
            how = f"declared {clean(charset)[:40]}" if charset else "without a charset"
            warnings.append(f"{what} {how} has ISO-2022-JP escapes; decoded as {codec}")
            return text
    return data.decode("ascii")


_UTF8_SEQUENCE = re.compile(
    rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}"
)


def _has_utf8_sequence(data: bytes) -> bool:
    return _UTF8_SEQUENCE.search(data) is not None


def _legacy_body(data: bytes, label: str | None, warnings: list[str], hint: Hint, what: str) -> str:
    """8-bit text that is not UTF-8 and has no usable label (or a wrong UTF-8 one)."""
    how = f"declared {label}" if label else "with 8-bit bytes and no charset"
    charset = hint() if hint is not None else None
    codec = codec_name(charset)
    if codec not in (None, "utf-8", "ascii"):
        with contextlib.suppress(UnicodeDecodeError):
            text = data.decode(codec)
            warnings.append(f"{what} {how} decoded as {charset}, the message's charset")
            return text
    warnings.append(f"{what} {how} decoded as windows-1252")
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
