"""Pure helpers on raw message bytes, for the providers that send MIME as it is.

Two jobs, both done surgically so that whatever is not changed keeps its bytes:

- :func:`strip_bcc` removes the Bcc (and Resent-Bcc) header fields of the top-level
  header block, continuation lines included.  Nothing else moves: not the other
  fields' folding, not the line endings, not one byte of the body.
- :func:`to_7bit` re-encodes every leaf part whose body carries 8-bit bytes (text as
  quoted-printable, anything else as base64) and turns 8-bit header fields into
  RFC 2047 encoded words, for ESPs that do not keep 8bit (Amazon SES).  A message
  that is already 7-bit comes back byte-identical.

Neither function raises on broken MIME: a multipart without its boundary is treated
as one leaf, an unknown transfer encoding is re-encoded from its raw bytes, and
whatever could not be done is said in the returned ``warnings``.  Both work on CRLF
and on LF-only messages, and write new lines with the line ending the entity uses.
"""

from __future__ import annotations

import base64
import binascii
import email.policy
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.header import Header
from email.message import Message
from email.parser import BytesHeaderParser

from esprelay.message.header import read_header

log = logging.getLogger("esprelay.rawmime")

#: Header fields that name hidden recipients; never sent to an ESP.
BLIND_FIELDS = frozenset({b"bcc", b"resent-bcc"})

_NEWLINE = re.compile(rb"\r?\n")
_HEADER_PARSER = BytesHeaderParser(policy=email.policy.compat32)
# Folding 8-bit fields into encoded words; SMTP's CRLF, no UTF-8 headers.
_ASCII_POLICY = email.policy.SMTP.clone(utf8=False, linesep="\r\n")
_MAX_DEPTH = 50


@dataclass(frozen=True, slots=True)
class Rewritten:
    """The result of a rewrite: the bytes to send and what was changed or dropped."""

    raw: bytes
    warnings: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.warnings)


@dataclass(frozen=True, slots=True)
class _Field:
    """One header field: its raw lines (start plus continuations) and lower-cased name."""

    name: bytes
    raw: bytes


def split_header(raw: bytes, *, obsolete: bool = False) -> tuple[list[_Field], bytes, bytes]:
    """Split an entity into its header fields, the empty separator line and the body,
    as :func:`esprelay.message.header.read_header` reads them.

    The separator is ``b""`` when no empty line ends the header (headers only, or a
    line that is not a field, which starts the body).
    ``b"".join(f.raw for f in fields) + separator + body == raw`` always holds.
    """
    header = read_header(raw, obsolete=obsolete)
    fields = [_Field(f.name, raw[f.start : f.end]) for f in header.fields]
    return fields, raw[header.end : header.body], raw[header.body :]


def strip_bcc(raw: bytes) -> Rewritten:
    """``raw`` without its top-level Bcc/Resent-Bcc fields; every other byte kept."""
    stripped, removed = remove_fields(raw, lambda name: name in BLIND_FIELDS)
    if not removed:
        return Rewritten(raw)
    warning = (
        f"removed {removed} Bcc header field(s); "
        "their recipients still get the message through the envelope"
    )
    return Rewritten(stripped, (warning,))


def remove_fields(raw: bytes, drop: Callable[[bytes], bool]) -> tuple[bytes, int]:
    """``raw`` without the top-level fields whose lower-cased name ``drop`` picks (with
    their continuation lines), and how many went; every other byte kept.  ``raw`` itself
    when none goes.  (For an ESP's control headers that its SMTP service would remove.)
    """
    # The obsolete form ("Bcc : x") counts too: a message from an older spool may not
    # have been made unambiguous at intake, and removing a field is the safe side.
    fields, separator, body = split_header(raw, obsolete=True)
    kept = [f for f in fields if not drop(f.name)]
    removed = len(fields) - len(kept)
    if not removed:
        return raw, 0
    return b"".join(f.raw for f in kept) + separator + body, removed


def to_7bit(raw: bytes) -> Rewritten:
    """``raw`` with every 8-bit body re-encoded and 8-bit headers as encoded words.

    A message that is all ASCII is returned as it is (the very same bytes).
    """
    if raw.isascii():
        return Rewritten(raw)
    warnings: list[str] = []
    reencoder = _Reencoder(warnings)
    try:
        result = reencoder.entity(raw, "message", 0)
    except Exception as exc:  # a bug here must not lose the message: send it as it is
        log.exception("cannot re-encode a message to 7bit")
        return Rewritten(
            raw, (f"could not re-encode 8-bit content ({type(exc).__name__}); sent unchanged",)
        )
    if reencoder.parts:
        done = ", ".join(f"{n} as {cte}" for cte, n in sorted(reencoder.parts.items()))
        warnings.insert(0, f"re-encoded 8-bit parts for 7bit transport: {done}")
    if not result.isascii():
        warnings.append("some 8-bit bytes could not be re-encoded and were sent as they are")
    return Rewritten(result, tuple(warnings))


