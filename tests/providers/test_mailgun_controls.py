"""Mailgun's SMTP control headers (X-Mailgun-Tag, X-Mailgun-Variables, ...): each one
becomes its messages.mime field and leaves the MIME, against the fake Mailgun that
checks those fields as Mailgun's API reference documents them; a malformed one is
refused at the end of DATA, end to end through a real relay."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator

import httpx
import pytest

from esprelay.errors import MessageRejected
from esprelay.message import header as header_module
from esprelay.message import rawmime
from esprelay.models import Envelope, OutboundMessage
from esprelay.providers import mailgun as mailgun_module
from esprelay.testing.fakeesp import FakeESP, Recorded
from tests.providers.test_mailgun import (
    DOMAIN,
    KEY,
    form_fields,
    mailgun,
    mailgun_env,
    provider,
)
from tests.relayproc import RelayProcess
from tests.test_e2e_smtp import queued_id, send_raw

TOP = b"From: App <app@example.com>\r\nTo: ops@example.org\r\nSubject: hello\r\n"
BOTTOM = b"X-Custom: kept\r\nContent-Type: text/plain\r\n\r\nHello, X-Mailgun-Tag: body\r\n"
RCPTS = ("ops@example.org",)


def message_with(controls: bytes) -> bytes:
    return TOP + controls + BOTTOM


def options_of(request: Recorded, ours: str = "m1") -> list[tuple[str, str]]:
    """The send options of ``request`` but the last, which is esprelay's id ``ours``."""
    options = [
        (name, value.decode())
        for name, filename, value in form_fields(request)
        if name not in ("to", "message")
    ]
    assert options[-1] == ("v:esprelay_id", ours)
    return options[:-1]


def sent_mime(request: Recorded) -> bytes:
    (mime,) = [value for name, _, value in form_fields(request) if name == "message"]
    return mime


async def send(esp: FakeESP, raw: bytes) -> Recorded:
    message = OutboundMessage("m1", Envelope("app@example.com", RCPTS), raw)
    async with httpx.AsyncClient() as client:
        mg = provider(client, esp.url)
        assert mg.refusal(message) is None
        result = await mg.send(message)
    assert result.provider_message_id and result.provider_message_id.endswith(f"@{DOMAIN}")
    return esp.requests[-1]


@pytest.fixture(scope="module")
def esp() -> Iterator[FakeESP]:
    with FakeESP(mailgun) as fake:
        yield fake


# -- each header, against the fake -------------------------------------------------

