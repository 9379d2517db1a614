"""A corpus of messages with what each one must arrive as, for every JSON provider.

Each :class:`Case` is the exact bytes an SMTP client sends, its envelope, and the
expected parsed result: recipients by kind, subject, bodies, attachments (by sha256)
and custom headers.  Tests look a case up by its ``X-Case`` header.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP

# Bytes 0..255 twice and some more: every byte value survives or the hash differs.
BINARY = bytes(range(256)) * 2 + b"\x00\r\n\x1a\xff"
PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00"
    b"\x00\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N"
    b"\x00\x00\x00\x00IEND\xaeB`\x82"
)
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Att:
    filename: str
    content_type: str
    sha256: str
    content_id: str | None = None  # set for inline parts


@dataclass(frozen=True)
class Case:
    id: str
    raw: bytes
    mail_from: str
    rcpts: tuple[str, ...]
    from_addr: str
    to: tuple[str, ...]
    cc: tuple[str, ...]
    bcc: tuple[str, ...]
    subject: str | None
    text: str | None
    html: str | None
    attachments: tuple[Att, ...] = ()
    headers: dict[str, str] = field(default_factory=dict)
    #: Addresses that must never be visible (in a header or a To/Cc field).
    hidden: tuple[str, ...] = ()
    #: Substrings expected among the provider warnings.
    warnings: tuple[str, ...] = ()


def crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")


def _utf8_alternative() -> Case:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = "Jürgen Müller <app@example.com>"
    msg["To"] = '"Müller, Hans" <hans@example.org>, ops@example.org'
    msg["Cc"] = "Team <team@Example.NET>"
    msg["Reply-To"] = "Support <support@example.com>"
    msg["Subject"] = "Grüße aus Köln — 日本語の件名"
    msg["Message-ID"] = "<utf8-alt@example.com>"
    msg["Date"] = "Tue, 01 Oct 2024 10:00:00 +0000"
    msg["In-Reply-To"] = "<parent@example.com>"
    msg["References"] = "<root@example.com> <parent@example.com>"
    msg["X-Case"] = "utf8-alternative"
    msg["X-Mailer"] = "corpus 1.0"
    msg["List-Unsubscribe"] = "<mailto:unsub@example.com>"
    msg.set_content("Grüße, Jürgen!\n€ 10 — ½ — こんにちは\n")
    msg.add_alternative("<p>Grüße, <b>Jürgen</b>! こんにちは</p>\n", subtype="html")
    return Case(
        id="utf8-alternative",
        raw=msg.as_bytes(),
        mail_from="bounce@example.com",
        rcpts=("hans@example.org", "ops@example.org", "team@example.net"),
        from_addr="app@example.com",
        to=("hans@example.org", "ops@example.org"),
        cc=("team@example.net",),
        bcc=(),
        subject="Grüße aus Köln — 日本語の件名",
        text="Grüße, Jürgen!\n€ 10 — ½ — こんにちは\n",
        html="<p>Grüße, <b>Jürgen</b>! こんにちは</p>\n",
        headers={
            "X-Mailer": "corpus 1.0",
            "Message-ID": "<utf8-alt@example.com>",
            "In-Reply-To": "<parent@example.com>",
            "References": "<root@example.com> <parent@example.com>",
            "List-Unsubscribe": "<mailto:unsub@example.com>",
        },
    )


def _latin1() -> Case:
    head = crlf(
        "From: Legacy App <legacy@example.com>\n"
        "To: ops@example.org\n"
        "Subject: =?ISO-8859-1?Q?Gr=FC=DFe_aus_K=F6ln?=\n"
        "Message-ID: <latin1@example.com>\n"
        "Date: Tue, 01 Oct 2024 10:00:00 +0000\n"
        "X-Case: latin1\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=iso-8859-1\n"
        "Content-Transfer-Encoding: 8bit\n\n"
    )
    body = "Grüße aus Köln, ½ Preis, © 2024\r\n".encode("latin-1")
    return Case(
        id="latin1",
        raw=head + body,
        mail_from="legacy@example.com",
        rcpts=("ops@example.org",),
        from_addr="legacy@example.com",
        to=("ops@example.org",),
        cc=(),
        bcc=(),
        subject="Grüße aus Köln",
        text="Grüße aus Köln, ½ Preis, © 2024\n",
        html=None,
    )


def _related_with_attachments() -> Case:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = "reports@example.com"
    msg["To"] = "ops@example.org"
    msg["Subject"] = "=?utf-8?b?UmVwb3J0IMOcYmVyc2ljaHQ=?="  # already encoded: "Report Übersicht"
    msg["Message-ID"] = "<related@example.com>"
    msg["X-Case"] = "related"
    msg.set_content("See the chart.\n")
    msg.add_alternative('<p>Chart: <img src="cid:chart@example.com"></p>\n', subtype="html")
    html = msg.get_payload()[1]
    html.add_related(PNG, "image", "png", cid="<chart@example.com>")
    msg.add_attachment(PDF, "application", "pdf", filename="Übersicht März.pdf")
    msg.add_attachment(BINARY, "application", "octet-stream", filename="données.dat")
    return Case(
        id="related",
        raw=msg.as_bytes(),
        mail_from="reports@example.com",
        rcpts=("ops@example.org",),
        from_addr="reports@example.com",
        to=("ops@example.org",),
        cc=(),
        bcc=(),
        subject="Report Übersicht",
        text="See the chart.\n",
        html='<p>Chart: <img src="cid:chart@example.com"></p>\n',
        attachments=(
            Att("attachment-1.png", "image/png", sha(PNG), "chart@example.com"),
            Att("Übersicht März.pdf", "application/pdf", sha(PDF)),
            Att("données.dat", "application/octet-stream", sha(BINARY)),
        ),
        warnings=("had no filename",),
    )


def _bcc_and_envelope_only() -> Case:
    raw = crlf(
        "From: app@example.com\n"
        "To: Visible <visible@example.org>\n"
        "Bcc: Secret <secret@example.org>\n"
        "Subject: with a Bcc\n"
        "Message-ID: <bcc@example.com>\n"
        "X-Case: bcc\n\n"
        "Only visible@ is shown.\n"
    )
    return Case(
        id="bcc",
        raw=raw,
        mail_from="app@example.com",
        rcpts=("visible@example.org", "secret@example.org", "envelope-only@example.org"),
        from_addr="app@example.com",
        to=("visible@example.org",),
        cc=(),
        bcc=("secret@example.org", "envelope-only@example.org"),
        subject="with a Bcc",
        text="Only visible@ is shown.\n",
        html=None,
        hidden=("secret@example.org", "envelope-only@example.org"),
    )


def _printer() -> Case:
    # What scanners and printers send: a bare address as display name, no Date,
    # no Message-ID, an attachment without a filename.
    raw = crlf(
        "From: scanner@example.com <scanner@example.com>\n"
        "To: ops@example.org\n"
        "Subject: Scanned document\n"
        "X-Case: printer\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="b1"\n\n'
        "--b1\n"
        "Content-Type: text/plain\n\n"
        "Scan attached.\n"
        "--b1\n"
        "Content-Type: image/jpeg\n"
        "Content-Transfer-Encoding: base64\n\n"
        "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAP8=\n"
        "--b1--\n"
    )
    import base64

    jpeg = base64.b64decode("/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAP8=")
    return Case(
        id="printer",
        raw=raw,
        mail_from="scanner@example.com",
        rcpts=("ops@example.org",),
        from_addr="scanner@example.com",
        to=("ops@example.org",),
        cc=(),
        bcc=(),
        subject="Scanned document",
        text="Scan attached.",  # the line break before a boundary belongs to it
        html=None,
        attachments=(Att("attachment-1.jpg", "image/jpeg", sha(jpeg)),),
        warnings=("had no filename",),
    )


def corpus() -> list[Case]:
    return [
        _utf8_alternative(),
        _latin1(),
        _related_with_attachments(),
        _bcc_and_envelope_only(),
        _printer(),
    ]
