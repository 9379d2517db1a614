"""Byte-preserving fixes for messages from legacy devices.

The core keeps a message exactly as received.  These functions change only what they
must: bare CR/LF line endings become CRLF; missing Date, Message-ID and From headers are
*prepended*; a broken ``From: a@b <a@b>`` or a From that must be rewritten
(``ESPRELAY_FORCE_FROM``) is replaced in place.  Every other byte, the body above all,
stays as it was; a message that needs nothing comes back as the same object.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, formataddr, getaddresses, make_msgid

from esprelay.message.header import Field, read_header, unfolded

# One line ending, however written: CR* LF, or a CR on its own.
_LINE_END = re.compile(rb"\r*\n|\r")
# A CR not followed by LF, an LF not preceded by CR.  Each pattern starts with a literal
# byte the regular expression engine scans for in C, then looks once around each
# hit: ~2 ms each for 5 MB, where counting CR, LF and CRLF took ~7.5.
_BARE_CR = re.compile(rb"\r(?!\n)")
_BARE_LF = re.compile(rb"\n(?<!\r\n)")
# A header of fields only (name, colon at once, folded lines), then the empty line: what
# read_header reads with no stray line and no obsolete field.
_PLAIN_HEADER = re.compile(rb"(?:[!-9;-~]+:[^\n]*\n(?:[ \t][^\n]*\n)*)*\r\n")
# "From :" is the obsolete form of a From field, not an mbox From_ line.
_OBSOLETE_FROM = re.compile(rb"From[ \t]+:")
# An unquoted display name that is (or contains) an address: ``a@b <a@b>``.
_ADDRESS_AS_NAME = re.compile(r'^\s*([^"<>,;:()\\]*@[^"<>,;:()\\]*?)\s*<([^<>\s]+@[^<>\s]+)>\s*$')


def normalize_line_endings(raw: bytes) -> bytes:
    """Turn every bare CR and bare LF into CRLF (``raw`` itself when there is none).

    aiosmtpd ends DATA only at ``<CRLF>.<CRLF>``, so bare line endings never end or split
    a message (SMTP smuggling); this makes what it kept unambiguous for every later reader.
    """
    if _BARE_CR.search(raw) is None and _BARE_LF.search(raw) is None:
        return raw
    return _LINE_END.sub(b"\r\n", raw)


class LineEndWatch:
    """Whether a message fed in consecutive pieces has a bare CR or a bare LF (what
    :func:`normalize_line_endings` would change), for a message never held whole: the
    same two searches, with the one byte either side of a cut between pieces."""

    __slots__ = ("_cr_pending", "_last", "bare")

    def __init__(self) -> None:
        self.bare = False
        self._last = 0x0A  # a message starts a line
        self._cr_pending = False  # the last piece ended with a CR

    def feed(self, piece: bytes | memoryview) -> None:
        if self.bare or not piece:
            return
        if self._cr_pending and piece[0] != 0x0A:
            self.bare = True
            return
        found = _BARE_LF.search(piece)
        if found is not None and found.start() == 0 and self._last == 0x0D:
            found = _BARE_LF.search(piece, 1)  # that LF ends the CR of the last piece
        found_cr = _BARE_CR.search(piece)
        self._cr_pending = found_cr is not None and found_cr.start() == len(piece) - 1
        if found is not None or (found_cr is not None and not self._cr_pending):
            self.bare = True
        self._last = piece[-1]

    def finish(self) -> bool:
        """True if the message had a bare line ending (a CR at its very end counts)."""
        return self.bare or self._cr_pending


def _text(raw: bytes, item: Field) -> str:
    """A field's unfolded value, UTF-8 decoded, undecodable bytes kept as surrogates."""
    value = raw[item.start : item.end].decode("utf-8", "surrogateescape").split(":", 1)[1]
    return unfolded(value)


@dataclass(frozen=True)
class RepairResult:
    raw: bytes
    changes: tuple[str, ...] = ()


def unambiguous_header(raw: bytes) -> RepairResult:
    """``raw`` (a CRLF message) with a header that every reader reads the same way.

    Readers disagree on lines that are not header fields (``: x``, a line without a
    colon, a name with a non-ASCII or control byte, a continuation line before the
    first field): :func:`~esprelay.message.header.read_header` ends the header there,
    Python's ``email`` parser reads some of them as fields and reads on, and an ESP may
    do either.  So, as Postfix's cleanup does, an empty line is inserted before the
    first such line: it and everything after it are the body for every reader.  Also:

    - a field written with white space before its colon (``Subject : x``, RFC 5322's
      obsolete syntax, which Python's parser does not read as a field) loses it;
    - a leading mbox ``From `` line (an envelope line, not a field) is removed.

    A message that needs none of this comes back as the same object.
    """
    if _PLAIN_HEADER.match(raw) is not None:
        return RepairResult(raw)  # the common case, in one pass of the regex engine
    changes: list[str] = []
    if raw.startswith(b"From ") and _OBSOLETE_FROM.match(raw) is None:
        eol = raw.find(b"\r\n")
        raw = b"" if eol < 0 else raw[eol + 2 :]
        changes.append("removed a leading mbox From_ line")
    header = read_header(raw, obsolete=True)
    parts: list[bytes] = []
    pos = 0
    for item in header.fields:
        if item.obsolete:
            name_end = item.start + len(item.name)
            parts.append(raw[pos:name_end])
            pos = raw.index(b":", name_end)
    if parts:
        changes.append("removed white space before a header field's colon")
    if header.stray is not None:
        parts += [raw[pos : header.stray], b"\r\n"]
        pos = header.stray
        changes.append("a header line that is not a field ended the header (blank line inserted)")
    if not parts:
        return RepairResult(raw, tuple(changes))
    return RepairResult(b"".join([*parts, memoryview(raw)[pos:]]), tuple(changes))


