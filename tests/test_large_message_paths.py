"""The per-byte paths of a large message give what the general ones give.

Each fast path here stands next to a simpler reading of the same thing, kept as the
reference: the check for bare line endings against counting CR, LF and CRLF, the
one-part text read from the message itself against a copy of its body.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from esprelay.message import mime
from esprelay.message.repair import _LINE_END, normalize_line_endings
from esprelay.models import Envelope

ENVELOPE = Envelope("a@example.com", ("b@example.com",))


def reference_normalize(raw: bytes) -> bytes:
    crlf = raw.count(b"\r\n")
    if raw.count(b"\r") == crlf and raw.count(b"\n") == crlf:
        return raw
    return _LINE_END.sub(b"\r\n", raw)


endings = st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b"\n\r", b"x", b"yz", b"\r\r\n"]), max_size=40
).map(b"".join)


@settings(max_examples=2000, deadline=None)
@given(endings)
def test_bare_line_endings_found_as_by_counting(raw: bytes) -> None:
    got = normalize_line_endings(raw)
    assert got == reference_normalize(raw)
    assert (got is raw) == (reference_normalize(raw) is raw)


bodies = st.lists(
    st.sampled_from(["line\r\n", "\x1b$B", "caf\u00e9\r\n", "\r\n", "x" * 70 + "\r\n", "."]),
    max_size=30,
).map("".join)
charsets = st.sampled_from(
    [None, "us-ascii", "utf-8", "iso-8859-1", "ISO-2022-JP", "utf-16", "x-unknown", "gb2312"]
)


@settings(max_examples=500, deadline=None)
@given(bodies, charsets, st.sampled_from(["text/plain", "text/html"]), st.booleans())
def test_one_text_part_read_in_place_is_the_reference(
    body: str, charset: str | None, ctype: str, utf8_subject: bool
) -> None:
    subject = "caf\u00e9" if utf8_subject else "cafe"
    params = f'; charset="{charset}"' if charset else ""
    raw = (
        f"From: a@example.com\r\nTo: b@example.com\r\nSubject: {subject}\r\n"
        f"Content-Type: {ctype}{params}\r\n\r\n{body}"
    ).encode()
    fast = mime.parse(raw, ENVELOPE)
    assert mime._parse_single_text(raw, ENVELOPE) is not None
    assert fast == mime.parse(raw, ENVELOPE, exact=True)
