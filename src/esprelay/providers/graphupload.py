"""Messages over Graph's 4 MB request limit: a draft, its attachments, then send.

Microsoft Graph takes at most 4 MB per request, and the MIME of sendMail is one request.
A larger message (up to Exchange Online's 150 MB) goes in steps
(https://learn.microsoft.com/en-us/graph/outlook-large-attachments):

1. the message without its largest attachment parts, as base64 MIME with
   ``Content-Type: text/plain``: ``POST /users/{mailbox}/messages`` creates a draft
   and answers ``201`` with its ``id`` ("Create message",
   https://learn.microsoft.com/en-us/graph/api/user-post-messages);
2. each removed part: under 3 MB, ``POST /messages/{id}/attachments`` with a
   ``#microsoft.graph.fileAttachment`` whose ``contentBytes`` are the part's decoded
   bytes in base64 ("Add attachment"); from 3 MB, ``POST
   /messages/{id}/attachments/createUploadSession`` with an ``AttachmentItem``, then
   the bytes PUT to the returned ``uploadUrl`` in ranges of a multiple of 320 KiB
   ("up to 4 MB each time") with ``Content-Range: bytes a-b/total``; the URL is
   pre-authenticated and the PUTs carry no Authorization header (the same page:
   "Don't specify an Authorization request header for the PUT operation");
3. ``POST /messages/{id}/send`` (202).

:func:`split_attachments` does step 1's cut: it removes whole leaf parts from the
(already rewritten) MIME, largest first, until the rest fits, and keeps every other
byte.  What Graph's attachment resource can say of a removed part is remembered: its
file name, content type, Content-ID and whether it is inline; its other header fields
(Content-Description, a part's own Date...) are not carried.  Parts of a signed or
encrypted subtree are never removed (the signature covers them), nor the text and HTML
bodies, nor a single-part message: such a message over the limit is refused.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.header import decode_header, make_header
from email.message import Message
from typing import Any

from esprelay.message.rawmime import (
    _HEADER_PARSER,
    _encoding,
    _lenient_b64decode,
    _newline_of,
    _split_multipart,
    split_header,
)

#: Exchange Online's largest message (and attachment) through Graph: 150 MB.
UPLOAD_LIMIT = 150 * 1024 * 1024
#: Attachments under 3 MB are POSTed in one request; from 3 MB, an upload session.
#: (3,000,000 bytes: as base64 in the JSON they stay well inside the 4 MB request.)
SMALL_ATTACHMENT = 3_000_000
#: Upload ranges are multiples of 320 KiB (but the last) and at most 4 MB.
CHUNK_UNIT = 320 * 1024
CHUNK_SIZE = 12 * CHUNK_UNIT  # 3.75 MiB
_MAX_DEPTH = 50


@dataclass(frozen=True, slots=True)
class Attachment:
    """A part taken out of the draft MIME, to be attached through Graph."""

    name: str
    content_type: str
    content_id: str | None
    inline: bool
    data: bytes  # decoded

    @property
    def size(self) -> int:
        return len(self.data)

    def file_attachment(self) -> dict[str, Any]:
        """The JSON of ``POST /messages/{id}/attachments`` (a small attachment)."""
        body: dict[str, Any] = {
            "@odata.type": "#microsoft.graph.fileAttachment",
            "name": self.name,
            "contentType": self.content_type,
            "isInline": self.inline,
            "contentBytes": base64.b64encode(self.data).decode("ascii"),
        }
        if self.content_id:
            body["contentId"] = self.content_id
        return body

    def upload_session(self) -> dict[str, Any]:
        """The JSON of ``POST /messages/{id}/attachments/createUploadSession``."""
        item: dict[str, Any] = {
            "attachmentType": "file",
            "name": self.name,
            "size": self.size,
            "contentType": self.content_type,
            "isInline": self.inline,
        }
        if self.content_id:
            item["contentId"] = self.content_id
        return {"AttachmentItem": item}


def chunks(total: int, size: int = CHUNK_SIZE) -> Iterator[tuple[int, int]]:
    """``(start, end)`` byte ranges (end exclusive) covering ``total`` bytes."""
    if size % CHUNK_UNIT:
        raise ValueError("upload ranges are multiples of 320 KiB")
    for start in range(0, total, size):
        yield start, min(total, start + size)


@dataclass(frozen=True, slots=True)
class Split:
    """The draft MIME and the parts taken out of it, in the order they were."""

    raw: bytes
    attachments: tuple[Attachment, ...]


@dataclass(slots=True)
class _Leaf:
    path: tuple[int, ...]  # indexes into the nested multiparts' piece lists
    size: int


def split_attachments(raw: bytes, fits: Callable[[int], bool]) -> Split | None:
    """``raw`` without its largest attachment parts so that ``fits(len(draft))``, or
    None if removing every removable part is not enough."""
    leaves: list[_Leaf] = []
    _collect(raw, (), 0, leaves)
    leaves.sort(key=lambda leaf: leaf.size, reverse=True)
    remaining = len(raw)
    chosen: list[_Leaf] = []
    for leaf in leaves:
        chosen.append(leaf)
        remaining -= leaf.size
        # The estimate ignores the delimiters removed with the parts (less) and the
        # empty part that stands in for a multipart left without parts (a few bytes).
        if fits(remaining + 512):
            draft, taken = _remove(raw, {leaf.path for leaf in chosen})
            if fits(len(draft)):
                return Split(draft, tuple(taken))
    return None


def _collect(raw: bytes, path: tuple[int, ...], depth: int, out: list[_Leaf]) -> None:
    if depth > _MAX_DEPTH:
        return
    fields, _, body = split_header(raw)
    header = _HEADER_PARSER.parsebytes(b"".join(f.raw for f in fields) + b"\n")
    if header.get_content_maintype() != "multipart":
        if path and _removable(header):
            out.append(_Leaf(path, len(raw)))
        return
    boundary = header.get_boundary()
    if header.get_content_subtype() in ("signed", "encrypted") or not boundary:
        return
    pieces = _split_multipart(body, boundary)
    if pieces is None:
        return
    for i in range(1, len(pieces), 2):
        _collect(pieces[i], (*path, i), depth + 1, out)


def _removable(header: Message) -> bool:
    """An attachment, not a body: a file name, a disposition of attachment, a
    Content-ID, or content that is not text."""
    disposition = (header.get_content_disposition() or "").lower()
    if disposition == "attachment" or header.get_filename() or header.get("content-id"):
        return True
    return header.get_content_maintype() != "text"


def _remove(raw: bytes, paths: set[tuple[int, ...]]) -> tuple[bytes, list[Attachment]]:
    taken: list[Attachment] = []
    return _rebuild(raw, (), paths, taken), taken


def _rebuild(
    raw: bytes, path: tuple[int, ...], paths: set[tuple[int, ...]], taken: list[Attachment]
) -> bytes:
    if not any(p[: len(path)] == path and len(p) > len(path) for p in paths):
        return raw
    fields, separator, body = split_header(raw)
    header = _HEADER_PARSER.parsebytes(b"".join(f.raw for f in fields) + b"\n")
    boundary = header.get_boundary()
    assert boundary is not None
    pieces = _split_multipart(body, boundary)
    assert pieces is not None
    kept: list[tuple[bytes, bytes]] = []
    for i in range(1, len(pieces), 2):
        if (*path, i) in paths:
            taken.append(_attachment(pieces[i], len(taken)))
            continue
        kept.append((_rebuild(pieces[i], (*path, i), paths, taken), pieces[i + 1]))
    close = pieces[-1]
    if not kept:
        # A multipart needs a part: an empty text part stands in for the removed ones.
        newline = _newline_of(raw)
        kept.append((b"Content-Type: text/plain; charset=us-ascii" + newline + newline, close))
    elif kept[-1][1] != close:
        kept[-1] = (kept[-1][0], close)
    out = [b"".join(f.raw for f in fields), separator, pieces[0]]
    for part, delimiter in kept:
        out += [part, delimiter]
    return b"".join(out)


def _attachment(raw: bytes, index: int) -> Attachment:
    fields, _, body = split_header(raw)
    header = _HEADER_PARSER.parsebytes(b"".join(f.raw for f in fields) + b"\n")
    encoding = _encoding(header)
    if encoding == "base64":
        data = _lenient_b64decode(body)
    elif encoding == "quoted-printable":
        data = binascii.a2b_qp(body)
    else:
        data = body
    content_id = str(header.get("content-id") or "").strip().strip("<>").strip() or None
    disposition = (header.get_content_disposition() or "").lower()
    inline = disposition == "inline" or (not disposition and content_id is not None)
    name = _decoded(header.get_filename() or header.get_param("name", header="content-type"))
    if not name:
        name = f"attachment-{index + 1}"
    return Attachment(name, header.get_content_type(), content_id, inline, data)


def _decoded(value: object) -> str:
    """A file name as text: RFC 2231 (done by the parser) or RFC 2047 encoded words."""
    if isinstance(value, tuple):  # an RFC 2231 value the parser left as a triple
        value = value[2]
    if not isinstance(value, str):
        return ""
    try:
        return str(make_header(decode_header(value))).strip()
    except (ValueError, LookupError, UnicodeDecodeError):
        return value.strip()
