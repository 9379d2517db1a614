"""MIME fidelity of the JSON adapters (SendGrid, Postmark): what a recipient gets is
what the sender wrote, in every charset, filename form and structure, or a warning
says what changed.

Each test runs the same message through both adapters' pure builders and reads the
JSON back as the ESP would (:class:`Sent`); the end-to-end tests at the bottom send
over SMTP to a relay and its loopback fake ESP.
"""

from __future__ import annotations

import base64
import quopri
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import getaddresses

import pytest

from esprelay.message.mime import parse
from esprelay.models import Envelope
from esprelay.providers import postmark, sendgrid
from esprelay.testing.fakeesp import FakeESP
from tests.messages import crlf
from tests.providers import test_postmark, test_sendgrid
from tests.relayproc import RelayProcess

ENVELOPE = Envelope("s@example.com", ("r@example.org",))


@dataclass(frozen=True)
class Sent:
    """What an adapter's request says, read back the way the ESP reads it."""

    subject: str | None
    from_name: str
    to_names: tuple[str, ...]
    text: str | None
    html: str | None
    #: (filename, type with its parameters, bytes) of each attachment.
    attachments: tuple[tuple[str, str, bytes], ...]
    #: Body entries beyond text and HTML (SendGrid's ``content``), type -> value.
    extra_content: dict[str, str]
    warnings: tuple[str, ...]