CASES = [
    pytest.param(b"X-Mailgun-Tag: welcome\r\n", [("o:tag", "welcome")], id="tag"),
    pytest.param(
        b"X-Mailgun-Tag: signup\r\nX-Mailgun-Tag: September newsletter\r\n"
        b"X-Mailgun-Tag: =?utf-8?q?week_36?=\r\n",
        [("o:tag", "signup"), ("o:tag", "September newsletter"), ("o:tag", "week 36")],
        id="tags-repeated-and-encoded-word",
    ),
    pytest.param(
        b"".join(b"X-Mailgun-Tag: t%d\r\n" % i for i in range(10)),
        [("o:tag", f"t{i}") for i in range(10)],
        id="ten-tags",
    ),
    pytest.param(
        b'X-Mailgun-Variables: {"first_name": "J\xc3\xbcrgen", "order": 123,\r\n'
        b'\t"items": [1, "two"], "vip": true}\r\n',
        [
            ("v:first_name", "Jürgen"),
            ("v:order", "123"),
            ("v:items", '[1,"two"]'),
            ("v:vip", "true"),
        ],
        id="variables-folded-utf8-json-values",
    ),
    pytest.param(  # as Python's email package writes {"name": "Jürgen Müller", ...}
        b'X-Mailgun-Variables: {"name": =?utf-8?b?IkrDvHJnZW4gTcO8bGxlciIsICJjaXR5Ijog?=\r\n'
        b' =?utf-8?q?=22Z=C3=BCrich=22=2C?=  "n": 1, "url": "https://x.example/?a=?b"}\r\n',
        [
            ("v:name", "Jürgen Müller"),
            ("v:city", "Zürich"),
            ("v:n", "1"),
            ("v:url", "https://x.example/?a=?b"),
        ],
        id="variables-encoded-words",
    ),
    pytest.param(
        b'X-Mailgun-Variables: {"a": "1", "b": "2"}\r\nX-Mailgun-Variables: {"b": "3"}\r\n',
        [("v:a", "1"), ("v:b", "3")],
        id="variables-headers-combined",
    ),
    pytest.param(b"X-Mailgun-Track: no\r\n", [("o:tracking", "no")], id="track"),
    pytest.param(
        b"X-Mailgun-Track-Clicks: HTMLonly\r\n", [("o:tracking-clicks", "htmlonly")], id="clicks"
    ),
    pytest.param(b"X-Mailgun-Track-Opens: yes\r\n", [("o:tracking-opens", "yes")], id="opens"),
    pytest.param(
        b"X-Mailgun-Track-Pixel-Location-Top: true\r\n",
        [("o:tracking-pixel-location-top", "true")],
        id="pixel-top",
    ),
    pytest.param(b"X-Mailgun-Dkim: no\r\n", [("o:dkim", "no")], id="dkim"),
    pytest.param(
        b"X-Mailgun-Secondary-DKIM: example.com,s1\r\n"
        b"X-Mailgun-Secondary-DKIM-Public: public.example.com/s2\r\n",
        [
            ("o:secondary-dkim", "example.com/s1"),
            ("o:secondary-dkim-public", "public.example.com/s2"),
        ],
        id="secondary-dkim",
    ),
    pytest.param(b"X-Mailgun-Drop-Message: yes\r\n", [("o:testmode", "yes")], id="drop-yes"),
    pytest.param(b"X-Mailgun-Drop-Message: no\r\n", [], id="drop-no"),
    pytest.param(
        b"X-Mailgun-Sending-Ip: 192.0.2.10\r\nX-Mailgun-Sending-Ip-Pool: 5f1a9c0e2b\r\n",
        [("o:sending-ip", "192.0.2.10"), ("o:sending-ip-pool", "5f1a9c0e2b")],
        id="sending-ip-and-pool",
    ),
    pytest.param(
        b"X-Mailgun-Require-TLS: yes\r\nX-Mailgun-Skip-Verification: false\r\n",
        [("o:require-tls", "yes"), ("o:skip-verification", "false")],
        id="tls",
    ),
    pytest.param(
        b"X-Mailgun-Deliver-By: Fri, 14 Oct 2011 12:00:00 -0000\r\n",
        [("o:deliverytime", "Fri, 14 Oct 2011 12:00:00 +0000")],
        id="deliver-by",
    ),
    pytest.param(
        b"X-Mailgun-Deliver-By: 14 Oct 2011 14:00:00 +0200\r\n",
        [("o:deliverytime", "Fri, 14 Oct 2011 14:00:00 +0200")],
        id="deliver-by-no-weekday",
    ),
    pytest.param(
        b"X-Mailgun-Delivery-Time-Optimize-Period: 48h\r\n"
        b"X-Mailgun-Time-Zone-Localize: 09:30am\r\n",
        [("o:deliverytime-optimize-period", "48h"), ("o:time-zone-localize", "09:30am")],
        id="sto-and-tzo",
    ),
    pytest.param(
        b"X-Mailgun-Template-Name: welcome\r\nX-Mailgun-Template-Version: v2\r\n"
        b'X-Mailgun-Template-Variables: {"name": "Ann"}\r\n',
        [("template", "welcome"), ("t:version", "v2"), ("t:variables", '{"name": "Ann"}')],
        id="template",
    ),
    pytest.param(
        b'X-Mailgun-Recipient-Variables: {"ops@example.org": {"id": 1}}\r\n',
        [("recipient-variables", '{"ops@example.org": {"id": 1}}')],
        id="recipient-variables",
    ),
]


@pytest.mark.parametrize(("controls", "options"), CASES)
async def test_control_header_becomes_its_field(
    esp: FakeESP, controls: bytes, options: list[tuple[str, str]]
) -> None:
    request = await send(esp, message_with(controls))
    assert options_of(request) == options
    assert sent_mime(request) == message_with(b"")  # the headers are gone, nothing else


