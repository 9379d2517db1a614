"""The one reader of a message's header section.

RFC 5322 section 2.2: a header field is a name of printable ASCII other than ``:``,
then ``:``, then its value, folded onto continuation lines that start with a space or
a tab; an empty line ends the header section.  :func:`read_header` reads exactly that
and nothing else:

- a field's name is one or more of ``!``..``9`` and ``;``..``~`` followed at once by
  ``:``.  The obsolete form with white space before the colon (RFC 5322 section 4.5)
  is read as a field only with ``obsolete=True`` (the repair step rewrites it, see
  :mod:`esprelay.message.repair`);
- any other line (no name, no colon, a non-ASCII or control byte in the name, a
  continuation line before the first field, a ``From `` mbox line) is not a field.
  The header ends there, and :attr:`Header.stray` says where.  Python's ``email``
  parser reads some of those lines as fields (``: x`` as a field with no name, a
  leading ``From `` line as an envelope line it skips), which is why esprelay never
  lets such a message leave the SMTP intake without making it unambiguous first.

Lines end with LF or CRLF.  A bare CR is not a line ending here: the intake turns
every bare CR and LF into CRLF before anything reads the header.
"""

from __future__ import annotations

import contextlib
import email.policy
import re
from dataclasses import dataclass
from typing import NamedTuple

# A whole field: the name and its colon, the rest of the line, and every continuation
# line (one that starts with a space or a tab).  A line ends with LF (CRLF's CR is
# part of the line), or the field runs to the end of the message.
_REST = rb"[^\n]*(?:\n[ \t][^\n]*)*(?:\n|\Z)"
_WHOLE = re.compile(rb"([!-9;-~]+)(:)" + _REST)
_OBSOLETE_WHOLE = re.compile(rb"([!-9;-~]+)[ \t]*(:)" + _REST)
_CONTINUED = re.compile(r"\r?\n(?=[ \t])")


class Field(NamedTuple):
    """One header field: its lower-cased name and where its lines are in the message.
    (A named tuple: a message's fields are made for every read, and a tuple is made
    several times faster than a frozen dataclass.)"""

    name: bytes  # lower case
    start: int
    end: int  # just past the line ending of its last line
    obsolete: bool = False  # white space before the colon (read with obsolete=True only)


@dataclass(frozen=True, slots=True)
class Header:
    """Where the header fields of a message are, and where its body starts."""

    fields: tuple[Field, ...]
    end: int  # first byte after the last field
    body: int  # first byte of the body: after the empty line, or ``end`` without one
    separator: bool  # an empty line ends the header
    stray: int | None = None  # start of a line that is not a field and ended the header

    def first(self, name: bytes) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)

    def all(self, name: bytes) -> list[Field]:
        return [f for f in self.fields if f.name == name]

    def names(self) -> set[bytes]:
        return {f.name for f in self.fields}


def read_header(raw: bytes, *, obsolete: bool = False) -> Header:
    """The header of ``raw``: its fields, up to the empty line or the first non-field."""
    fields: list[Field] = []
    append = fields.append
    pattern = _OBSOLETE_WHOLE if obsolete else _WHOLE
    pos = 0
    size = len(raw)
    while pos < size:
        # One match takes a whole field: its first line and its continuation lines.
        match = pattern.match(raw, pos)
        if match is None:
            first = raw[pos]
            if first == 0x0A or (first == 0x0D and raw[pos + 1 : pos + 2] == b"\n"):
                return Header(tuple(fields), pos, pos + (1 if first == 0x0A else 2), True)
            return Header(tuple(fields), pos, pos, False, pos)  # not a field
        name, end = match.group(1), match.end()
        late_colon = obsolete and match.end(1) + 1 != match.end(2)
        append(Field(name.lower(), pos, end, late_colon))
        pos = end
    return Header(tuple(fields), pos, pos, False)


def raw_value(raw: bytes, item: Field) -> str:
    """A field's value as Python's ``email`` parser keeps it (``raw_items()``).

    The text after the colon, leading blanks removed, continuation lines kept with
    their line endings, the final line ending removed; bytes that are not ASCII are
    kept as surrogates (``surrogateescape``), as the parser's ``BytesParser`` does.
    """
    text = raw[item.start : item.end].decode("ascii", "surrogateescape")
    return text.split(":", 1)[1].lstrip(" \t").rstrip("\r\n")


def unfolded(value: str) -> str:
    """A raw value on one line: the line endings of its folds removed, then stripped."""
    return _CONTINUED.sub("", value).strip()


def items(raw: bytes, header: Header) -> list[tuple[str, str]]:
    """The fields as (name as written, raw value) pairs, like ``raw_items()``."""
    # One decoding of the whole header: one character per byte, so positions agree.
    text = raw[: header.end].decode("ascii", "surrogateescape")
    out: list[tuple[str, str]] = []
    for item in header.fields:
        name, value = text[item.start : item.end].split(":", 1)
        out.append((name.rstrip(" \t"), value.lstrip(" \t").rstrip("\r\n")))
    return out


def decoded_text(raw: bytes, item: Field) -> str:
    """A field's value on one line, as a control header's reader wants it: unfolded,
    8-bit bytes read as UTF-8 (:class:`UnicodeError` if they are not UTF-8), RFC 2047
    encoded words (what mail libraries write for non-ASCII text: Python's email package,
    nodemailer) decoded where RFC 2047 allows them, any other ``=?`` left as it is."""
    text = unfolded(raw_value(raw, item))
    if not text.isascii():
        text = text.encode("ascii", "surrogateescape").decode("utf-8")
    if "=?" in text:
        with contextlib.suppress(Exception):
            text = str(email.policy.default.header_fetch_parse(item.name.decode(), text))
    return text


def may_have(raw: bytes, prefix: bytes) -> bool:
    """Whether a line of ``raw``'s header section may start with ``prefix`` (lower case;
    never a false no), for a provider's control headers: the common message, without
    any, is told apart by one scan of its header bytes, not a header read.  The header
    ends at the first empty line, so it lies within the first ``LF CR LF`` (or ``LF LF``);
    a line elsewhere that starts so only costs the exact read."""
    end = raw.find(b"\n\r\n")
    end = len(raw) if end < 0 else end + 1
    bare = raw.find(b"\n\n", 0, end)
    if bare >= 0:
        end = bare + 1
    head = raw[:end].lower()  # a copy of the header only: faster than a regex over it
    return head.startswith(prefix) or b"\n" + prefix in head