_date_cache: tuple[int, str] = (0, "")


def _date_now() -> str:
    """The RFC 5322 date of this second (formatted once per second, not per message)."""
    global _date_cache
    second = int(time.time())
    cached_second, text = _date_cache
    if cached_second != second:
        text = format_datetime(datetime.fromtimestamp(second, UTC))
        _date_cache = (second, text)
    return text


def _line(name: str, value: str) -> bytes:
    return f"{name}: {value}\r\n".encode("utf-8", "surrogateescape")


def repair_message(
    raw: bytes,
    *,
    mail_from: str,
    hostname: str,
    repair: bool = True,
    force_from: str | None = None,
    now: datetime | None = None,
) -> RepairResult:
    """Add or fix the headers a legacy device got wrong; see the module docstring."""
    header = read_header(raw)
    names = header.names()
    prepend: list[bytes] = []
    replace: dict[int, bytes] = {}  # field start -> new bytes for the whole field
    changes: list[str] = []
    old_from = header.first(b"from")

    if repair and b"date" not in names:
        prepend.append(_line("Date", format_datetime(now) if now else _date_now()))
        changes.append("added Date")
    if repair and b"message-id" not in names:
        domain = hostname if "." in hostname else f"{hostname}.esprelay.invalid"
        prepend.append(_line("Message-ID", make_msgid(domain=domain)))
        changes.append("added Message-ID")

    if force_from is not None:
        if old_from is None:
            prepend.append(_line("From", force_from))
            changes.append("added From (forced)")
            if mail_from and b"reply-to" not in names:
                prepend.append(_line("Reply-To", mail_from))
                changes.append("added Reply-To")
        else:
            value = _text(raw, old_from)
            parsed = getaddresses([value])
            name, address = parsed[0] if len(parsed) == 1 else ("", "")
            if address.lower() != force_from.lower():
                try:
                    new_from = formataddr((name, force_from)) if name else force_from
                except UnicodeError:
                    new_from = force_from
                replace[old_from.start] = _line("From", new_from)
                changes.append("rewrote From (forced)")
                if b"reply-to" not in names:
                    # The original field's bytes, folding and encoding kept as they were.
                    original = raw[old_from.start : old_from.end]
                    colon = original.index(b":")
                    replace[old_from.start] += b"Reply-To:" + original[colon + 1 :]
                    changes.append("moved From to Reply-To")
    elif repair and old_from is None:
        if mail_from:
            prepend.append(_line("From", mail_from))
            changes.append("added From")
    elif repair and old_from is not None:
        match = _ADDRESS_AS_NAME.match(_text(raw, old_from))
        if match is not None:
            shown, address = match.group(1).strip(), match.group(2)
            if shown.lower() == address.lower():
                new_value = address
            else:
                new_value = '"' + shown.replace("\\", "\\\\").replace('"', '\\"') + f'" <{address}>'
            replace[old_from.start] = _line("From", new_value)
            changes.append("normalised From")

    if not prepend and not replace:
        return RepairResult(raw)
    parts: list[bytes] = list(prepend)
    if prepend and not header.fields and not raw.startswith(b"\r\n"):
        parts.append(b"\r\n")  # no header at all: the added fields need a blank line
    pos = 0
    for item in header.fields:
        if item.start in replace:
            parts.append(raw[pos : item.start])
            parts.append(replace[item.start])
            pos = item.end
    # The rest (the body) as a view: one copy of it, in the join, not two.
    return RepairResult(b"".join([*parts, memoryview(raw)[pos:]]), tuple(changes))


def prepare(
    raw: bytes,
    *,
    mail_from: str,
    hostname: str,
    repair: bool = False,
    force_from: str | None = None,
) -> RepairResult:
    """The message as the intake keeps it: unambiguous line endings and header, then
    (with ``repair`` or ``force_from``) the header fixes of :func:`repair_message`.

    Everything after this (the sender rules, the spool, every provider) reads these
    bytes; ``changes`` says what was done, for the message's metadata.
    """
    changes: list[str] = []
    normalized = normalize_line_endings(raw)
    if normalized is not raw:
        changes.append("bare CR/LF normalised to CRLF")
        raw = normalized
    del normalized
    result = unambiguous_header(raw)
    changes += result.changes
    raw = result.raw
    if repair or force_from:
        result = repair_message(
            raw, mail_from=mail_from, hostname=hostname, repair=repair, force_from=force_from
        )
        changes += result.changes
        raw = result.raw
    del result
    return RepairResult(raw, tuple(changes))