async def test_other_x_mailgun_headers_stay(esp: FakeESP) -> None:
    """Headers outside Mailgun's table (X-Mailgun-Sid, the deprecated Campaign-Id) are
    not instructions esprelay knows: they stay as they are, next to translated ones."""
    raw = message_with(
        b"X-Mailgun-Sid: WyI0ZjQ5YiJd\r\nX-Mailgun-Tag: a\r\nX-Mailgun-Campaign-Id: c1\r\n"
    )
    request = await send(esp, raw)
    assert options_of(request) == [("o:tag", "a")]
    assert sent_mime(request) == raw.replace(b"X-Mailgun-Tag: a\r\n", b"")


async def test_bcc_and_controls_removed_together(esp: FakeESP) -> None:
    raw = message_with(b"Bcc: hidden@example.net\r\nX-Mailgun-Track: yes\r\n")
    message = OutboundMessage("m1", Envelope("app@example.com", RCPTS), raw)
    async with httpx.AsyncClient() as client:
        result = await provider(client, esp.url).send(message)
    assert result.warnings == (
        "removed 1 Bcc header field(s); their recipients still get the message through the"
        " envelope",
    )
    assert sent_mime(esp.requests[-1]) == message_with(b"")
    assert options_of(esp.requests[-1]) == [("o:tracking", "yes")]


async def test_obsolete_bcc_still_removed(esp: FakeESP) -> None:
    """The quick check for Bcc reads "Bcc : x" (obsolete form, white space before the
    colon) as a Bcc field, as strip_bcc does: a message spooled without the intake's
    repair must not show its Bcc recipients."""
    for controls in (b"", b"X-Mailgun-Tag: a\r\n"):
        raw = message_with(controls + b"Bcc : hidden@example.net\r\n")
        request = await send(esp, raw)
        assert sent_mime(request) == message_with(b"")
        assert b"hidden@example.net" not in sent_mime(request)


# -- malformed headers: refused, never dropped --------------------------------------

MALFORMED = [
    pytest.param(b"X-Mailgun-Variables: [1, 2]\r\n", "X-Mailgun-Variables: not a JSON object",
                 id="variables-not-object"),
    pytest.param(b"X-Mailgun-Variables: {first: 1}\r\n", "X-Mailgun-Variables: not valid JSON",
                 id="variables-not-json"),
    pytest.param(b'X-Mailgun-Variables: {"a": NaN}\r\n', "not valid JSON", id="variables-nan"),
    pytest.param(b'X-Mailgun-Variables: {"": 1}\r\n', "cannot be a v: field",
                 id="variables-empty-name"),
    pytest.param(b'X-Mailgun-Variables: {"a\\"b": 1}\r\n', "cannot be a v: field",
                 id="variables-quote-in-name"),
    pytest.param(b'X-Mailgun-Variables: {"a": "' + b"x" * 16500 + b'"}\r\n', "16 KB",
                 id="send-options-over-16k"),
    pytest.param(b"X-Mailgun-Tag: caf\xc3\xa9\r\n", "is not printable ASCII", id="tag-utf8"),
    pytest.param(b"X-Mailgun-Tag: =?utf-8?q?caf=C3=A9?=\r\n", "is not printable ASCII",
                 id="tag-encoded-non-ascii"),
    pytest.param(b"X-Mailgun-Tag: " + b"x" * 129 + b"\r\n", "longer than 128", id="tag-129"),
    pytest.param(b"X-Mailgun-Tag: \r\n", "an empty tag", id="tag-empty"),
    pytest.param(b"".join(b"X-Mailgun-Tag: t%d\r\n" % i for i in range(11)),
                 "11 tags; Mailgun takes at most 10", id="eleven-tags"),
    pytest.param(b"X-Mailgun-Tag: \xff\xfe\r\n", "X-Mailgun-Tag: not UTF-8", id="tag-not-utf8"),
    pytest.param(b"X-Mailgun-Track: maybe\r\n",
                 "X-Mailgun-Track: 'maybe' is not one of yes, no, true, false, htmlonly",
                 id="track-unknown"),
    pytest.param(b"X-Mailgun-Track-Opens: htmlonly\r\n", "is not one of yes, no, true, false",
                 id="opens-htmlonly"),
    pytest.param(b"X-Mailgun-Drop-Message: please\r\n", "X-Mailgun-Drop-Message: 'please'",
                 id="drop-unknown"),
    pytest.param(b"X-Mailgun-Require-TLS: 1\r\n", "X-Mailgun-Require-TLS: '1'", id="tls-1"),
    pytest.param(b"X-Mailgun-Track: yes\r\nX-Mailgun-Track: no\r\n",
                 "2 X-Mailgun-Track headers; Mailgun takes one", id="track-twice"),
    pytest.param(b"X-Mailgun-Deliver-By: tomorrow\r\n", "'tomorrow' is not an RFC 2822 date",
                 id="deliver-by-not-date"),
    pytest.param(b"X-Mailgun-Delivery-Time-Optimize-Period: 5h\r\n", "is not 24h to 72h",
                 id="sto-too-short"),
    pytest.param(b"X-Mailgun-Time-Zone-Localize: 25:00\r\n", "is not HH:mm", id="tzo-bad"),
    pytest.param(b"X-Mailgun-Sending-Ip: 192.0.2.300\r\n", "is not an IP address", id="ip-bad"),
    pytest.param(b"X-Mailgun-Sending-Ip-Pool: two words\r\n", "is not one word",
                 id="pool-bad"),
    pytest.param(b"X-Mailgun-Secondary-DKIM: example.com\r\n", "signing_domain/selector",
                 id="secondary-dkim-bad"),
    pytest.param(b"X-Mailgun-Secondary-DKIM-Public: example.com/s1\r\n",
                 "X-Mailgun-Secondary-DKIM-Public without X-Mailgun-Secondary-DKIM",
                 id="secondary-dkim-public-alone"),
    pytest.param(b"X-Mailgun-Template-Version: v2\r\n",
                 "X-Mailgun-Template-Version without X-Mailgun-Template-Name",
                 id="template-version-alone"),
    pytest.param(b"X-Mailgun-Template-Variables: 3\r\n", "not a JSON object",
                 id="template-variables-bad"),
    pytest.param(b'X-Mailgun-Recipient-Variables: {"a@example.org": 1}\r\n',
                 "a recipient's variables are not a JSON object", id="recipient-variables-bad"),
]  # fmt: skip