class _Reencoder:
    def __init__(self, warnings: list[str]) -> None:
        self.warnings = warnings
        #: How many leaf parts were re-encoded, by their new transfer encoding.
        self.parts: dict[str, int] = {}

    def warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)

    def entity(self, raw: bytes, where: str, depth: int) -> bytes:
        if raw.isascii():
            return raw
        fields, separator, body = split_header(raw)
        newline = _newline_of(raw)
        header = _HEADER_PARSER.parsebytes(b"".join(f.raw for f in fields) + b"\n")
        fields = [self.field(f, where, newline) for f in fields]
        if body.isascii():
            return b"".join(f.raw for f in fields) + separator + body
        if depth >= _MAX_DEPTH:
            self.warn(f"{where}: MIME nesting deeper than {_MAX_DEPTH}; treated as one part")
            return self.leaf(fields, separator, body, header, where, newline)
        content_type = header.get_content_type()
        if header.get_content_maintype() == "multipart":
            boundary = header.get_boundary()
            pieces = _split_multipart(body, boundary) if boundary else None
            if pieces is not None:
                for i in range(1, len(pieces), 2):
                    pieces[i] = self.entity(pieces[i], f"{where} part {(i + 1) // 2}", depth + 1)
                fields = _set_encoding(fields, header, b"7bit", newline, only_if_8bit=True)
                return b"".join(f.raw for f in fields) + separator + b"".join(pieces)
            self.warn(f"{where}: {content_type} without a usable boundary; re-encoded as one part")
        elif content_type in ("message/rfc822", "message/global") and _encoding(header) in (
            "7bit",
            "8bit",
            "binary",
        ):
            # RFC 2046 allows no other encoding on message/rfc822: re-encode inside it.
            fields = _set_encoding(fields, header, b"7bit", newline, only_if_8bit=True)
            inner = self.entity(body, f"{where} (attached message)", depth + 1)
            return b"".join(f.raw for f in fields) + separator + inner
        return self.leaf(fields, separator, body, header, where, newline)

    def leaf(
        self,
        fields: list[_Field],
        separator: bytes,
        body: bytes,
        header: Message,
        where: str,
        newline: bytes,
    ) -> bytes:
        encoding = _encoding(header)
        data = body
        if encoding == "base64":
            data = _lenient_b64decode(body)
            self.warn(f"{where}: base64 body held 8-bit bytes; they were dropped")
        elif encoding == "quoted-printable":
            data = binascii.a2b_qp(body)
        elif encoding not in ("7bit", "8bit", "binary"):
            self.warn(f"{where}: unknown transfer encoding {encoding!r}; body re-encoded as is")
        maintype = header.get_content_maintype()
        if maintype in ("text", "message"):
            new = b"quoted-printable"
            # Line breaks stay hard breaks; b2a_qp escapes trailing white space and
            # adds soft breaks at 76 characters.
            lines = _NEWLINE.split(data)
            encoded = newline.join(
                binascii.b2a_qp(line, istext=False).replace(b"=\n", b"=" + newline)
                for line in lines
            )
        else:
            new = b"base64"
            encoded = base64.encodebytes(data).replace(b"\n", newline)
        self.parts[new.decode()] = self.parts.get(new.decode(), 0) + 1
        fields = _set_encoding(fields, header, new, newline, only_if_8bit=False)
        return b"".join(f.raw for f in fields) + separator + encoded

    def field(self, field: _Field, where: str, newline: bytes) -> _Field:
        if field.raw.isascii():
            return field
        text, _, value = field.raw.partition(b":")
        if not field.name or not value:
            self.warn(f"{where}: a malformed 8-bit header line was sent as it is")
            return field
        name = text.decode("ascii", "replace").strip()
        try:
            decoded = value.decode("utf-8")
        except UnicodeDecodeError:
            decoded = value.decode("latin-1")
            self.warn(f"{where}: header {name} is not UTF-8; read as ISO-8859-1")
        decoded = " ".join(decoded.split())
        if field.name in ADDRESS_FIELDS:
            # Only the 8-bit words become encoded words; the structure (quotes, angle
            # brackets, commas, existing encoded words) stays byte for byte, so every
            # reader finds the same addresses after as before (a re-parse and re-fold
            # could turn an encoded-word display name into a bare address).
            found = _NON_ASCII_WORD.findall(decoded) + _ANGLE_ADDRESS.findall(decoded)
            if any("@" in word and not word.isascii() for word in found):
                self.warn(
                    f"header {name} holds a non-ASCII address, which cannot be written"
                    " in 7bit; sent as encoded words"
                )
            self.warn(f"header {name} had 8-bit characters; encoded as RFC 2047 words")
            encoded = _NON_ASCII_WORD.sub(_encoded_word, decoded)
            return _Field(field.name, f"{name}: {encoded}".encode("ascii") + newline)
        try:
            parsed = _ASCII_POLICY.header_factory(name, decoded)
            folded = parsed.fold(policy=_ASCII_POLICY).encode("ascii")
            addresses = getattr(parsed, "addresses", ())
            if any(not address.addr_spec.isascii() for address in addresses):
                self.warn(
                    f"header {name} holds a non-ASCII address, which cannot be written"
                    " in 7bit; sent as encoded words"
                )
        except Exception:  # noqa: BLE001 - any header the parser cannot fold: plain text
            words = Header(decoded, "utf-8", header_name=name).encode(linesep="\r\n")
            folded = f"{name}: {words}\r\n".encode("ascii")
        self.warn(f"header {name} had 8-bit characters; encoded as RFC 2047 words")
        return _Field(field.name, folded.replace(b"\r\n", newline))


