"""The cheap parse path gives exactly the reference's ParsedMessage (differential tests).

``mime.parse`` reads headers through :mod:`esprelay.message.fastheaders`; ``parse(...,
exact=True)`` is the original all-``policy.default`` path.  Every message we have
(the test corpus, the broken inputs, the shared corpora when present, generated ones)
must give equal results field by field, warnings included; and each cheap header
answer must be what ``policy.default`` gives.
"""

from __future__ import annotations

import dataclasses
import email.policy
import os
import string
from collections.abc import Callable

import pytest
from bench.mime_cpu import ENVELOPE, SAMPLES
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from esprelay.message import fastheaders, mime
from esprelay.message.mime import ParsedMessage
from esprelay.models import Envelope
from tests.messages import corpus, crlf
from tests.test_corpora import CORPORA, FILES, envelope_for


def fuzz(examples: int) -> settings:
    """Bounded for `make test`; FUZZ_EXAMPLES=20000 for a longer hunt."""
    return settings(
        max_examples=int(os.environ.get("FUZZ_EXAMPLES", examples)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


def differences(raw: bytes, envelope: Envelope) -> list[str]:
    """Fields where the cheap path (without its fallback) and the reference differ."""
    reference = mime.parse(raw, envelope, exact=True)
    try:
        fast = mime._parse(raw, envelope, fast=True)
    except Exception:
        # Allowed (parse() then returns the reference's answer), but no message we
        # know of needs it: say which one does.
        return [f"the cheap path raised on {raw[:60]!r}"]
    return [
        f"{f.name}: {getattr(reference, f.name)!r:.300} != {getattr(fast, f.name)!r:.300}"
        for f in dataclasses.fields(ParsedMessage)
        if getattr(reference, f.name) != getattr(fast, f.name)
    ]


def variants(raw: bytes) -> list[bytes]:
    """As received (CRLF, as SMTP delivers it) and with bare LF line ends."""
    lf = raw.replace(b"\r\n", b"\n")
    return [lf.replace(b"\n", b"\r\n"), lf]


BROKEN = [
    b"",
    b"\x00\xff garbage without headers",
    b"no header at all\r\n\r\nbody",
    crlf("From: a@example.com\nContent-Type: multipart/mixed\n\nno boundary\n"),
    crlf("From: a@example.com\nContent-Type: text/plain; charset=x-bogus\n\n") + b"caf\xe9\r\n",
    crlf(
        'From: a@example.com\nContent-Type: multipart/mixed; boundary="B"\n\n'
        "--B\nContent-Type: application/pdf\nContent-Transfer-Encoding: base64\n\n"
        "!!!not base64!!!\n"
    ),
    crlf("From: =?utf-8?q?a=0D=0ABcc:_x@y?= <a@example.com>\nSubject: =?bogus?q?x?=\n\nx"),
    b"Subject: x\r\nBad\x00Name: v\r\n\r\nbody",
    crlf("Content-Type: message/rfc822\n\nSubject: inner\n\ninner body\n"),
    crlf(
        "From: a@example.com\nTo: b@example.org\nSubject: x\n"
        'Content-Type: multipart/related; boundary="B"\n\n'
        "--B\nContent-Type: text/html\n\n<img src=cid:logo>\n"
        '--B\nContent-Type: image/gif; name="=?utf-8?q?L=C3=B6go.gif?="\n'
        "Content-ID: <logo>\nContent-Transfer-Encoding: base64\n\nR0lGODlhAQABAAAAACw=\n--B--\n"
    ),
    crlf(
        "From: a@example.com\nTo: b@example.org\nSubject: x\n"
        'Content-Type: multipart/mixed;\n boundary*0="AB";\n boundary*1="CD"\n\n'
        "--ABCD\nContent-Type: text/plain; charset*=utf-8''%C3%A9\n\nbody\n"
        "--ABCD\nContent-Type: application/pdf\n"
        "Content-Disposition: attachment; filename*=UTF-8''%C3%9Cbersicht.pdf\n"
        "Content-Transfer-Encoding: base64 \n\nJVBERg==\n--ABCD--\n"
    ),
    crlf(
        "From: a@example.com\nTo: b@example.org\nSubject: x\n"
        'Content-Type: multipart/alternative; boundary="unterminated\n\n'
        "--unterminated\nContent-Type: text/plain\n\nbody\n--unterminated--\n"
    ),
    crlf(
        'From: "a\\"b" <a@example.com>\nTo: "x\\y" <b@example.org>, (c) b@example.org\n'
        'Content-Type: text/plain; charset="utf\\-8"\nDate: Tue, 31 Feb 2024 10:00:00 +0000\n'
        "Message-ID: <a..b@example.com> trailing\n\nx\n"
    ),
]


def test_corpus_and_broken_messages_parse_the_same() -> None:
    problems: list[str] = []
    for case in corpus():
        for raw in variants(case.raw):
            envelope = Envelope(case.mail_from, case.rcpts)
            problems += [f"{case.id}: {d}" for d in differences(raw, envelope)]
    for i, raw in enumerate(BROKEN):
        for variant in variants(raw):
            envelope = Envelope("s@example.com", ("r@example.org", "b@example.org"))
            problems += [f"broken {i}: {d}" for d in differences(variant, envelope)]
            assert mime.parse(variant, envelope) == mime.parse(variant, envelope, exact=True)
    assert not problems, "\n".join(problems)


@pytest.mark.slow
@pytest.mark.skipif(not FILES, reason=f"no MIME corpora at {CORPORA} (optional test data)")
def test_every_corpus_message_parses_the_same() -> None:
    problems: list[str] = []
    for path in FILES:
        raw = variants(path.read_bytes())[0]  # CRLF, as an SMTP client sends it
        name = str(path.relative_to(CORPORA))
        problems += [f"{name}: {d}" for d in differences(raw, envelope_for(raw))]
    assert not problems, "\n".join(problems)


def test_an_unexpected_failure_takes_the_reference_path(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = corpus()[0].raw
    envelope = Envelope("s@example.com", ("hans@example.org",))

    def boom(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("cheap path broken")

    expected = mime.parse(raw, envelope)
    monkeypatch.setattr(mime._CHEAP_PARSER, "parsebytes", boom)
    assert mime.parse(raw, envelope) == expected == mime.parse(raw, envelope, exact=True)


def test_common_messages_build_no_header_object(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's messages are read without policy.default's machinery at all."""

    def refuse(name: str, value: str) -> None:
        raise AssertionError(f"built a header object for {name}: {value!r}")

    monkeypatch.setattr(fastheaders, "exact_header", refuse)
    fastheaders._cached_header_str.cache_clear()
    for make in SAMPLES.values():
        raw = make()
        assert mime._parse(raw, ENVELOPE, fast=True) == mime.parse(raw, ENVELOPE, exact=True)


# -- header by header -----------------------------------------------------------------


def reference_str(name: str, value: str) -> str | type[Exception]:
    try:
        return str(email.policy.default.header_fetch_parse(name, value))
    except Exception as exc:
        return type(exc)


def cheap_str(name: str, value: str) -> str | type[Exception]:
    try:
        return fastheaders.header_str(name, value)
    except Exception as exc:
        return type(exc)


_TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+.^_`|~-"
_QTEXT = "".join(c for c in string.printable if c not in '"\\\r\n\x0b\x0c') + " "
_ODD = [
    "=?",
    "=?utf-8?q?=C3=A9?=",
    "\\",
    '"',
    "(",
    ")",
    "*",
    "'",
    "%",
    ";",
    ",",
    ":",
    "<",
    ">",
    "@",
    "/",
    "=",
    "\r\n ",
    "\r\n\t",
    "\t",
    "  ",
    "\x01",
    "\x7f",
    "é",
    "\udce9",
    "\udcc3\udca9",
]
ws = st.sampled_from(["", "", "", " ", "\t", "  ", "\r\n ", "\r\n\t"])
token = st.text(_TOKEN_CHARS, min_size=1, max_size=8)
quoted = st.text(_QTEXT, max_size=12).map(lambda s: f'"{s}"')
param = st.builds(
    lambda a, b, name, value: f"{a};{b}{name}={value}",
    ws,
    ws,
    st.sampled_from(["charset", "Charset", "name", "NAME", "filename", "boundary", "x-a.b"]),
    st.one_of(token, quoted),
)
params = st.lists(param, max_size=3).map("".join)
content_type = st.builds(
    lambda a, t, s, p, tail: f"{a}{t}/{s}{p}{tail}",
    ws,
    st.one_of(st.sampled_from(["text", "multipart", "application", "message", "image"]), token),
    st.one_of(st.sampled_from(["plain", "html", "mixed", "rfc822", "pdf"]), token),
    params,
    st.sampled_from(["", ";", " ", "; ", ";\r\n "]),
)
disposition = st.builds(
    lambda t, p, tail: f"{t}{p}{tail}",
    st.one_of(st.sampled_from(["attachment", "inline", "Attachment"]), token),
    params,
    st.sampled_from(["", ";", " "]),
)
ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
atext = st.text(ATEXT, min_size=1, max_size=6)
dot_atom = st.lists(atext, min_size=1, max_size=3).map(".".join)
addr = st.builds(lambda lp, dom: f"{lp}@{dom}", dot_atom, dot_atom)
message_id = st.builds(lambda a, x, b: f"{a}<{x}>{b}", ws, addr, ws)
phrase = st.lists(atext, min_size=1, max_size=3).flatmap(
    lambda words: st.lists(ws, min_size=len(words), max_size=len(words)).map(
        lambda gaps: "".join(w + (g or " ") for w, g in zip(words, gaps, strict=True)).rstrip()
    )
)
mailbox = st.one_of(
    addr,
    addr.map(lambda a: f"<{a}>"),
    st.builds(lambda n, w, a: f"{n}{w}<{a}>", st.one_of(phrase, quoted), ws, addr),
)
address_list = st.builds(
    lambda boxes, a, b: ",".join(f"{a}{box}{b}" for box in boxes),
    st.lists(mailbox, min_size=1, max_size=3),
    ws,
    ws,
)
date = st.one_of(
    st.datetimes().map(lambda d: d.strftime("%a, %d %b %Y %H:%M:%S +0000")),
    st.builds(
        lambda day, mon, year, time, zone: f"{day} {mon} {year} {time} {zone}",
        st.integers(0, 40),
        st.sampled_from(["Jan", "Feb", "oct", "Foo"]),
        st.sampled_from(["2024", "24", "99", "0", "10000"]),
        st.sampled_from(["10:00:00", "10:00", "25:61:61", "1:2:3"]),
        st.sampled_from(["+0000", "-0800", "GMT", "EST", "+9999", "-2400", "", "XYZ"]),
    ),
)
unstructured = st.text(string.printable + "é\udce9", max_size=40)


def mutated(base: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """``base`` with an odd character inserted or the value cut short somewhere."""

    def mutate(value: str, pos: int, odd: str, cut: bool) -> str:
        pos = pos % (len(value) + 1)
        return value[:pos] if cut else value[:pos] + odd + value[pos:]

    return st.builds(mutate, base, st.integers(0, 80), st.sampled_from(_ODD), st.booleans())


HEADERS: dict[str, st.SearchStrategy[str]] = {
    "Content-Type": content_type,
    "content-disposition": disposition,
    "Content-Transfer-Encoding": st.builds(lambda a, t, b: f"{a}{t}{b}", ws, token, ws),
    "Message-ID": message_id,
    "Date": date,
    "Resent-Date": date,
    "Subject": unstructured,
    "X-Anything": unstructured,
    "Content-ID": message_id,
    "References": address_list,
    "Sender": address_list,
    "MIME-Version": st.sampled_from(["1.0", "1.0 (generated)", " 1.0"]),
}


@fuzz(600)
@given(data=st.data())
def test_header_str_is_policy_defaults_answer(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(HEADERS)))
    value = data.draw(st.one_of(HEADERS[name], mutated(HEADERS[name])))
    assert cheap_str(name, value) == reference_str(name, value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Content-Type", 'text/plain; charset="utf-8"'),
        ("Content-Type", 'multipart/mixed;\r\n\tboundary="----=_Part_1_2.3"'),
        ("Content-Type", 'text/plain; charset="a\\b"'),  # a quoted pair: exact path
        ("Content-Type", "text/plain; name*=utf-8''%C3%A9"),
        ("Content-Type", 'application/pdf; name="unterminated'),
        ("Content-Disposition", 'attachment; filename="=?utf-8?q?x=C3=A9?="'),
        ("Content-Transfer-Encoding", "base64 "),
        ("Message-ID", "<a@b> <c@d>"),
        ("Date", "Tue, 1 Oct 2024 10:00:00 +0000"),
        ("Date", "Tue, 31 Feb 2024 10:00:00 +0000"),
        ("Date", ""),
        ("Subject", "=?utf-8?b?w6k=?= plain"),
        ("Subject", "folded\r\n\tsubject"),
    ],
)
def test_header_str_examples(name: str, value: str) -> None:
    assert cheap_str(name, value) == reference_str(name, value)


def reference_pairs(value: str) -> list[tuple[str, str]] | type[Exception]:
    try:
        header = email.policy.default.header_fetch_parse("To", value)
        return [(a.display_name, a.addr_spec) for a in header.addresses if a.username]
    except Exception as exc:
        return type(exc)


@fuzz(600)
@given(value=st.one_of(address_list, mutated(address_list)))
@example(value='"Doe, John" <j@example.com>, Jane  Roe\t<jane@example.org>')
@example(value="a@example.com,")
@example(value="a@example.com,,b@example.com")
@example(value="Name<a@example.com>")
@example(value='"" <a@example.com>')
@example(value="undisclosed-recipients:;")
def test_simple_addresses_are_policy_defaults_answer(value: str) -> None:
    pairs = fastheaders.simple_addresses(value)
    if pairs is not None:
        assert pairs == reference_pairs(value)


def test_simple_addresses_take_the_common_forms() -> None:
    value = 'a@example.com, <b@example.com>,\r\n Bob  Smith <c@example.com>, "X, Y" <d@e.f>'
    assert fastheaders.simple_addresses(value) == [
        ("", "a@example.com"),
        ("", "b@example.com"),
        ("Bob Smith", "c@example.com"),
        ("X, Y", "d@e.f"),
    ]
    for unsure in ["=?utf-8?q?J=C3=B6rg?= <j@example.com>", "a@example.com (comment)", ""]:
        assert fastheaders.simple_addresses(unsure) is None


# -- whole generated messages --------------------------------------------------------


def _header_lines(draw: Callable[[st.SearchStrategy[str]], str]) -> str:
    lines = []
    for name, strategy in [
        ("From", mailbox),
        ("To", address_list),
        ("Cc", address_list),
        ("Subject", unstructured),
        ("Date", date),
        ("Message-ID", message_id),
        ("X-Trace", unstructured),
    ]:
        if draw(st.booleans()):
            value = draw(st.one_of(strategy, mutated(strategy)))
            lines.append(f"{name}: {value}".replace("\r\n", "\n").replace("\n", "\r\n"))
    return "".join(line + "\r\n" for line in lines if "\r\n\r\n" not in line + "\r\n")


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    head = _header_lines(draw)
    part_types = draw(st.lists(st.one_of(content_type, mutated(content_type)), max_size=3))
    dispositions = draw(st.lists(st.one_of(disposition, mutated(disposition)), max_size=3))
    if not part_types:
        ctype = draw(st.one_of(content_type, mutated(content_type)))
        return (head + f"Content-Type: {ctype}\r\n\r\nbody line\r\n").encode(
            "utf-8", "surrogateescape"
        )
    body = ""
    for i, ctype in enumerate(part_types):
        disp = f"Content-Disposition: {dispositions[i]}\r\n" if i < len(dispositions) else ""
        body += f"--BOUNDARY\r\nContent-Type: {ctype}\r\n{disp}Content-ID: <p{i}@x>\r\n\r\n"
        body += f"part {i} text\r\n"
    body += "--BOUNDARY--\r\n"
    top = 'Content-Type: multipart/mixed; boundary="BOUNDARY"\r\n'
    return (head + top + "\r\n" + body).encode("utf-8", "surrogateescape")


@fuzz(200)
@given(raw=messages())
def test_generated_messages_parse_the_same(raw: bytes) -> None:
    envelope = Envelope("s@example.com", ("a@b", "r@example.org"))
    assert differences(raw, envelope) == []