@pytest.mark.parametrize(("controls", "reason"), MALFORMED)
def test_malformed_control_header_is_refused(controls: bytes, reason: str) -> None:
    message = OutboundMessage("", Envelope("app@example.com", RCPTS), message_with(controls))
    mg = provider(httpx.AsyncClient(), "https://api.mailgun.net")
    why = mg.refusal(message)
    assert why is not None and reason in why
    # A message spooled before the intake refused it fails at once, with the same reason.
    with pytest.raises(MessageRejected) as info:
        mg.build_request(message)
    assert info.value.provider == "mailgun" and why in str(info.value)


def test_common_message_reads_its_header_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """No X-Mailgun-* header, no Bcc: one pass of the one header reader, at DATA and at
    delivery, and the MIME sent is the very same bytes object."""
    calls: list[int] = []
    real = header_module.read_header

    def counting(raw: bytes, *, obsolete: bool = False) -> header_module.Header:
        calls.append(len(raw))
        return real(raw, obsolete=obsolete)

    monkeypatch.setattr(mailgun_module, "read_header", counting)
    monkeypatch.setattr(rawmime, "read_header", counting)
    raw = message_with(b"X-Mailer: app 1.0\r\n")
    message = OutboundMessage("m1", Envelope("app@example.com", RCPTS), raw)
    mg = provider(httpx.AsyncClient(), "https://api.mailgun.net")
    assert mg.refusal(message) is None
    assert len(calls) == 1
    built = mg.build_request(message)
    assert len(calls) == 2
    assert built.warnings == ()
    assert raw in built.request.read()
    names = [n for n, _, _ in form_fields(Recorded("POST", "/", {}, dict(built.request.headers),
                                                   built.request.read()))]  # fmt: skip
    assert names == ["to", "v:esprelay_id", "message"]


