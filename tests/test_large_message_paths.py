"""The per-byte paths of a large message give what the general ones give.

Each fast path here stands next to a simpler reading of the same thing, kept as the
reference: the check for bare line endings against counting CR, LF and CRLF, the
one-part text read from the message itself against a copy of its body, JSON with its
long strings encoded in pieces against orjson's JSON of the whole, a message parsed
with its long base64 runs taken out and put back against the parser's reading of it.
"""

from __future__ import annotations

import base64
from unittest import mock

import httpx
import orjson
from bench.loadgen import make_message
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from esprelay.message import mime
from esprelay.message.repair import _LINE_END, normalize_line_endings
from esprelay.models import Envelope, OutboundMessage
from esprelay.providers import base
from esprelay.providers.sendgrid import SendGridProvider, build_payload
from tests.messages import corpus
from tests.test_corpora import FILES, envelope_for
from tests.test_mime_fast import BROKEN, differences, variants

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


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.text(st.characters(exclude_categories=("Cs",)), max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=5), inner, max_size=4)
        | st.tuples(inner, inner)
    ),
    max_leaves=12,
)


@settings(max_examples=1000, deadline=None)
@given(json_values, st.integers(min_value=1, max_value=6))
def test_long_strings_encoded_in_pieces_give_the_same_json(value: object, piece: int) -> None:
    with mock.patch.object(base, "LONG_STRING", piece):
        assert base.json_body(value, large=True) == orjson.dumps(value)
    assert base.json_body(value) == orjson.dumps(value)


def test_a_large_sendgrid_request_is_the_json_of_its_payload() -> None:
    raw = make_message(3 * base.LONG_STRING, sender="a@example.com", recipient="b@example.com")
    message = OutboundMessage("m1", Envelope("a@example.com", ("b@example.com",)), raw)
    provider = SendGridProvider(httpx.AsyncClient(), SecretStr("SG.x"), "https://api.sendgrid.com")
    body = provider.build_request(message).request.content
    payload, _ = build_payload(mime.parse(raw, message.envelope, exact=True), None, message.id)
    assert body == orjson.dumps(payload)


# -- long base64 runs read without the feedparser's line-by-line reading --------------

_B64 = base64.encodebytes(bytes(range(256)) * 2).decode().replace("\n", "\r\n")  # 14 lines


def _run(lines: int) -> str:
    return "".join(_B64.splitlines(keepends=True)[:lines]) or "QUJD\r\n"


@st.composite
def messages_with_runs(draw: st.DrawFn) -> bytes:
    run = _run(draw(st.integers(min_value=3, max_value=14)))
    tail = draw(st.sampled_from(["", "QQ==\r\n", "short line\r\n", "\r\n"]))
    places = [
        "preamble",
        "b64",
        "text",
        "header",
        "rfc822",
        "status",
        "nested",
        "epilogue",
        "unclosed",
    ]
    # At least one place that always carries the run (an epilogue has none when the
    # multipart is left unclosed).
    where = draw(st.sets(st.sampled_from(places))) | {draw(st.sampled_from(places[:-2]))}
    body = "preamble\r\n" + (run if "preamble" in where else "")
    parts = [
        "Content-Type: application/pdf; name=a.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + (run + tail if "b64" in where else "QUJD\r\n"),
        "Content-Type: text/plain\r\n\r\nsee\r\n" + (run + tail if "text" in where else ""),
    ]
    if "header" in where:
        parts.append(run + "Content-Type: text/plain\r\n\r\nafter\r\n")
    if "rfc822" in where:
        parts.append(
            "Content-Type: message/rfc822\r\n\r\nFrom: x@example.com\r\nSubject: s\r\n"
            "Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n" + run + tail
        )
    if "nested" in where:  # an attached message keeps its preamble and epilogue
        parts.append(
            "Content-Type: message/rfc822\r\n\r\nFrom: x@example.com\r\nSubject: s\r\n"
            'Content-Type: multipart/mixed; boundary="b2"\r\n\r\n'
            + run
            + "--b2\r\nContent-Type: text/plain\r\n\r\nx\r\n--b2--\r\n"
            + run
        )
    if "status" in where:
        parts.append(
            "Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; x\r\n\r\n" + run
        )
    for part in parts:
        body += "--b1\r\n" + part
    if "unclosed" not in where:
        body += "--b1--\r\n" + ("epilogue\r\n" + run if "epilogue" in where else "")
    head = (
        "From: a@example.com\r\nTo: b@example.com\r\nSubject: runs\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
    )
    return (head + body).encode()