def unquote(name: str) -> str:
    """A recipient name as SendGrid shows it (esprelay quotes one with a comma)."""
    if len(name) > 1 and name[0] == name[-1] == '"':
        return name[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return name


def via_sendgrid(raw: bytes) -> Sent:
    payload, warnings = sendgrid.build_payload(parse(raw, ENVELOPE))
    assert test_sendgrid.validate(payload) == []
    content = {c["type"]: c["value"] for c in payload["content"]}
    return Sent(
        subject=payload.get("subject"),
        from_name=payload["from"].get("name", ""),
        to_names=tuple(unquote(b.get("name", "")) for b in payload["personalizations"][0]["to"]),
        text=content.pop("text/plain", None),
        html=content.pop("text/html", None),
        attachments=tuple(
            (a["filename"], a["type"], base64.b64decode(a["content"]))
            for a in payload.get("attachments", [])
        ),
        extra_content=content,
        warnings=tuple(warnings),
    )


def via_postmark(raw: bytes) -> Sent:
    payload, warnings = postmark.build_payload(parse(raw, ENVELOPE))
    assert test_postmark.validate(payload, stream=None) == []
    return Sent(
        subject=payload.get("Subject"),
        from_name=getaddresses([payload["From"]])[0][0],
        to_names=tuple(name for name, _ in getaddresses([payload.get("To", "")])),
        text=payload.get("TextBody"),
        html=payload.get("HtmlBody"),
        attachments=tuple(
            (a["Name"], a["ContentType"], base64.b64decode(a["Content"]))
            for a in payload.get("Attachments", [])
        ),
        extra_content={},
        warnings=tuple(warnings),
    )


ADAPTERS: dict[str, Callable[[bytes], Sent]] = {"sendgrid": via_sendgrid, "postmark": via_postmark}
adapters = pytest.mark.parametrize("send", ADAPTERS.values(), ids=ADAPTERS.keys())


def encode_body(data: bytes, cte: str) -> bytes:
    if cte == "base64":
        return base64.encodebytes(data)
    if cte == "quoted-printable":
        return quopri.encodestring(data)
    return data


def word(text: str, charset: str, encoding: str) -> str:
    """``text`` as one RFC 2047 encoded word."""
    data = text.encode(charset)
    if encoding == "B":
        return f"=?{charset}?B?{base64.b64encode(data).decode()}?="
    return f"=?{charset}?Q?{quopri.encodestring(data, header=True).decode()}?="


def message(
    body: bytes,
    *,
    ctype: str = "text/plain; charset=utf-8",
    cte: str = "8bit",
    head: bytes = b"From: Sender <s@example.com>\r\nTo: r@example.org\r\nSubject: x\r\n",
) -> bytes:
    return (
        head
        + b"MIME-Version: 1.0\r\nContent-Type: "
        + ctype.encode()
        + b"\r\nContent-Transfer-Encoding: "
        + cte.encode()
        + b"\r\n\r\n"
        + encode_body(body, cte).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    )


def mixed(*parts: str | bytes, text: str = "see attached") -> bytes:
    """A multipart/mixed message: a text body, then ``parts`` (headers, blank line, body)."""
    out = crlf(
        "From: s@example.com\nTo: r@example.org\nSubject: parts\nMIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="MIX"\n\n'
        f"--MIX\nContent-Type: text/plain; charset=utf-8\n\n{text}\n"
    )
    for part in parts:
        data = crlf(part) if isinstance(part, str) else part
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        out += b"--MIX\r\n" + data.rstrip(b"\r\n") + b"\r\n"
    return out + b"--MIX--\r\n"


def charset_warnings(sent: Sent) -> list[str]:
    return [w for w in sent.warnings if "charset" in w or "UTF-8" in w or "decoded" in w]


# --- every charset the email package knows, in bodies, Subject and names -----------

SAMPLES = {
    "iso-8859-1": "Grüße aus Köln, café",
    "iso-8859-2": "Zażółć gęślą jaźń",
    "iso-8859-5": "Привет, мир",
    "iso-8859-7": "Καλημέρα κόσμε",
    "iso-8859-15": "Prix 5 € œuvre",
    "windows-1250": "Příliš žluťoučký kůň",
    "windows-1251": "Съешь же ещё этих булок",
    "windows-1252": "“Curly” quotes \u2013 5 € …",
    "koi8-r": "Съешь же ещё этих булок",
    "iso-2022-jp": "こんにちは世界、日本語",
    "shift_jis": "こんにちは世界、日本語",
    "euc-jp": "こんにちは世界",
    "euc-kr": "안녕하세요 세계",
    "gb2312": "你好\uff0c世界",
    "gbk": "你好\uff0c世界 鎔",
    "gb18030": "你好\uff0c世界 𠀀",
    "big5": "你好\uff0c世界",
}
TRANSFER = ("7bit", "8bit", "quoted-printable", "base64")
CHARSET_CASES = [
    (charset, cte)
    for charset, text in SAMPLES.items()
    for cte in TRANSFER
    if cte != "7bit" or text.encode(charset).isascii()
]


@adapters
@pytest.mark.parametrize(("charset", "cte"), CHARSET_CASES)
def test_body_subject_and_names_in_every_charset(
    send: Callable[[bytes], Sent], charset: str, cte: str
) -> None:
    text = SAMPLES[charset]
    encoding = "B" if cte == "base64" else "Q"
    head = (
        f"From: {word(text, charset, encoding)} <s@example.com>\r\n"
        f"To: {word(text, charset, encoding)} <r@example.org>\r\n"
        f"Subject: {word(text, charset, encoding)}\r\n"
    ).encode()
    body = f"{text}\n{text}\n".encode(charset)
    sent = send(message(body, ctype=f"text/plain; charset={charset}", cte=cte, head=head))
    assert sent.text is not None and sent.text.splitlines() == [text, text]
    assert (sent.subject, sent.from_name, sent.to_names) == (text, text, (text,))
    assert charset_warnings(sent) == []


@adapters
@pytest.mark.parametrize(
    "charset", ["windows-1251", "koi8-r", "iso-8859-15", "shift_jis", "euc-kr", "gb2312"]
)
def test_raw_8bit_headers_are_read_in_the_charset_of_the_text(
    send: Callable[[bytes], Sent], charset: str
) -> None:
    text = SAMPLES[charset].replace("\uff0c", " ")
    head = (
        b"From: " + text.encode(charset) + b" <s@example.com>\r\nTo: r@example.org\r\n"
        b"Subject: " + text.encode(charset) + b"\r\n"
    )
    sent = send(message(text.encode(charset), ctype=f"text/plain; charset={charset}", head=head))
    assert (sent.subject, sent.from_name, sent.text) == (text, text, text)
    notes = [w for w in sent.warnings if "not UTF-8" in w]
    assert len(notes) == 2 and all(charset in w for w in notes), sent.warnings


@adapters
def test_raw_iso_2022_jp_headers(send: Callable[[bytes], Sent]) -> None:
    text = "会議のお知らせ"
    head = (
        b"From: " + text.encode("iso-2022-jp") + b" <s@example.com>\r\nTo: r@example.org\r\n"
        b"Subject: " + text.encode("iso-2022-jp") + b"\r\n"
    )
    sent = send(message(b"hi", head=head))
    assert (sent.subject, sent.from_name) == (text, text)
    assert any("ISO-2022-JP" in w for w in sent.warnings)


# Body bytes, the charset label (None: no charset parameter), what a client shows, and
# the warning that must name the guess.
WRONG_LABELS = {
    "utf-8 declared latin-1": ("Grüße €".encode(), "iso-8859-1", "Grüße €", "is UTF-8"),
    "utf-8 declared windows-1252": ("Ещё".encode(), "windows-1252", "Ещё", "is UTF-8"),
    "windows-1252 declared latin-1": (
        "“q” € …".encode("cp1252"),
        "iso-8859-1",
        "“q” € …",
        "is windows-1252",
    ),
    "windows-1252 declared us-ascii": (
        "“q” €".encode("cp1252"),
        "us-ascii",
        "“q” €",
        "outside it",
    ),
    "windows-1252 declared utf-8": (
        "“q” café".encode("cp1252"),
        "utf-8",
        "“q” café",
        "windows-1252",
    ),
    "gbk declared gb2312": ("你好 鎔".encode("gbk"), "gb2312", "你好 鎔", "decoded as gbk"),
    "windows-31j declared shift_jis": (
        "\u2460\uff5e".encode("cp932"),
        "shift_jis",
        "\u2460\uff5e",
        "cp932",
    ),
    "cp949 declared euc-kr": ("똠방각하".encode("cp949"), "euc-kr", "똠방각하", "cp949"),
    "big5-hkscs declared big5": ("你好 㗎".encode("big5hkscs"), "big5", "你好 㗎", "big5hkscs"),
    "iso-2022-jp without a label": (
        "こんにちは".encode("iso-2022-jp"),
        None,
        "こんにちは",
        "ISO-2022-JP",
    ),
    "windows-1252 without a label": (
        "“q” café".encode("cp1252"),
        None,
        "“q” café",
        "no charset decoded as windows-1252",
    ),
    "unknown label": ("café".encode("latin-1"), "x-no-such-charset", "café", "unknown charset"),
}


@adapters
@pytest.mark.parametrize("cte", ["8bit", "quoted-printable", "base64"])
@pytest.mark.parametrize("case", WRONG_LABELS.keys())
def test_missing_or_wrong_label_gives_the_best_reading_and_says_so(
    send: Callable[[bytes], Sent], case: str, cte: str
) -> None:
    data, label, expected, note = WRONG_LABELS[case]
    ctype = f"text/plain; charset={label}" if label else "text/plain"
    sent = send(message(data, ctype=ctype, cte=cte))
    assert sent.text is not None and sent.text.rstrip("\r\n") == expected
    assert any(note in w for w in sent.warnings), sent.warnings


@adapters
def test_unlabelled_text_takes_the_charset_the_message_names(
    send: Callable[[bytes], Sent],
) -> None:
    text = "お世話になっております"
    head = (
        f"From: s@example.com\r\nTo: r@example.org\r\nSubject: {word('件名', 'shift_jis', 'B')}\r\n"
    ).encode()
    sent = send(message(text.encode("shift_jis"), ctype="text/plain", head=head))
    assert sent.subject == "件名"
    assert sent.text == text
    assert any("shift_jis, the message's charset" in w for w in sent.warnings)


@adapters
@pytest.mark.parametrize(
    ("encoded", "expected", "note"),
    [
        (word("你好 鎔", "gbk", "B").replace("gbk", "gb2312"), "你好 鎔", "gbk"),
        ("=?iso-8859-1?Q?=93quoted=94_=80?=", "“quoted” €", "windows-1252"),
        ("=?us-ascii?Q?caf=C3=A9?=", "café", "utf-8"),
        ("=?x-no-such-charset?Q?caf=E9?=", "café", "unknown charset"),
    ],
)
def test_encoded_words_under_a_wrong_label(
    send: Callable[[bytes], Sent], encoded: str, expected: str, note: str
) -> None:
    head = (
        f"From: {encoded} <s@example.com>\r\nTo: {encoded} <r@example.org>\r\n"
        f"Subject: {encoded}\r\n"
    ).encode()
    sent = send(message(b"hi", head=head))
    assert (sent.subject, sent.from_name, sent.to_names) == (expected, expected, (expected,))
    assert any(note in w for w in sent.warnings), sent.warnings


# --- filenames ----------------------------------------------------------------------

FILENAMES = {
    "RFC 2231 continuations and charset": (
        "Content-Type: application/pdf\nContent-Disposition: attachment;\n"
        " filename*0*=utf-8''%E2%82%AC%20Rapport;\n filename*1*=%20%C3%A9t%C3%A9;\n"
        " filename*2=.pdf\n",
        "€ Rapport été.pdf",
    ),
    "RFC 2231 charset and language": (
        "Content-Type: application/pdf\n"
        "Content-Disposition: attachment; filename*=iso-8859-1'fr'r%E9sum%E9.pdf\n",
        "résumé.pdf",
    ),
    "RFC 2231 Shift_JIS in the name parameter": (
        "Content-Type: application/pdf; name*=shift_jis''%93%FA%96%7B.pdf\n",
        "日本.pdf",
    ),
    "RFC 2231 quoted continuations": (
        'Content-Type: application/pdf\nContent-Disposition: attachment;\n filename*0="very long ";'
        '\n filename*1="name.pdf"\n',
        "very long name.pdf",
    ),
    "RFC 2047 in a quoted filename": (
        "Content-Type: application/pdf\n"
        'Content-Disposition: attachment; filename="=?iso-2022-jp?B?GyRCRnxLXDhsGyhC?=.pdf"\n',
        "日本語.pdf",
    ),
    "RFC 2047 words split": (
        "Content-Type: application/pdf\nContent-Disposition: attachment;\n"
        ' filename="=?utf-8?Q?r=C3=A9sum=C3=A9?= =?utf-8?Q?_final?=.pdf"\n',
        "résumé final.pdf",
    ),
    "RFC 2047 under a wrong label": (
        "Content-Type: application/pdf\nContent-Disposition: attachment;"
        f' filename="{word("你好 鎔", "gbk", "B").replace("gbk", "gb2312")}.pdf"\n',
        "你好 鎔.pdf",
    ),
    "raw UTF-8": (
        'Content-Type: application/pdf\nContent-Disposition: attachment; filename="résumé.pdf"\n',
        "résumé.pdf",
    ),
}


@adapters
@pytest.mark.parametrize("case", FILENAMES.keys())
def test_attachment_filenames(send: Callable[[bytes], Sent], case: str) -> None:
    headers, expected = FILENAMES[case]
    sent = send(mixed(headers + "Content-Transfer-Encoding: base64\n\nJVBERg==\n"))
    assert [(name, data) for name, _, data in sent.attachments] == [(expected, b"%PDF")]


@adapters
def test_raw_8bit_filename_in_the_message_charset(send: Callable[[bytes], Sent]) -> None:
    part = (
        b'Content-Type: application/pdf\nContent-Disposition: attachment; filename="'
        + "日本.pdf".encode("shift_jis")
        + b'"\n\n%PDF\n'
    )
    raw = mixed(part).replace(b"charset=utf-8", b"charset=shift_jis")
    sent = send(raw)
    assert [name for name, _, _ in sent.attachments] == ["日本.pdf"]
    assert any("filename" in w and "shift_jis" in w for w in sent.warnings), sent.warnings


@adapters
def test_nameless_attachment_gets_a_name_and_a_warning(send: Callable[[bytes], Sent]) -> None:
    sent = send(
        mixed("Content-Type: application/pdf\nContent-Transfer-Encoding: base64\n\nJVBERg==")
    )
    assert [(n, t, d) for n, t, d in sent.attachments] == [
        ("attachment-1.pdf", "application/pdf", b"%PDF")
    ]
    assert any("had no filename: attachment-1.pdf" in w for w in sent.warnings)


def test_zero_byte_attachment() -> None:
    raw = mixed("Content-Type: text/plain\nContent-Disposition: attachment; filename=empty.txt\n\n")
    # SendGrid refuses an empty attachment (content minLength 1): dropped, said so.
    sent = via_sendgrid(raw)
    assert sent.attachments == ()
    assert any("attachment 1 is empty and was dropped" in w for w in sent.warnings)
    # Postmark takes it.
    assert via_postmark(raw).attachments == (("empty.txt", "text/plain", b""),)


# --- a forwarded message stays an attachment -----------------------------------------

INNER = crlf(
    "From: Alice <alice@example.net>\nTo: bob@example.org\nSubject: the original\n"
    "X-Long: a header line that is longer than seventy-eight characters, kept as it was"
    " written, unfolded\n"
    "X-Folded: one\n\ttwo\nX-Eight-Bit: Grüße, raw UTF-8\nX-Word: =?utf-8?q?caf=C3=A9?=\n"
    "Date: Tue, 01 Oct 2024 10:00:00 +0000\nMessage-ID: <orig@example.net>\n"
    'MIME-Version: 1.0\nContent-Type: multipart/alternative; boundary="ALT"\n\n'
    "--ALT\nContent-Type: text/plain; charset=utf-8\n\nthe original text\nFrom here on, as is\n"
    "--ALT\nContent-Type: text/html; charset=utf-8\n\n<p>the original html</p>\n--ALT--\n"
)


@adapters
@pytest.mark.parametrize(
    ("disposition", "name"),
    [
        ("Content-Disposition: attachment; filename=original.eml\n", "original.eml"),
        ("Content-Disposition: inline\n", "attachment-1.eml"),
        ("", "attachment-1.eml"),
    ],
)
def test_forwarded_message_stays_an_attachment(
    send: Callable[[bytes], Sent], disposition: str, name: str
) -> None:
    part = b"Content-Type: message/rfc822\n" + disposition.encode() + b"\n" + INNER
    sent = send(mixed(part, text="see the message below"))
    assert sent.text is not None and sent.text.strip() == "see the message below"
    assert sent.html is None
    assert [(n, t.split(";")[0]) for n, t, _ in sent.attachments] == [(name, "message/rfc822")]
    assert sent.attachments[0][2] == INNER  # the message, byte for byte


# --- calendar invitations ------------------------------------------------------------

ICS = (
    "BEGIN:VCALENDAR\nMETHOD:REQUEST\nPRODID:-//esprelay//test//EN\nVERSION:2.0\n"
    "BEGIN:VEVENT\nUID:42@example.com\nDTSTART:20241001T100000Z\nDTEND:20241001T110000Z\n"
    "SUMMARY:Réunion\nORGANIZER:mailto:s@example.com\nATTENDEE:mailto:r@example.org\n"
    "END:VEVENT\nEND:VCALENDAR"
).replace("\n", "\r\n")
OUTLOOK_INVITE = crlf(
    "From: s@example.com\nTo: r@example.org\nSubject: Invitation\nMIME-Version: 1.0\n"
    'Content-Type: multipart/alternative; boundary="ALT"\n\n'
    "--ALT\nContent-Type: text/plain; charset=utf-8\n\nYou are invited.\n"
    "--ALT\nContent-Type: text/html; charset=utf-8\n\n<p>You are invited.</p>\n"
    '--ALT\nContent-Type: text/calendar; charset="utf-8"; method=REQUEST\n'
    "Content-Transfer-Encoding: 8bit\n\n" + ICS + "\n--ALT--\n"
)
ATTACHED_INVITE = mixed(
    "Content-Type: text/calendar; charset=utf-8; method=REQUEST; name=invite.ics\n"
    "Content-Disposition: attachment; filename=invite.ics\n"
    "Content-Transfer-Encoding: base64\n\n" + base64.encodebytes(ICS.encode()).decode(),
    text="You are invited.",
)


def test_calendar_invitation_to_sendgrid_keeps_its_method() -> None:
    # SendGrid's attachment type takes no ";": the invitation is a content entry.
    sent = via_sendgrid(OUTLOOK_INVITE)
    assert (sent.text, sent.html) == ("You are invited.", "<p>You are invited.</p>")
    assert sent.extra_content == {"text/calendar; method=REQUEST": ICS}
    assert sent.attachments == ()
    # An invitation attached as a file is also sent as the file.
    sent = via_sendgrid(ATTACHED_INVITE)
    assert sent.extra_content == {"text/calendar; method=REQUEST": ICS}
    assert sent.attachments == (("invite.ics", "text/calendar", ICS.encode()),)


def test_calendar_invitation_to_postmark_keeps_its_content_type() -> None:
    sent = via_postmark(OUTLOOK_INVITE)
    assert sent.attachments == (
        ("attachment-1.ics", "text/calendar; charset=utf-8; method=REQUEST", ICS.encode()),
    )
    sent = via_postmark(ATTACHED_INVITE)
    assert sent.attachments == (
        ("invite.ics", "text/calendar; charset=utf-8; method=REQUEST", ICS.encode()),
    )


@adapters
def test_other_content_type_parameters(send: Callable[[bytes], Sent]) -> None:
    raw = mixed(
        "Content-Type: text/plain; charset=iso-8859-1; format=flowed; name=notes.txt\n"
        "Content-Disposition: attachment; filename=notes.txt\n\nnotes",
        "Content-Type: application/pdf; x-unix-mode=0644; name=a.pdf\n"
        "Content-Disposition: attachment; filename=a.pdf\n\n%PDF",
    )
    sent = send(raw)
    types = [t for _, t, _ in sent.attachments]
    if send is via_postmark:
        assert types == [
            "text/plain; charset=iso-8859-1; format=flowed",
            "application/pdf; x-unix-mode=0644",
        ]
    else:
        assert types == ["text/plain", "application/pdf"]
        (note,) = [w for w in sent.warnings if "lost its parameters" in w]
        assert "charset=iso-8859-1; format=flowed" in note and "x-unix-mode" not in note


# --- end to end: SMTP in, each ESP's fake out ------------------------------------------


def _send(relay: RelayProcess, raw: bytes) -> None:
    import smtplib

    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
        smtp.sendmail("s@example.com", ["r@example.org"], raw)


FIDELITY_MESSAGES = {
    "charset": message(
        SAMPLES["shift_jis"].encode("shift_jis"),
        ctype="text/plain; charset=shift_jis",
        head=(
            "From: s@example.com\r\nTo: r@example.org\r\n"
            f"Subject: {word(SAMPLES['big5'], 'big5', 'B')}\r\n"
        ).encode(),
    ),
    "invite": OUTLOOK_INVITE.replace(b"Subject: Invitation", b"Subject: invite"),
    "forward": mixed(b"Content-Type: message/rfc822\n\n" + INNER).replace(
        b"Subject: parts", b"Subject: forward"
    ),
}


def test_end_to_end_sendgrid(relay_factory: type[RelayProcess]) -> None:
    with FakeESP(test_sendgrid.SendGridAPI()) as esp:
        relay = relay_factory(test_sendgrid.relay_env(esp)).start()
        for raw in FIDELITY_MESSAGES.values():
            _send(relay, raw)
        esp.wait_for(len(FIDELITY_MESSAGES))
    payloads = {r.json()["subject"]: r.json() for r in esp.requests}
    charset = payloads[SAMPLES["big5"]]
    (text,) = charset["content"]
    assert (text["type"], text["value"].rstrip("\r\n")) == ("text/plain", SAMPLES["shift_jis"])
    invite = payloads["invite"]
    assert invite["content"][2] == {"type": "text/calendar; method=REQUEST", "value": ICS}
    (forward,) = payloads["forward"]["attachments"]
    assert forward["type"] == "message/rfc822"
    assert base64.b64decode(forward["content"]) == INNER


def test_end_to_end_postmark(relay_factory: type[RelayProcess]) -> None:
    with FakeESP(test_postmark.PostmarkAPI()) as esp:
        relay = relay_factory(test_postmark.relay_env(esp)).start()
        for raw in FIDELITY_MESSAGES.values():
            _send(relay, raw)
        esp.wait_for(len(FIDELITY_MESSAGES))
    payloads = {r.json()["Subject"]: r.json() for r in esp.requests}
    assert payloads[SAMPLES["big5"]]["TextBody"].rstrip("\r\n") == SAMPLES["shift_jis"]
    (invite,) = payloads["invite"]["Attachments"]
    assert invite["ContentType"] == "text/calendar; charset=utf-8; method=REQUEST"
    assert base64.b64decode(invite["Content"]) == ICS.encode()
    (forward,) = payloads["forward"]["Attachments"]
    assert forward["ContentType"] == "message/rfc822"
    assert base64.b64decode(forward["Content"]) == INNER


# --- the default path reads all of this as the reference path does -------------------


def every_message() -> list[bytes]:
    out = [OUTLOOK_INVITE, ATTACHED_INVITE, *FIDELITY_MESSAGES.values()]
    for charset, text in SAMPLES.items():
        head = (
            f"Subject: {word(text, charset, 'B')}\r\nFrom: {word(text, charset, 'Q')} <s@x.org>\r\n"
        )
        out.append(message(text.encode(charset), ctype=f"text/plain; charset={charset}"))
        out.append(message(b"hi", head=head.encode()))
        out.append(
            message(
                text.encode(charset),
                ctype="text/plain",
                head=b"Subject: " + text.encode(charset) + b"\r\n",
            )
        )
    for data, label, _, _ in WRONG_LABELS.values():
        out.append(message(data, ctype=f"text/plain; charset={label}" if label else "text/plain"))
    for headers, _ in FILENAMES.values():
        out.append(mixed(headers + "\n%PDF\n"))
    return out


def test_default_path_equals_the_reference() -> None:
    for raw in every_message():
        assert parse(raw, ENVELOPE) == parse(raw, ENVELOPE, exact=True), raw[:200]


@adapters
@pytest.mark.parametrize("cte", ["base64", "quoted-printable"])
def test_forwarded_message_in_a_transfer_encoding(send: Callable[[bytes], Sent], cte: str) -> None:
    # RFC 2046 forbids it on message/rfc822, but some clients forward so.
    part = (
        f"Content-Type: message/rfc822\nContent-Transfer-Encoding: {cte}\n"
        "Content-Disposition: attachment; filename=original.eml\n\n"
    ).encode() + encode_body(INNER, cte)
    sent = send(mixed(part))
    assert [(n, d) for n, _, d in sent.attachments] == [("original.eml", INNER)]
