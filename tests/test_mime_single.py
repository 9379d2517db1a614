"""The one-text-part path of mime.parse gives exactly the reference's ParsedMessage.

``mime._parse_single_text`` reads a message that is one text/plain or text/html body
without the feedparser, or answers None (the parser decides).  Whenever it answers,
the answer must equal ``parse(raw, envelope, exact=True)`` field by field, warnings
included: on the test corpus, the broken inputs, the benchmark's messages, the shared
corpora when present and generated messages built to hit its edges.
"""

from __future__ import annotations

import base64
import dataclasses
import quopri

import pytest
from bench.mime_cpu import ENVELOPE, SAMPLES, bench_message
from hypothesis import example, given
from hypothesis import strategies as st

from esprelay.message import mime
from esprelay.message.mime import ParsedMessage
from esprelay.models import Envelope
from tests.messages import corpus, crlf
from tests.test_corpora import CORPORA, FILES, envelope_for
from tests.test_mime_fast import BROKEN, fuzz, variants


def single_differences(raw: bytes, envelope: Envelope) -> tuple[bool, list[str]]:
    """(whether the one-part path answered, the fields where it differs)."""
    single = mime._parse_single_text(raw, envelope)
    if single is None:
        return False, []
    reference = mime.parse(raw, envelope, exact=True)
    return True, [
        f"{f.name}: {getattr(reference, f.name)!r:.300} != {getattr(single, f.name)!r:.300}"
        for f in dataclasses.fields(ParsedMessage)
        if getattr(reference, f.name) != getattr(single, f.name)
    ]


def test_corpus_broken_and_benchmark_messages_parse_the_same() -> None:
    problems: list[str] = []
    taken = 0
    for case in corpus():
        for raw in variants(case.raw):
            answered, diff = single_differences(raw, Envelope(case.mail_from, case.rcpts))
            taken += answered
            problems += [f"{case.id}: {d}" for d in diff]
    for i, raw in enumerate(BROKEN):
        for variant in variants(raw):
            envelope = Envelope("s@example.com", ("r@example.org", "b@example.org"))
            answered, diff = single_differences(variant, envelope)
            taken += answered
            problems += [f"broken {i}: {d}" for d in diff]
    for name, make in SAMPLES.items():
        for variant in variants(make()):
            answered, diff = single_differences(variant, ENVELOPE)
            taken += answered
            problems += [f"{name}: {d}" for d in diff]
    assert not problems, "\n".join(problems)
    assert taken >= 4  # the benchmark's plain messages, at least


@pytest.mark.slow
@pytest.mark.skipif(not FILES, reason=f"no MIME corpora at {CORPORA} (optional test data)")
def test_every_corpus_message_parses_the_same() -> None:
    problems: list[str] = []
    taken = 0
    for path in FILES:
        name = str(path.relative_to(CORPORA))
        for raw in variants(path.read_bytes()):
            answered, diff = single_differences(raw, envelope_for(raw))
            taken += answered
            problems += [f"{name}: {d}" for d in diff]
    assert not problems, "\n".join(problems)
    assert taken > 0


def test_the_common_message_takes_the_one_part_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's message (and its kind) never reaches the feedparser."""
    cases = [
        bench_message(),
        SAMPLES["12 Received/X-"](),
        crlf(
            "From: =?utf-8?q?J=C3=B6rg?= <j@example.com>\nTo: Ann <a@example.org>\n"
            "Subject: caf\u00e9 au lait\nMIME-Version: 1.0\n"
            'Content-Type: text/html; charset="utf-8"\n'
            "Content-Transfer-Encoding: quoted-printable\n\n<p>caf=C3=A9</p>\n"
        ),
        b"From: a@example.com\nTo: b@example.org\nSubject: no type at all\n\nbody\n",
        crlf(
            "From: a@example.com\nTo: b@example.org\nSubject: base64\n"
            "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: base64\n\n"
            "Y2Fmw6kK\n"
        ),
    ]
    envelope = Envelope("s@example.com", ("a@example.org", "b@example.org"))
    expected = [mime.parse(raw, envelope, exact=True) for raw in cases]

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the feedparser was used")

    monkeypatch.setattr(mime._CHEAP_PARSER, "parsebytes", refuse)
    monkeypatch.setattr(mime._PARSER, "parsebytes", refuse)
    assert [mime.parse(raw, envelope) for raw in cases] == expected


@pytest.mark.parametrize(
    "raw",
    [
        crlf('Content-Type: multipart/mixed; boundary="B"\n\n--B\n\nx\n--B--\n'),
        crlf("Content-Type: text/plain\nContent-Disposition: inline\n\nx\n"),
        crlf('Content-Type: text/plain; name="a.txt"\n\nx\n'),
        crlf("Content-Type: text/calendar\n\nx\n"),
        crlf("Content-Type: text/plain\nContent-Type: text/html\n\nx\n"),
        crlf("From x@y Tue Oct  1 10:00:00 2024\nSubject: mbox\n\nx\n"),
        crlf("Subject: x\nnot a header line\n\nx\n"),
        crlf(" continued first\nSubject: x\n\nx\n"),
        b"Subject: lone\rCR\r\n\r\nx\r\n",
        b"Subject: no blank line\r\n",
    ],
)
def test_anything_unusual_is_left_to_the_parser(raw: bytes) -> None:
    envelope = Envelope("s@example.com", ("r@example.org",))
    assert mime._parse_single_text(raw, envelope) is None
    assert mime.parse(raw, envelope) == mime.parse(raw, envelope, exact=True)