def test_fake_mailgun_checks_the_fields() -> None:
    """The fake answers 400 where Mailgun documents a field's values or limits."""
    bad = [
        {"o:tracking": "maybe"},
        {"o:testmode": "no"},
        {"o:tracking-opens": "htmlonly"},
        {"o:deliverytime": "tomorrow"},
        {"o:deliverytime-optimize-period": "5h"},
        {"o:tag": [f"t{i}" for i in range(11)]},
        {"o:tag": "x" * 129},
        {"o:tracking": ["yes", "no"]},
        {"o:campaign": "c1"},
        {"t:version": "v2"},
        {"o:secondary-dkim-public": "a.example/s1"},
        {"t:variables": "[1]"},
        {"v:big": "x" * (16 * 1024)},
    ]
    with FakeESP(mailgun) as esp, httpx.Client(auth=("api", KEY)) as client:
        for fields in bad:
            response = client.post(
                f"{esp.url}/v3/{DOMAIN}/messages.mime",
                data={"to": "ops@example.org", **fields},
                files={"message": ("message.mime", message_with(b""), "message/rfc822")},
            )
            assert response.status_code == 400, fields
        good = client.post(
            f"{esp.url}/v3/{DOMAIN}/messages.mime",
            data={"to": "ops@example.org", "o:tag": ["a", "b"], "o:tracking": "htmlonly"},
            files={"message": ("message.mime", message_with(b""), "message/rfc822")},
        )
        assert good.status_code == 200, good.text


# -- end to end: refused at DATA, translated on the way out -------------------------

ALL = (
    b"X-Mailgun-Tag: welcome\r\n"
    b"X-Mailgun-Tag: signup\r\n"
    b'X-Mailgun-Variables: {"user_id": 42, "plan": "pro"}\r\n'
    b"X-Mailgun-Track: yes\r\n"
    b"X-Mailgun-Track-Clicks: htmlonly\r\n"
    b"X-Mailgun-Track-Opens: no\r\n"
    b"X-Mailgun-Deliver-By: Fri, 14 Oct 2011 12:00:00 +0000\r\n"
    b"X-Mailgun-Drop-Message: yes\r\n"
    b"X-Mailgun-Sending-Ip-Pool: pool-1\r\n"
    b"X-Mailgun-Sid: stays\r\n"
)


def test_end_to_end_refused_at_data_and_translated(relay_factory: type[RelayProcess]) -> None:
    with FakeESP(mailgun) as esp:
        relay = relay_factory(mailgun_env(esp.url)).start()
        bad = message_with(b"X-Mailgun-Tag: ok\r\nX-Mailgun-Variables: not json\r\n")
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("app@example.com")
            smtp.rcpt("ops@example.org")
            code, reply = smtp.data(bad)
        assert (code, reply.decode()) == (
            550,
            "5.6.0 mailgun: X-Mailgun-Variables: not valid JSON",
        )
        good = message_with(ALL)
        message_id = queued_id(send_raw(relay, "app@example.com", ["ops@example.org"], good))
        relay.wait_for_log(rf"delivered id={message_id} provider=mailgun attempt=1")
        (request,) = esp.requests  # the refused message never reached Mailgun
    assert options_of(request, ours=message_id) == [
        ("o:tag", "welcome"),
        ("o:tag", "signup"),
        ("o:testmode", "yes"),
        ("o:tracking", "yes"),
        ("o:tracking-clicks", "htmlonly"),
        ("o:tracking-opens", "no"),
        ("o:sending-ip-pool", "pool-1"),
        ("o:deliverytime", "Fri, 14 Oct 2011 12:00:00 +0000"),
        ("v:user_id", "42"),
        ("v:plan", "pro"),
    ]
    sent = sent_mime(request)
    assert sent == message_with(b"X-Mailgun-Sid: stays\r\n")
    assert b"X-Mailgun-Tag:" not in sent.split(b"\r\n\r\n")[0]
    assert "not accepted" in relay.log and "X-Mailgun-Variables: not valid JSON" in relay.log


def test_deeply_nested_variables_are_refused_not_crashed() -> None:
    """A RecursionError in the JSON reader would be answered 451 and retried."""
    deep = "[" * 100_000
    folded = "\r\n ".join(deep[i : i + 900] for i in range(0, len(deep), 900))
    raw = f"From: a@example.com\r\nX-Mailgun-Variables: {folded}\r\n\r\nb\r\n".encode()
    message = OutboundMessage("m1", Envelope("app@example.com", RCPTS), raw)
    reason = provider(httpx.AsyncClient(), "http://127.0.0.1:9").refusal(message)
    assert reason is not None and "nested too deeply" in reason
