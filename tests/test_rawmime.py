"""rawmime: Bcc removal and 7bit re-encoding on raw bytes."""

from __future__ import annotations

import email
import email.policy
from email.message import Message
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esprelay.message.rawmime import split_header, strip_bcc, to_7bit
from esprelay.message.repair import prepare

ROOT = Path(__file__).resolve().parents[1]
CORPORA = [
    p for p in (ROOT.parent / "shared" / "corpora", Path("/work/shared/corpora")) if p.is_dir()
]


def parse(raw: bytes) -> Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


# -- strip_bcc ----------------------------------------------------------------------


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"], ids=["crlf", "lf"])
def test_strip_bcc_keeps_every_other_byte(eol: bytes) -> None:
    lines = [
        b"From: a@example.com",
        b"To: b@example.org,",
        b"  c@example.org",
        b"Bcc: hidden@example.net,",
        b"\tsecret@example.net,",
        b"   third@example.net",
        b"Subject: folded",
        b"\tsubject line",
        b"BCC : shouting@example.net",
        b"Resent-Bcc: resent@example.net",
        b"X-Bcc: not a blind field",
        b"",
        b"Bcc: in the body, untouched",
        b"",
    ]
    raw = eol.join(lines)
    result = strip_bcc(raw)
    kept = [line for i, line in enumerate(lines) if i not in (3, 4, 5, 8, 9)]
    assert result.raw == eol.join(kept)
    assert result.warnings == (
        "removed 3 Bcc header field(s); their recipients still get the message through the"
        " envelope",
    )


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"From: a@example.com\r\nSubject: x\r\n\r\nbody\r\n", id="no-bcc"),
        pytest.param(b"\r\nBcc: looks like a header but is body\r\n", id="no-headers"),
        pytest.param(b"", id="empty"),
        pytest.param(
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nBcc: x@y\r\n\r\n--b--\r\n",
            id="bcc-in-a-part",
        ),
    ],
)
def test_strip_bcc_without_top_level_bcc_returns_the_same_bytes(raw: bytes) -> None:
    result = strip_bcc(raw)
    assert result.raw is raw
    assert not result.changed


def test_strip_bcc_on_header_only_message_and_missing_final_newline() -> None:
    assert strip_bcc(b"Subject: x\r\nBcc: a@b").raw == b"Subject: x\r\n"
    assert strip_bcc(b"Bcc: a@b\r\n\r\n").raw == b"\r\n"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_split_header_and_strip_bcc_never_lose_bytes(raw: bytes) -> None:
    fields, separator, body = split_header(raw)
    assert b"".join(f.raw for f in fields) + separator + body == raw
    stripped = strip_bcc(raw).raw
    blind = b"".join(f.raw for f in fields if f.name in (b"bcc", b"resent-bcc"))
    assert len(stripped) == len(raw) - len(blind)


# -- to_7bit ------------------------------------------------------------------------


