"""A base64 part's bytes, read as Message.get_payload(decode=True) reads them.

``mime._payload`` decodes base64 parts itself, taking the line breaks out in one pass;
whatever the payload holds (stray characters, bad padding, bare CR or LF, 8-bit bytes
the parser kept as surrogates, other non-ASCII text), the bytes and the defects must
be the email package's.
"""

from __future__ import annotations

import base64
from email import policy
from email.message import Message
from email.parser import BytesParser

from hypothesis import given, settings
from hypothesis import strategies as st

from esprelay.message import mime

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
# What a parsed payload can hold: ASCII, and 8-bit bytes as surrogates (the parser
# reads bytes with surrogateescape).
_PIECES = st.one_of(
    st.text(alphabet=_ALPHABET, max_size=80),
    st.sampled_from(["=", "==", "\r\n", "\n", "\r", " ", "\t", "-", "*", "\udcff", "\x00"]),
)


def _part(payload: str, cte: str = "base64") -> Message:
    part = Message(policy=policy.compat32)
    part["Content-Transfer-Encoding"] = cte
    part.set_payload(payload)
    return part


def _same(payload: str, cte: str = "base64") -> None:
    ours, theirs = _part(payload, cte), _part(payload, cte)
    expected = theirs.get_payload(decode=True)
    got = mime._payload(ours)
    assert isinstance(expected, bytes)
    assert got == expected
    assert [type(d) for d in ours.defects] == [type(d) for d in theirs.defects]


@settings(max_examples=600, deadline=None)
@given(st.lists(_PIECES, max_size=40).map("".join))
def test_any_payload_decodes_as_get_payload_decodes_it(payload: str) -> None:
    _same(payload)


def test_the_edge_cases_decode_as_get_payload_decodes_them() -> None:
    for payload in [
        "",
        "QUJD",  # canonical
        "QUJ",  # padding missing
        "Q",  # a length no padding can save
        "QU=JD",  # a stray '=' inside
        "QUJD\r\nREVG\r\n",
        "QUJD\rREVG\nR0hJ",  # bare CR and LF
        "QUJD*REVG",  # a character outside the alphabet
        "QUJD\udcffREVG",  # an 8-bit byte kept as a surrogate
        "QUJDé",  # non-ASCII text, no surrogate (not from the parser)
    ]:
        _same(payload)
        _same(payload, "BASE64")


def test_a_parsed_attachment_decodes_to_its_bytes() -> None:
    data = bytes(range(256)) * 64
    body = base64.encodebytes(data).replace(b"\n", b"\r\n")
    raw = (
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + body
    )
    part = BytesParser(policy=policy.compat32).parsebytes(raw)
    assert mime._payload(part) == data == part.get_payload(decode=True)
