"""The parsed view of raw messages (pure, no network)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from esprelay.message.mime import Mailbox, address_key, fallback_filename, parse, reconcile
from esprelay.models import Envelope
from tests.messages import Case, corpus, crlf, sha


def norm(text: str | None) -> str | None:
    return None if text is None else text.replace("\r\n", "\n")


@pytest.mark.parametrize("case", corpus(), ids=lambda c: c.id)
def test_corpus_parses_as_expected(case: Case) -> None:
    parsed = parse(case.raw, Envelope(case.mail_from, case.rcpts))
    assert parsed.subject == case.subject
    assert parsed.from_ is not None and parsed.from_.addr == case.from_addr
    assert norm(parsed.text) == case.text
    assert norm(parsed.html) == case.html
    r = parsed.recipients
    assert [m.addr.lower() for m in r.to] == list(case.to)
    assert [m.addr.lower() for m in r.cc] == list(case.cc)
    assert [m.addr.lower() for m in r.bcc] == list(case.bcc)
    got = [
        (a.filename or fallback_filename(a, i), a.content_type, sha(a.content), a.content_id)
        for i, a in enumerate(parsed.attachments, 1)
    ]
    assert got == [(a.filename, a.content_type, a.sha256, a.content_id) for a in case.attachments]
    for att, expected in zip(parsed.attachments, case.attachments, strict=True):
        assert att.inline == (expected.content_id is not None)
    headers = dict(parsed.headers)
    for name, value in case.headers.items():
        assert headers[name] == value
    assert not any(name.lower() == "bcc" for name, _ in parsed.headers)


def test_display_names_and_threading() -> None:
    case = corpus()[0]
    parsed = parse(case.raw, Envelope(case.mail_from, case.rcpts))
    assert parsed.from_ == Mailbox("Jürgen Müller", "app@example.com")
    assert parsed.recipients.to[0] == Mailbox("Müller, Hans", "hans@example.org")
    # The envelope's spelling is sent; the header's display name is kept.
    assert parsed.recipients.cc == (Mailbox("Team", "team@example.net"),)
    assert parsed.reply_to == (Mailbox("Support", "support@example.com"),)
    assert parsed.message_id == "<utf8-alt@example.com>"
    assert parsed.in_reply_to == "<parent@example.com>"
    assert parsed.references == "<root@example.com> <parent@example.com>"
    assert parsed.date == "Tue, 01 Oct 2024 10:00:00 +0000"


def test_printer_style_from_and_no_date_or_message_id() -> None:
    case = next(c for c in corpus() if c.id == "printer")
    parsed = parse(case.raw, Envelope(case.mail_from, case.rcpts))
    assert parsed.from_ is not None and parsed.from_.addr == "scanner@example.com"
    assert parsed.message_id is None and parsed.date is None


def test_missing_from_falls_back_to_envelope_sender() -> None:
    raw = crlf("From: root (Cron Daemon)\nTo: ops@example.org\nSubject: cron\n\nout\n")
    parsed = parse(raw, Envelope("root@host.example", ("ops@example.org",)))
    assert parsed.from_ == Mailbox("", "root@host.example")
    assert any("envelope sender" in w for w in parsed.warnings)


def test_rfc2047_filename_and_content_id_without_disposition() -> None:
    raw = crlf(
        "From: a@example.com\nTo: b@example.org\nSubject: x\n"
        'Content-Type: multipart/related; boundary="B"\n\n'
        "--B\nContent-Type: text/html\n\n<img src=cid:logo>\n"
        '--B\nContent-Type: image/gif; name="=?utf-8?q?L=C3=B6go.gif?="\n'
        "Content-ID: <logo>\nContent-Transfer-Encoding: base64\n\nR0lGODlhAQABAAAAACw=\n--B--\n"
    )
    parsed = parse(raw, Envelope("a@example.com", ("b@example.org",)))
    (att,) = parsed.attachments
    assert (att.filename, att.content_id, att.inline) == ("Lögo.gif", "logo", True)


def test_extra_bodies_become_attachments_with_a_warning() -> None:
    raw = crlf(
        "From: a@example.com\nTo: b@example.org\nSubject: x\n"
        'Content-Type: multipart/mixed; boundary="B"\n\n'
        "--B\nContent-Type: text/html\n\n<p>one</p>\n"
        "--B\nContent-Type: text/html\n\n<p>two</p>\n"
        "--B\nContent-Type: text/plain\n\nfooter\n--B--\n"
    )
    parsed = parse(raw, Envelope("a@example.com", ("b@example.org",)))
    assert parsed.html == "<p>one</p>"
    assert parsed.text == "footer"
    assert [a.content for a in parsed.attachments] == [b"<p>two</p>"]
    assert any("second text/html" in w for w in parsed.warnings)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00\xff garbage without headers", id="garbage"),
        pytest.param(
            crlf("From: a@example.com\nContent-Type: multipart/mixed\n\nno boundary\n"),
            id="no-boundary",
        ),
        pytest.param(
            crlf("From: a@example.com\nContent-Type: text/plain; charset=x-bogus\n\n")
            + b"caf\xe9\r\n",
            id="unknown-charset",
        ),
        pytest.param(
            crlf(
                'From: a@example.com\nContent-Type: multipart/mixed; boundary="B"\n\n'
                "--B\nContent-Type: application/pdf\nContent-Transfer-Encoding: base64\n\n"
                "!!!not base64!!!\n"
            ),
            id="bad-base64-unterminated",
        ),
        pytest.param(
            crlf("From: =?utf-8?q?a=0D=0ABcc:_x@y?= <a@example.com>\nSubject: =?bogus?q?x?=\n\nx"),
            id="encoded-crlf",
        ),
        pytest.param(b"Subject: x\r\nBad\x00Name: v\r\n\r\nbody", id="nul-header-name"),
        pytest.param(
            crlf("Content-Type: message/rfc822\n\nSubject: inner\n\ninner body\n"), id="rfc822"
        ),
    ],
)
def test_broken_input_never_raises(raw: bytes) -> None:
    parsed = parse(raw, Envelope("s@example.com", ("r@example.org",)))
    assert [m.addr for m in parsed.recipients.all()] == ["r@example.org"]
    for name, value in parsed.headers:
        assert "\r" not in value and "\n" not in value, name
    assert parsed.subject is None or "\n" not in parsed.subject


def test_undeclared_8bit_text_is_decoded_with_a_warning() -> None:
    raw = crlf("From: a@example.com\nSubject: x\n\n") + "caf\xe9".encode("latin-1")
    parsed = parse(raw, Envelope("a@example.com", ("b@example.org",)))
    assert parsed.text == "café"
    assert parsed.warnings


def test_address_key_is_case_insensitive_on_the_domain_only() -> None:
    assert address_key("John@Example.COM") == "John@example.com"
    assert address_key("john@example.com") != address_key("John@example.com")


def test_reconcile_sends_envelope_spelling_and_warns_about_outsiders() -> None:
    warnings: list[str] = []
    r = reconcile(
        (Mailbox("A", "a@EXAMPLE.org"), Mailbox("", "split@example.org")),
        (Mailbox("", "A@example.org"),),
        ("a@example.org", "b@example.org", "b@EXAMPLE.ORG"),
        warnings,
    )
    assert r.to == (Mailbox("A", "a@example.org"),)
    assert r.cc == ()  # A@ is a@ under the unambiguous whole-address fallback, already sent
    assert r.bcc == (Mailbox("", "b@example.org"),)
    assert warnings and "not envelope recipients" in warnings[0]


_local = st.sampled_from(["a", "A", "b", "bob", "Bob"])
_domain = st.sampled_from(["example.org", "EXAMPLE.org", "example.net"])
_addr = st.builds(lambda lp, d: f"{lp}@{d}", _local, _domain)


@given(
    to=st.lists(_addr, max_size=5),
    cc=st.lists(_addr, max_size=5),
    rcpts=st.lists(_addr, min_size=1, max_size=8),
)
def test_union_of_recipients_sent_is_the_envelope(
    to: list[str], cc: list[str], rcpts: list[str]
) -> None:
    r = reconcile(
        tuple(Mailbox("", a) for a in to), tuple(Mailbox("", a) for a in cc), tuple(rcpts), []
    )
    sent = [address_key(m.addr) for m in r.all()]
    assert len(sent) == len(set(sent))  # nobody twice
    assert set(sent) == {address_key(a) for a in rcpts}  # no more, no less


def test_resent_bcc_is_never_a_visible_header() -> None:
    raw = crlf("From: a@example.com\nTo: b@example.org\nResent-Bcc: c@example.org\n\nx\n")
    parsed = parse(raw, Envelope("a@example.com", ("b@example.org", "c@example.org")))
    assert parsed.headers == ()
    assert [m.addr for m in parsed.recipients.bcc] == ["c@example.org"]


def test_fallback_filenames() -> None:
    from esprelay.message.mime import Attachment

    def name(ctype: str) -> str:
        return fallback_filename(Attachment(b"x", ctype, None, None, False), 2)

    assert name("application/pdf") == "attachment-2.pdf"
    assert name("application/octet-stream") == "attachment-2.dat"
    assert name("message/rfc822") == "attachment-2.eml"
    assert name("x-unknown/thing") == "attachment-2.dat"
