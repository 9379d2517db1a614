"""The one header reader, and the fix-up that makes every reader agree with it."""

from __future__ import annotations

import email.policy
from email.parser import BytesParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esprelay.message.header import items, read_header
from esprelay.message.repair import prepare, unambiguous_header


@pytest.mark.parametrize(
    ("raw", "body"),
    [
        (b"\nbody", 1),
        (b"\r\nbody", 2),
        (b"A: b\r\n\r\nbody\n\nmore\r\n\r\n", 8),
        (b"A: b\n\nbody\r\n\r\n", 6),
        (b"A: b\n\r\nbody\n\n", 7),
        (b"A: b\r\nC: d\r\n", 12),
    ],
)
def test_the_header_is_read_up_to_its_first_empty_line(raw: bytes, body: int) -> None:
    assert read_header(raw).body == body


@pytest.mark.parametrize(
    "line",
    [
        b": x",
        b"no colon here",
        b"Fr\xc3\xb6m: x",
        b"Fr\x00om: x",
        b"From : x",
        b"X\x7f: y",
    ],
)
def test_a_line_that_is_not_a_field_ends_the_header(line: bytes) -> None:
    raw = b"Subject: s\r\n" + line + b"\r\nFrom: evil@other.test\r\n\r\nbody\r\n"
    header = read_header(raw)
    assert [f.name for f in header.fields] == [b"subject"]
    assert header.stray == 12 and not header.separator and header.body == 12


def test_an_empty_line_is_inserted_before_a_stray_line() -> None:
    raw = b"Subject: P5\r\n: x\r\nFrom: evil@other.test\r\n\r\nbody\r\n"
    fixed = unambiguous_header(raw)
    assert fixed.raw == b"Subject: P5\r\n\r\n: x\r\nFrom: evil@other.test\r\n\r\nbody\r\n"
    assert fixed.changes


def test_obsolete_white_space_before_the_colon_is_removed() -> None:
    raw = b"Subject : s\r\nFrom\t: a@example.com\r\n\r\nb\r\n"
    assert unambiguous_header(raw).raw == b"Subject: s\r\nFrom: a@example.com\r\n\r\nb\r\n"


def test_a_leading_mbox_line_is_removed_but_an_obsolete_from_field_kept() -> None:
    raw = b"From a@example.com Sat Nov 28 01:02:03 2026\r\nSubject: s\r\n\r\nb\r\n"
    assert unambiguous_header(raw).raw == b"Subject: s\r\n\r\nb\r\n"
    assert unambiguous_header(b"From : a@x.test\r\n\r\nb\r\n").raw == b"From: a@x.test\r\n\r\nb\r\n"


def test_a_message_that_needs_nothing_is_the_same_object() -> None:
    raw = b"Subject: s\r\n\tfolded\r\nTo: b@example.org\r\n\r\nbody\r\n"
    assert unambiguous_header(raw).raw is raw


LINES = st.lists(
    st.one_of(
        st.binary(max_size=20),
        st.sampled_from([b"From: a@b.test", b": x", b" folded", b"From x", b"A : b", b""]),
    ),
    max_size=8,
)


@settings(max_examples=500, deadline=None)
@given(lines=LINES, end=st.sampled_from([b"\r\n", b"\n", b"\r"]))
def test_after_the_fix_up_python_reads_the_same_fields(lines: list[bytes], end: bytes) -> None:
    raw = prepare(end.join(lines) + end + b"body", mail_from="", hostname="h.example").raw
    header = read_header(raw)
    assert header.stray is None
    parsed = BytesParser(policy=email.policy.compat32).parsebytes(raw)
    assert items(raw, header) == list(parsed.raw_items())
    assert unambiguous_header(raw).raw is raw  # idempotent