def test_an_unexpected_failure_takes_the_reference_path(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = bench_message()

    def boom(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("one-part path broken")

    monkeypatch.setattr(mime, "_parse_single_text", boom)
    assert mime.parse(raw, ENVELOPE) == mime.parse(raw, ENVELOPE, exact=True)


# -- generated one-part messages --------------------------------------------------------

_ADDRESSES = [
    "a@example.com",
    "<b@example.org>",
    "Bob Smith <r@example.org>",
    '"Doe, J." <r@example.org>',
    "=?utf-8?q?J=C3=B6rg?= <j@example.com>",
    "R <R@EXAMPLE.ORG>, x@example.net",
    "undisclosed-recipients:;",
    "",
    "a@example.com (comment)",
]
_FIELDS = st.sampled_from(
    [
        ("From", st.sampled_from(_ADDRESSES)),
        ("To", st.sampled_from(_ADDRESSES)),
        ("Cc", st.sampled_from(_ADDRESSES)),
        ("Reply-To", st.sampled_from(_ADDRESSES)),
        ("Bcc", st.sampled_from(_ADDRESSES)),
        ("Subject", st.text(max_size=20)),
        ("Subject", st.sampled_from(["=?utf-8?b?w6k=?=", "=?bogus?q?x?=", "caf\udce9"])),
        ("Date", st.sampled_from(["Tue, 01 Oct 2024 10:00:00 +0000", "Tue, 31 Feb", ""])),
        ("Message-ID", st.sampled_from(["<a@b>", "<a..b@c> x", ""])),
        ("X-Trace", st.text(max_size=20)),
        ("MIME-Version", st.just("1.0")),
        ("Received", st.sampled_from(["from x\r\n\tby y; Tue, 01 Oct 2024 10:00:00 +0000"])),
        (
            "Content-Type",
            st.sampled_from(
                [
                    "text/plain",
                    "TEXT/Plain",
                    " text/plain ",
                    "text/html",
                    'text/plain; charset="utf-8"',
                    "text/plain; charset=UTF-8; format=flowed",
                    "text/plain; Charset=iso-8859-1",
                    "text/plain; charset=us-ascii; charset=utf-8",
                    "text/plain; charset=x-bogus",
                    'text/plain; charset=""',
                    "text/plain; charset",
                    "text/plain;",
                    "text/plain; charset=utf-8;\r\n\tformat=flowed",
                    'text/plain; charset="utf\\-8"',
                    'text/plain; charset="utf-8',
                    "text/plain; NAME=x.txt",
                    "text/plain (comment)",
                    "text",
                    "text/plain/x",
                    "application/octet-stream",
                    "=?utf-8?q?text/plain?=",
                ]
            ),
        ),
        (
            "Content-Transfer-Encoding",
            st.sampled_from(
                [
                    "7bit",
                    "8BIT",
                    "quoted-printable",
                    "Quoted-Printable",
                    "base64",
                    "BASE64",
                    "base64 ",
                    "x-uuencode",
                    "bogus",
                ]
            ),
        ),
    ]
)
_NAMES = st.sampled_from(["subject", "SUBJECT", "X-A", "X-Sp ace", ":", "From ", "Bad\x00"])
_BODIES = st.one_of(
    st.binary(max_size=60),
    st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.text(max_size=40).map(lambda t: quopri.encodestring(t.encode("utf-8"))),
    st.text(max_size=40).map(lambda t: base64.encodebytes(t.encode("utf-8"))),
    st.sampled_from([b"w6k=\r\n", b"w6k\r\n", b"!!!\r\n", b"begin 644 x\n#86)C\n`\nend\n"]),
    st.sampled_from([b"caf\xe9\r\n", b"=C3=A9=\r\nx", b"", b"\r\n\r\n", b"a\rb\nc"]),
)


@st.composite
def one_part_messages(draw: st.DrawFn) -> bytes:
    lines: list[str] = []
    for _ in range(draw(st.integers(0, 7))):
        name, values = draw(_FIELDS)
        if draw(st.integers(0, 9)) == 0:
            name = draw(_NAMES)
        value = draw(values)
        sep = draw(st.sampled_from([": ", ":", ":\t", ":  "]))
        lines.append(f"{name}{sep}{value}")
    if draw(st.integers(0, 9)) == 0:
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from([" x", "\tx", "x"])))
    eol = draw(st.sampled_from(["\r\n", "\n"]))
    head = "".join(
        line.replace("\r\n", "\n").replace("\n", eol) + draw(st.sampled_from([eol, eol, eol, "\r"]))
        for line in lines
    )
    blank = draw(st.sampled_from([eol, eol, eol, "", "\r"]))
    return head.encode("utf-8", "surrogateescape") + blank.encode() + draw(_BODIES)


@fuzz(1000)
@given(raw=one_part_messages())
@example(raw=b"Content-Type: text/plain; charset=x-bogus\r\n\r\ncaf\xe9\r\n")
@example(raw=b"Content-Type: text/plain; charset=utf-8\r\n\r\ncaf\xe9\r\n")
@example(raw=b"Content-Type: text/plain; charset=us-ascii\r\n\r\ncaf\xc3\xa9\r\n")
@example(raw=b"Subject: caf\xc3\xa9\r\nFrom: J\xe9 <a@example.com>\r\n\r\ncaf\xe9\r\n")
@example(raw=b"Subject: a\r\n \r\n\r\nx")
@example(raw=b"Subject: x\r\n\r\n")
def test_generated_one_part_messages_parse_the_same(raw: bytes) -> None:
    envelope = Envelope("s@example.com", ("a@example.com", "r@example.org", "b@example.org"))
    _answered, diff = single_differences(raw, envelope)
    assert diff == []
    assert mime.parse(raw, envelope) == mime.parse(raw, envelope, exact=True)