#: Header fields that hold addresses: 8-bit words in them are encoded one by one.
ADDRESS_FIELDS = frozenset(
    {b"from", b"sender", b"reply-to", b"to", b"cc", b"bcc"}
    | {b"resent-" + name for name in (b"from", b"sender", b"to", b"cc", b"bcc")}
)
_NON_ASCII_WORD = re.compile(r"[^\s<>,\"]*[^\x00-\x7f][^\s<>,\"]*")
_ANGLE_ADDRESS = re.compile(r"<([^<>]*)>")


def _encoded_word(match: re.Match[str]) -> str:
    data = base64.b64encode(match.group().encode("utf-8")).decode("ascii")
    return f"=?utf-8?b?{data}?="


def _lenient_b64decode(data: bytes) -> bytes:
    """Decode base64 that holds stray bytes: keep the alphabet, cut a dangling tail."""
    alphabet = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
    alphabet = alphabet[: len(alphabet) - len(alphabet) % 4 if len(alphabet) % 4 == 1 else None]
    return base64.b64decode(alphabet + b"=" * (-len(alphabet) % 4))


def _newline_of(raw: bytes) -> bytes:
    index = raw.find(b"\n")
    return b"\r\n" if index > 0 and raw[index - 1 : index] == b"\r" else b"\n"


def _encoding(header: Message) -> str:
    value = header.get("content-transfer-encoding")
    if value is None:
        return "7bit"
    return str(value).strip().lower() or "7bit"


def _set_encoding(
    fields: list[_Field], header: Message, value: bytes, newline: bytes, *, only_if_8bit: bool
) -> list[_Field]:
    """Replace (or add) Content-Transfer-Encoding; keep everything else in place."""
    current = _encoding(header)
    if only_if_8bit and current not in ("8bit", "binary"):
        return fields
    kept = [f for f in fields if f.name != b"content-transfer-encoding"]
    kept.append(
        _Field(b"content-transfer-encoding", b"Content-Transfer-Encoding: " + value + newline)
    )
    return kept


def _split_multipart(body: bytes, boundary: str) -> list[bytes] | None:
    """Cut a multipart body into pieces, or None when no delimiter line is found.

    The result alternates ``[preamble + delimiter, part, eol + delimiter, part, ...]``:
    odd indexes are the parts' own bytes, without the line ending before the next
    delimiter (it belongs to the delimiter, RFC 2046).  The last even piece holds the
    close delimiter and the epilogue.  Joining all pieces gives ``body`` back.
    """
    try:
        marker = (b"--" + boundary.encode("ascii", "surrogateescape")).rstrip()
    except UnicodeEncodeError:
        return None
    delimiter = re.compile(rb"(?m)^" + re.escape(marker) + rb"(--)?[ \t]*(?:\r?\n|\Z)")
    first = delimiter.search(body)
    if first is None or first.group(1):
        return None
    pieces = [body[: first.end()]]
    pos = first.end()
    while True:
        match = delimiter.search(body, pos)
        if match is None:  # no close delimiter: the last part runs to the end
            pieces += [body[pos:], b""]
            return pieces
        part = body[pos : match.start()]
        eol = b"\r\n" if part.endswith(b"\r\n") else b"\n" if part.endswith(b"\n") else b""
        pieces += [part[: len(part) - len(eol)], eol + match.group()]
        pos = match.end()
        if match.group(1):  # the close delimiter: the rest is epilogue
            pieces[-1] += body[pos:]
            return pieces