def test_ascii_message_is_untouched() -> None:
    raw = b"From: a@example.com\r\nContent-Transfer-Encoding: 8bit\r\n\r\nplain ascii\r\n"
    result = to_7bit(raw)
    assert result.raw is raw
    assert result.warnings == ()


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"], ids=["crlf", "lf"])
def test_8bit_text_becomes_quoted_printable(eol: bytes) -> None:
    body = eol.join(
        [b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln = \xe2\x82\xac  ", b"x" * 200 + b"\xc3\xa9", b""]
    )
    headers = [
        b"From: a@example.com",
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Transfer-Encoding: 8bit",
        b"X-Kept: yes",
    ]
    raw = eol.join(headers) + eol + eol + body
    result = to_7bit(raw)
    assert result.raw.isascii()
    assert result.warnings == ("re-encoded 8-bit parts for 7bit transport: 1 as quoted-printable",)
    head, _, encoded = result.raw.partition(eol + eol)
    assert head.split(eol) == [
        b"From: a@example.com",
        b"Content-Type: text/plain; charset=utf-8",
        b"X-Kept: yes",
        b"Content-Transfer-Encoding: quoted-printable",
    ]
    assert all(len(line) <= 76 for line in encoded.split(eol))
    assert b"\r\n" not in encoded if eol == b"\n" else True
    assert parse(result.raw).get_payload(decode=True).replace(b"\r\n", b"\n") == body.replace(
        b"\r\n", b"\n"
    )
    assert b"=20" + eol in encoded  # trailing white space is protected


def test_multipart_with_binary_attachment_and_attached_message() -> None:
    blob = bytes(range(256)) * 3
    raw = (
        b"From: a@example.com\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="==b=="\r\n'
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        b"preamble\r\n"
        b"--==b==\r\n"
        b"Content-Type: text/plain; charset=iso-8859-1\r\n"
        b"\r\n"
        b"caf\xe9\r\n"
        b"--==b==\r\n"
        b"Content-Type: text/plain\r\n"
        b"\r\n"
        b"ascii part stays as is\r\n"
        b"--==b==\r\n"
        b'Content-Type: application/octet-stream; name="f\xc3\xbcr.bin"\r\n'
        b"Content-Transfer-Encoding: binary\r\n"
        b"\r\n" + blob + b"\r\n"
        b"--==b==\r\n"
        b"Content-Type: message/rfc822\r\n"
        b"\r\n"
        b"Subject: inner\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        b"\xe2\x9c\x93 inner\r\n"
        b"--==b==--\r\n"
        b"epilogue\r\n"
    )
    result = to_7bit(raw)
    assert result.raw.isascii(), result.raw
    assert b"Content-Transfer-Encoding: 7bit\r\n\r\npreamble\r\n--==b==\r\n" in result.raw
    assert b"\r\n\r\nascii part stays as is\r\n--==b==\r\n" in result.raw
    assert result.raw.endswith(b"--==b==--\r\nepilogue\r\n")
    parts = [p for p in parse(result.raw).walk() if not p.is_multipart()]
    assert parts[0].get_payload(decode=True) == b"caf\xe9"  # the CRLF is the delimiter's
    assert parts[0]["Content-Transfer-Encoding"] == "quoted-printable"
    assert parts[2].get_payload(decode=True) == blob
    assert parts[2]["Content-Transfer-Encoding"] == "base64"
    assert parts[2].get_filename() == "für.bin"
    inner = parse(result.raw).get_payload()[3].get_payload()[0]
    assert inner.get_payload(decode=True) == "✓ inner".encode()
    assert result.warnings == (
        "re-encoded 8-bit parts for 7bit transport: 1 as base64, 2 as quoted-printable",
        "header Content-Type had 8-bit characters; encoded as RFC 2047 words",
    )


def test_8bit_headers_become_encoded_words() -> None:
    raw = (
        "From: Jürgen <j@example.com>\r\nSubject: Grüße aus Köln\r\n"
        "Content-Type: text/plain\r\n\r\nascii body\r\n"
    ).encode()
    result = to_7bit(raw)
    assert result.raw.isascii()
    parsed = email.message_from_bytes(result.raw, policy=email.policy.default)
    assert parsed["Subject"] == "Grüße aus Köln"
    assert parsed["From"].addresses[0].display_name == "Jürgen"
    assert parsed["From"].addresses[0].addr_spec == "j@example.com"
    assert result.raw.endswith(b"\r\n\r\nascii body\r\n")


def test_latin1_header_and_non_ascii_address_are_reported() -> None:
    result = to_7bit(b"Subject: caf\xe9\r\nTo: j\xc3\xbcrgen@example.com\r\n\r\nx\r\n")
    assert result.raw.isascii()
    assert "message: header Subject is not UTF-8; read as ISO-8859-1" in result.warnings
    assert any("non-ASCII address" in w for w in result.warnings)
    assert email.message_from_bytes(result.raw, policy=email.policy.default)["Subject"] == "café"


@pytest.mark.parametrize(
    ("raw", "warning"),
    [
        pytest.param(
            b"Content-Type: multipart/mixed; boundary=nowhere\r\n\r\n\xff\xfe no parts\r\n",
            "without a usable boundary",
            id="multipart-without-delimiters",
        ),
        pytest.param(
            b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            b"aGVsbG8g\xffd29y\r\nbGQ\r\n",
            "base64 body held 8-bit bytes",
            id="base64-with-stray-bytes",
        ),
        pytest.param(
            b"Content-Type: text/plain\r\nContent-Transfer-Encoding: x-weird\r\n\r\n\xe9\r\n",
            "unknown transfer encoding",
            id="unknown-encoding",
        ),
        pytest.param(
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\n\xe9 never closed",
            None,
            id="unclosed-multipart",
        ),
    ],
)
def test_broken_mime_is_reencoded_and_reported(raw: bytes, warning: str | None) -> None:
    result = to_7bit(raw)
    assert result.raw.isascii()
    if warning is not None:
        assert any(warning in w for w in result.warnings), result.warnings


def test_base64_with_stray_bytes_keeps_the_good_data() -> None:
    raw = b"Content-Type: image/png\nContent-Transfer-Encoding: base64\n\naGVsbG8g\xffd29y\nbGQ=\n"
    assert parse(to_7bit(raw).raw).get_payload(decode=True) == b"hello world"


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                b"Content-Type: multipart/mixed; boundary=q\r\n",
                b"Content-Type: text/plain\r\n",
                b"Content-Type: message/rfc822\r\n",
                b"Content-Transfer-Encoding: base64\r\n",
                b"Content-Transfer-Encoding: quoted-printable\r\n",
                b"Subject: \xc3\xa9\xff\r\n",
                b"\r\n",
                b"--q\r\n",
                b"--q--\r\n",
                b"\xe9\xff\x00 body\r\n",
                b" folded\r\n",
                b"=\xe9=\r\n",
            ]
        ),
        max_size=30,
    )
)
def test_to_7bit_never_raises(lines: list[bytes]) -> None:
    raw = b"".join(lines)
    result = to_7bit(raw)
    assert result.raw.isascii() or result.warnings