@settings(max_examples=400, deadline=None)
@given(messages_with_runs(), st.integers(min_value=1, max_value=3))
def test_long_runs_parse_as_the_parser_reads_them(raw: bytes, lines: int) -> None:
    with mock.patch.object(mime, "RUN_LINES", lines):
        assert mime._without_long_runs(raw) is not None
        assert differences(raw, ENVELOPE) == []


def _reference_runs(raw: bytes, min_lines: int) -> list[tuple[int, int]]:
    spans = [match.span(1) for match in mime._RUN.finditer(raw)]
    return [(start, end) for start, end in spans if raw.count(b"\n", start, end) >= min_lines]


def _same_runs(raw: bytes) -> None:
    for min_lines in (1, 3, 4, 5, 40):
        assert list(mime._runs(raw, min_lines)) == _reference_runs(raw, min_lines), min_lines


# Lines as mailers and odd senders write them: base64 lines of one length or of a few,
# short lines, lines with a character outside the alphabet, boundaries, blank lines.
_LINES = st.lists(
    st.one_of(
        st.sampled_from(["QUJD" * 19, "QUJD" * 18, "QUJD" * 10 + "QQ==", "QUJD" * 10]),
        st.text(alphabet="ABCab09+/=", min_size=38, max_size=42),
        st.sampled_from(["QUJD" * 18 + "-Q", "QUJD" * 18 + " Q", "--b1", "", "QQ==", "x: y"]),
    ),
    max_size=60,
)


@settings(max_examples=1500, deadline=None)
@given(st.lists(_LINES, max_size=4), st.sampled_from(["\r\n", "\n"]))
def test_runs_are_found_where_the_expression_finds_them(blocks: list[list[str]], cut: str) -> None:
    # Blocks of lines that repeat one line many times (a long fixed-length run) and
    # mixed lines, joined with CRLF (or, for the last line of a block, a bare LF).
    text = "From: a@example.com\r\n\r\n"
    for lines in blocks:
        repeated = lines[:1] * 40 + lines[1:]
        text += "".join(line + "\r\n" for line in repeated[:-1])
        if repeated:
            text += repeated[-1] + cut
    _same_runs(text.encode())


def test_runs_in_a_large_attachment_are_the_expressions() -> None:
    data = bytes(range(256)) * 20000
    b64 = base64.encodebytes(data).replace(b"\n", b"\r\n")
    # A line's LF moved one byte on, into the next line: every CR where the first line's
    # length puts one, and as many LFs, but not a run past the line before.
    moved = b64[: 10 * 78 + 77] + b"Q\n" + b64[10 * 78 + 79 :]
    # Shapes that must not make the search quadratic (see `mime._fixed_length_lines`):
    # a bad line in every tenth, every other line a run of its own.
    line, bad = b"QUJD" * 19, b"QUJD" * 18 + b"-QUJ"
    tenth = b"".join((bad if i % 10 == 9 else line) + b"\r\n" for i in range(3000))
    other = b"".join((line if i % 2 else b"a b c") + b"\r\n" for i in range(3000))
    odd = (b64.replace(b"A", b"-", 1), b64[:-2] + b"\n", moved, tenth, other)
    for body in (b64, b64 + b"QQ==\r\n", *odd):
        raw = b"From: a@example.com\r\n\r\n--b1\r\n\r\n" + body + b"--b1--\r\n"
        _same_runs(raw)


def test_every_known_message_parses_the_same_with_runs_taken_out() -> None:
    problems: list[str] = []
    with mock.patch.object(mime, "RUN_LINES", 1):
        for case in corpus():
            for raw in variants(case.raw):
                problems += [f"{case.id}: {d}" for d in differences(raw, envelope_for(raw))]
        for raw in BROKEN:
            problems += [f"broken: {d}" for d in differences(raw, envelope_for(raw))]
        for path in FILES:
            raw = variants(path.read_bytes())[0]
            problems += [f"{path.name}: {d}" for d in differences(raw, envelope_for(raw))]
    assert not problems, "\n".join(problems)


def test_a_large_attachment_is_read_from_its_run() -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    b64 = base64.encodebytes(data).decode().replace("\n", "\r\n")
    raw = (
        "From: a@example.com\r\nTo: b@example.com\r\nSubject: pdf\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\n'
        "Content-Type: text/plain\r\n\r\nsee attached\r\n--b1\r\n"
        'Content-Type: application/pdf; name="x.pdf"\r\nContent-Transfer-Encoding: base64\r\n'
        "\r\n" + b64 + "--b1--\r\n"
    ).encode()
    assert mime._without_long_runs(raw) is not None
    parsed = mime.parse(raw, ENVELOPE)
    assert parsed == mime.parse(raw, ENVELOPE, exact=True)
    assert parsed.attachments[0].content == data
