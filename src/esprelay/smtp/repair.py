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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime, formataddr, getaddresses, make_msgid

# One line ending, however written: CR* LF, or a CR on its own.
_LINE_END = re.compile(rb"\r*\n|\r")
_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:")
# An unquoted display name that is (or contains) an address: ``a@b <a@b>``.
_ADDRESS_AS_NAME = re.compile(r'^\s*([^"<>,;:()\\]*@[^"<>,;:()\\]*?)\s*<([^<>\s]+@[^<>\s]+)>\s*$')


def normalize_line_endings(raw: bytes) -> bytes:
    """Turn every bare CR and bare LF into CRLF (``raw`` itself when there is none).

    aiosmtpd ends DATA only at ``<CRLF>.<CRLF>``, so bare line endings never end or split
    a message (SMTP smuggling); this makes what it kept unambiguous for every later reader.
    """
    crlf = raw.count(b"\r\n")
    if raw.count(b"\r") == crlf and raw.count(b"\n") == crlf:
        return raw
    return _LINE_END.sub(b"\r\n", raw)


@dataclass
class HeaderField:
    name: bytes  # lower case
    start: int
    end: int  # just past the field's last CRLF


@dataclass
class Header:
    """Where the header fields are in a CRLF message."""

    fields: list[HeaderField] = field(default_factory=list)
    end: int = 0  # first byte after the last field
    has_separator: bool = False  # a blank line follows the fields

    def first(self, name: bytes) -> HeaderField | None:
        return next((f for f in self.fields if f.name == name), None)


def parse_header(raw: bytes) -> Header:
    header = Header()
    pos = 0
    size = len(raw)
    while pos < size:
        eol = raw.find(b"\r\n", pos)
        line_end = size if eol < 0 else eol + 2
        line = raw[pos:line_end]
        if line == b"\r\n":
            header.has_separator = True
            break
        if line[:1] in (b" ", b"\t") and header.fields:
            header.fields[-1].end = line_end
        else:
            match = _FIELD.match(line)
            if match is None:
                break  # not a header line: the body starts here without a blank line
            header.fields.append(HeaderField(match.group(1).lower(), pos, line_end))
        header.end = line_end
        pos = line_end
    return header


def field_value(raw: bytes, item: HeaderField) -> str:
    """The unfolded value of a field, undecoded bytes kept as surrogates."""
    text = raw[item.start : item.end].decode("utf-8", "surrogateescape")
    value = text.split(":", 1)[1]
    return re.sub(r"\r\n(?=[ \t])", "", value).strip()


def from_addresses(raw: bytes) -> list[str] | None:
    """Addresses in the From header(s); None when there is no From; [] if unparsable."""
    header = parse_header(raw)
    values = [field_value(raw, f) for f in header.fields if f.name == b"from"]
    if not values:
        return None
    return [addr for _, addr in getaddresses(values) if "@" in addr]


@dataclass(frozen=True)
class RepairResult:
    raw: bytes
    changes: tuple[str, ...] = ()


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
    header = parse_header(raw)
    names = {f.name for f in header.fields}
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
            value = field_value(raw, old_from)
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
        match = _ADDRESS_AS_NAME.match(field_value(raw, old_from))
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
