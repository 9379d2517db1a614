"""The two rewrites of the raw message that Microsoft Graph's MIME sendMail needs.

**The envelope decides who receives.**  sendMail has no envelope: Exchange turns the
MIME into a message whose recipients are the addresses of its To, Cc and Bcc header
fields ("Send messages with MIME content",
https://learn.microsoft.com/en-us/graph/outlook-send-mime-message).  A Bcc recipient
known only from RCPT TO would be lost, and a To address that is not in the envelope
would be mailed.  :func:`envelope_recipients` makes those fields say exactly the
envelope: To and Cc keep their bytes when every address in them is an envelope
recipient, lose the addresses that are not (a field left empty goes), and every other
envelope recipient is listed in one new Bcc field, after every Bcc field the message had
was removed.  Exchange reads the Bcc field as Bcc recipients and does not write it into
what it sends over SMTP: "When generating a message for outbound submission to SMTP,
MIME writers MUST NOT copy Bcc recipients to the MIME Bcc header" ([MS-OXCMAIL] 2.1.3.1.1.2,
https://learn.microsoft.com/en-us/openspecs/exchange_server_protocols/ms-oxcmail/db4548ad-9075-415d-876a-0b88d1a8852e).

**Quoted-printable goes as base64.**  Exchange re-encodes what it is given, and
quoted-printable parts come out damaged (soft line breaks followed by a hex digit read
as escapes: smtp-oauth-relay issue #93, fixed in its PR #94 by sending every
quoted-printable part as base64; stray ``=`` and lost characters reported against other
Graph senders).  :func:`qp_to_base64` does the same: each quoted-printable leaf part is
decoded and written as base64, so the bytes recipients decode are exactly the bytes the
sender meant.  Signed and encrypted subtrees (multipart/signed, multipart/encrypted) and
attached messages are left as they are: a signature covers their bytes.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from email.utils import getaddresses

from esprelay.message.header import raw_value, read_header, unfolded
from esprelay.message.rawmime import (
    _HEADER_PARSER,
    BLIND_FIELDS,
    Rewritten,
    _encoding,
    _newline_of,
    _set_encoding,
    _split_multipart,
    split_header,
)

#: Header fields whose addresses Exchange sends to.
SHOWN_FIELDS = frozenset({b"to", b"cc"})
_NEEDS_QUOTES = re.compile(r'[()<>@,:;.\\"\[\]]')
_QP = re.compile(rb"quoted-printable", re.IGNORECASE)
_MAX_DEPTH = 50


def envelope_recipients(raw: bytes, rcpts: Sequence[str]) -> Rewritten:
    """``raw`` with To, Cc and Bcc saying exactly ``rcpts`` (see the module docstring)."""
    header = read_header(raw, obsolete=True)
    wanted = {address.lower() for address in rcpts}
    newline = _newline_of(raw)
    out: list[bytes] = []
    shown: set[str] = set()
    removed = blind = 0
    for item in header.fields:
        chunk = raw[item.start : item.end]
        if item.name in BLIND_FIELDS:
            blind += 1
            continue
        if item.name in SHOWN_FIELDS:
            value = unfolded(raw_value(raw, item))
            pairs = [(name, address) for name, address in getaddresses([value]) if address]
            kept = [(name, address) for name, address in pairs if address.lower() in wanted]
            if not pairs and "@" in value:
                # Not an address list we can read: Exchange might read it otherwise, so
                # it goes, and its envelope recipients are reached through Bcc.
                removed += 1
                continue
            if len(kept) != len(pairs):
                removed += len(pairs) - len(kept)
                if not kept:
                    continue
                name = chunk.split(b":", 1)[0].rstrip(b" \t")
                chunk = name + b": " + _address_list(kept, newline) + newline
            shown.update(address.lower() for _, address in kept)
        out.append(chunk)
    hidden: list[str] = []
    for address in rcpts:
        if address.lower() not in shown:
            shown.add(address.lower())
            hidden.append(address)
    if hidden:
        out.append(_address_field(b"Bcc", hidden, newline))
    warnings: list[str] = []
    if removed:
        warnings.append(
            f"removed {removed} To/Cc address(es) that are not envelope recipients"
            " (Graph sends to every address of To and Cc)"
        )
    if blind:
        warnings.append(
            f"replaced {blind} Bcc header field(s) with the envelope's hidden recipients"
            " (Exchange removes Bcc before the message leaves)"
        )
    if not removed and not blind and not hidden:
        return Rewritten(raw)
    return Rewritten(b"".join(out) + raw[header.end :], tuple(warnings))


def _address_list(pairs: list[tuple[str, str]], newline: bytes) -> bytes:
    """``name <address>`` items, one a line (the names as they were written)."""
    items = []
    for name, address in pairs:
        if not name:
            items.append(address)
            continue
        if _NEEDS_QUOTES.search(name):
            name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        items.append(f"{name} <{address}>")
    return (b"," + newline + b" ").join(i.encode("utf-8", "surrogateescape") for i in items)


def _address_field(name: bytes, addresses: list[str], newline: bytes) -> bytes:
    joined = (b"," + newline + b" ").join(a.encode("utf-8") for a in addresses)
    return name + b": " + joined + newline


def qp_to_base64(raw: bytes) -> Rewritten:
    """``raw`` with every quoted-printable leaf part re-encoded as base64."""
    if _QP.search(raw) is None:
        return Rewritten(raw)
    counter = [0]
    result = _entity(raw, 0, counter)
    if not counter[0]:
        return Rewritten(raw)
    return Rewritten(
        result,
        (f"re-encoded {counter[0]} quoted-printable part(s) as base64 for Graph",),
    )


def _entity(raw: bytes, depth: int, counter: list[int]) -> bytes:
    if _QP.search(raw) is None or depth > _MAX_DEPTH:
        return raw
    fields, separator, body = split_header(raw)
    header = _HEADER_PARSER.parsebytes(b"".join(f.raw for f in fields) + b"\n")
    maintype = header.get_content_maintype()
    if maintype == "multipart":
        boundary = header.get_boundary()
        if header.get_content_subtype() in ("signed", "encrypted") or not boundary:
            return raw
        pieces = _split_multipart(body, boundary)
        if pieces is None:
            return raw
        for i in range(1, len(pieces), 2):
            pieces[i] = _entity(pieces[i], depth + 1, counter)
        return b"".join(f.raw for f in fields) + separator + b"".join(pieces)
    if maintype == "message" or _encoding(header) != "quoted-printable":
        return raw
    newline = _newline_of(raw)
    data = binascii.a2b_qp(body)
    encoded = base64.encodebytes(data).replace(b"\n", newline)
    fields = _set_encoding(fields, header, b"base64", newline, only_if_8bit=False)
    counter[0] += 1
    return b"".join(f.raw for f in fields) + separator + encoded