# -- the shared corpora -------------------------------------------------------------


def corpus_files() -> list[Path]:
    return sorted(CORPORA[0].rglob("*.eml")) if CORPORA else []


@pytest.mark.skipif(not CORPORA, reason="../shared/corpora is not present")
def test_corpus_through_rawmime() -> None:
    files = corpus_files()
    assert len(files) > 100
    reencoded = 0
    for path in files:
        # As the intake keeps it (a leading mbox From_ line goes, for one).
        raw = prepare(path.read_bytes(), mail_from="", hostname="relay.example").raw
        stripped = strip_bcc(raw)
        top = parse(stripped.raw)
        assert top["Bcc"] is None and top["Resent-Bcc"] is None, path
        if parse(raw)["Bcc"] is None:
            assert stripped.raw is raw, path
        result = to_7bit(stripped.raw)
        if stripped.raw.isascii():
            assert result.raw is stripped.raw, path
            continue
        reencoded += 1
        assert result.raw.isascii() or result.warnings, path
        well_formed = not any(part.defects for part in parse(stripped.raw).walk())
        if well_formed and all(w.startswith("re-encoded 8-bit parts") for w in result.warnings):
            # The content a reader decodes is the same before and after.
            before = [p for p in parse(stripped.raw).walk() if not p.is_multipart()]
            after = [p for p in parse(result.raw).walk() if not p.is_multipart()]
            assert len(before) == len(after), path
            for old, new in zip(before, after, strict=True):
                old_data = old.get_payload(decode=True) or b""
                new_data = new.get_payload(decode=True) or b""
                assert old_data.replace(b"\r\n", b"\n") == new_data.replace(b"\r\n", b"\n"), path
    assert reencoded > 10
