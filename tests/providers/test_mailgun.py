"""Mailgun: the request builder offline, then esprelay end to end against a fake
Mailgun on loopback that checks what Mailgun's API reference documents for
``POST /v3/{domain}/messages.mime`` and answers as Mailgun does."""

from __future__ import annotations

import base64
import email.policy
import json
import re
import uuid
from collections.abc import Iterator
from email.parser import BytesParser

import httpx
import pytest
from pydantic import SecretStr

from esprelay.errors import MessageRejected, ProviderConfigError, ProviderUnavailable, RateLimited
from esprelay.models import Envelope, OutboundMessage
from esprelay.providers.mailgun import MailgunProvider
from esprelay.testing.fakeesp import FakeESP, Recorded, Reply
from tests.messages import corpus
from tests.providers.common import send_case
from tests.providers.errorcases import Cases, case_message
from tests.providers.rawcheck import assert_arrived_as_meant, parse, without_bcc
from tests.relayproc import RelayProcess
from tests.test_e2e_smtp import queued_id, send_raw

KEY = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0"
DOMAIN = "mg.example.com"
WELCOME = "<html><body><h1>Mailgun Magnificent API</h1></body></html>"


def form_fields(request: Recorded) -> list[tuple[str, str | None, bytes]]:
    """(name, filename, value) of each multipart/form-data field, bytes exact."""
    content_type = request.headers.get("content-type", "")
    match = re.match(r'multipart/form-data; boundary="?([^";]+)"?$', content_type)
    assert match, content_type
    delimiter = b"--" + match.group(1).encode()
    assert request.body.startswith(delimiter + b"\r\n")
    assert request.body.endswith(delimiter + b"--\r\n")
    fields = []
    for chunk in request.body.split(b"\r\n" + delimiter)[0:-1]:
        chunk = chunk.removeprefix(delimiter).removeprefix(b"\r\n")
        head, _, value = chunk.partition(b"\r\n\r\n")
        disposition = re.search(rb'name="([^"]*)"(?:; filename="([^"]*)")?', head)
        assert disposition, head
        filename = disposition.group(2).decode() if disposition.group(2) else None
        fields.append((disposition.group(1).decode(), filename, value))
    return fields


def mailgun(request: Recorded) -> Reply:
    """Validate like Mailgun's messages.mime endpoint; answer like it."""
    if request.path.startswith("/welcome"):  # a wrong base URL: Mailgun's welcome page
        return Reply(200, WELCOME, {"Content-Type": "text/html"})
    expected = "Basic " + base64.b64encode(f"api:{KEY}".encode()).decode()
    if request.headers.get("authorization") != expected:
        return Reply(401, "Forbidden")
    match = re.fullmatch(r"/v3/([^/]+)/messages\.mime", request.path)
    if request.method != "POST" or match is None:
        return Reply(404, "404 page not found")
    if match.group(1) != DOMAIN:
        return Reply(404, {"message": f"Domain not found: {match.group(1)}"})
    fields = form_fields(request)
    to = [value for name, _, value in fields if name == "to"]
    files = [(filename, value) for name, filename, value in fields if name == "message"]
    if not to:
        return Reply(400, {"message": "'to' parameter is missing"})
    if len(files) != 1 or files[0][0] is None:
        return Reply(400, {"message": "'message' parameter is missing"})
    if len(to) > 1000:
        return Reply(400, {"message": "Too many recipients"})
    if len(files[0][1]) > 25 * 1024 * 1024:
        return Reply(413, {"message": "Message size exceeds the limit"})
    problem = option_problem([(name, value.decode()) for name, f, value in fields if f is None])
    if problem:
        return Reply(400, {"message": problem})
    return Reply(200, {"id": f"<{uuid.uuid4().hex}@{DOMAIN}>", "message": "Queued. Thank you."})


# The messages.mime fields besides `to` and `message`, as the API reference documents
# them (../shared/specs/mailgun/mailgun_send_openapi.yaml): enums, formats, which need
# another, repeated o:tag; and the tag limits of Mailgun's Tags page.
YES_NO = ("yes", "no", "true", "false")
CHOICES = {
    "o:dkim": YES_NO,
    "o:testmode": ("yes",),
    "o:tracking": (*YES_NO, "htmlonly"),
    "o:tracking-clicks": (*YES_NO, "htmlonly"),
    "o:tracking-opens": YES_NO,
    "o:require-tls": YES_NO,
    "o:skip-verification": YES_NO,
    "o:tracking-pixel-location-top": (*YES_NO, "htmlonly"),
    "t:text": ("yes",),
}
RFC2822 = re.compile(
    r"(?:(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), )?\d{1,2} (?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct"
    r"|Nov|Dec) \d{4} \d{2}:\d{2}:\d{2} [+-]\d{4}"
)
FORMATS = {
    "o:deliverytime": RFC2822,
    "o:deliver-within": re.compile(r"(?:\d+h)?(?:\d+m)?"),
    "o:deliverytime-optimize-period": re.compile(r"(?:2[4-9]|[3-6]\d|7[0-2])h"),
    "o:time-zone-localize": re.compile(
        r"(?:[01]\d|2[0-3]):[0-5]\d|(?:0[1-9]|1[0-2]):[0-5]\d[AaPp][Mm]"
    ),
    "o:secondary-dkim": re.compile(r"[^/\s]+/[^/\s]+"),
    "o:secondary-dkim-public": re.compile(r"[^/\s]+/[^/\s]+"),
    "o:sending-ip": re.compile(r"[0-9a-fA-F.:]+"),
    "o:sending-ip-pool": re.compile(r"\S+"),
    "o:archive-to": re.compile(r"https?://\S+"),
    "o:suppress-headers": re.compile(r".+"),
    "template": re.compile(r".+"),
    "t:version": re.compile(r".+"),
}
JSON_OBJECTS = ("t:variables", "recipient-variables")


def option_problem(fields: list[tuple[str, str]]) -> str | None:
    """Why Mailgun would answer 400 to these form fields (all but `to` and the file)."""
    names = [name for name, _ in fields]
    values = dict(fields)
    for name, value in fields:
        if name == "to":
            continue
        if name.startswith(("h:", "v:")):
            if len(name) == 2:
                return f"'{name}' needs a name"
            continue
        if name != "o:tag" and names.count(name) > 1:
            return f"'{name}' parameter given more than once"
        if name in CHOICES:
            if value not in CHOICES[name]:
                return f"'{name}' parameter is not valid: {value}"
        elif name in FORMATS:
            if not FORMATS[name].fullmatch(value):
                return f"'{name}' parameter is not valid: {value}"
        elif name in JSON_OBJECTS:
            try:
                if not isinstance(json.loads(value), dict):
                    raise ValueError(value)
            except ValueError:
                return f"'{name}' parameter should be a valid JSON object"
        elif name != "o:tag":
            return f"unknown parameter '{name}'"
    tags = [value for name, value in fields if name == "o:tag"]
    if len(tags) > 10 or any(len(t) > 128 or not t.isascii() or not t for t in tags):
        return "'o:tag' parameter is not valid"
    if "t:version" in values and "template" not in values:
        return "'t:version' needs 'template'"
    if "o:secondary-dkim-public" in values and "o:secondary-dkim" not in values:
        return "'o:secondary-dkim-public' needs 'o:secondary-dkim'"
    options = sum(len(n.encode()) + len(v.encode()) for n, v in fields if n[:2] in OPTIONS)
    if options > 16 * 1024:
        return "Send options (parameters starting with o:, h:, or v:) are limited to 16KB total"
    return None


OPTIONS = ("o:", "h:", "v:", "t:")


@pytest.fixture(scope="module")
def shared_esp() -> Iterator[FakeESP]:
    """One fake Mailgun for the offline error table (tests script their replies)."""
    with FakeESP(mailgun) as esp:
        yield esp


def provider(client: httpx.AsyncClient, url: str, domain: str = DOMAIN) -> MailgunProvider:
    return MailgunProvider(client, api_key=SecretStr(KEY), domain=domain, api_url=url)


RAW = (
    b"From: App <app@example.com>\r\n"
    b"To: ops@example.org\r\n"
    b"Bcc: hidden@example.net,\r\n"
    b"\tsecret@example.net\r\n"
    b"Subject: monthly report\r\n"
    b"X-Custom: kept as is\r\n"
    b"Content-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Gr\xfc\xdfe, Bcc: not a header\r\n"
)
WITHOUT_BCC = RAW.replace(b"Bcc: hidden@example.net,\r\n\tsecret@example.net\r\n", b"")


# -- the request, offline ---------------------------------------------------------------


def test_build_request_is_what_mailgun_documents() -> None:
    rcpts = ("ops@example.org", "hidden@example.net", "secret@example.net")
    message = OutboundMessage("m1", Envelope("app@example.com", rcpts), RAW)
    request = (
        provider(httpx.AsyncClient(), "https://api.eu.mailgun.net/").build_request(message).request
    )
    assert request.method == "POST"
    assert str(request.url) == f"https://api.eu.mailgun.net/v3/{DOMAIN}/messages.mime"
    assert request.headers["authorization"] == "Basic " + base64.b64encode(
        f"api:{KEY}".encode()
    ).decode("ascii")
    recorded = Recorded("POST", request.url.path, {}, dict(request.headers), request.read())
    fields = form_fields(recorded)
    assert [value.decode() for name, _, value in fields if name == "to"] == list(rcpts)
    (message_field,) = [(f, v) for name, f, v in fields if name == "message"]
    assert message_field == ("message.mime", WITHOUT_BCC)  # 8bit kept: Mailgun takes it
    assert KEY not in repr(provider(httpx.AsyncClient(), "https://x"))


async def test_bcc_removal_is_reported() -> None:
    message = OutboundMessage("m1", Envelope("a@example.com", ("ops@example.org",)), RAW)
    with FakeESP(mailgun) as esp:
        async with httpx.AsyncClient() as client:
            result = await provider(client, esp.url).send(message)
    assert result.provider_message_id and result.provider_message_id.endswith(f"@{DOMAIN}")
    assert result.warnings == (
        "removed 1 Bcc header field(s); their recipients still get the message through the"
        " envelope",
    )


@pytest.mark.parametrize(
    ("path", "domain", "reply", "error", "says"),
    [
        pytest.param("/welcome", DOMAIN, None, ProviderConfigError, "without a message id",
                     id="welcome-page"),
        pytest.param("", "unknown.example.com", None, ProviderConfigError, "Domain not found",
                     id="domain-not-found"),
        pytest.param("", DOMAIN, Reply(401, "Forbidden"), ProviderConfigError, "Forbidden",
                     id="401"),
        pytest.param("", DOMAIN, Reply(400, {"message": "to parameter is not a valid address"}),
                     MessageRejected, "not a valid address", id="400"),
        pytest.param("", DOMAIN, Reply(500, {"message": "Internal Server Error"}),
                     ProviderUnavailable, "Internal", id="500"),
    ],
)  # fmt: skip
async def test_errors(
    shared_esp: FakeESP,
    path: str,
    domain: str,
    reply: Reply | None,
    error: type[Exception],
    says: str,
) -> None:
    message = OutboundMessage("m1", Envelope("a@example.com", ("ops@example.org",)), RAW)
    if reply is not None:
        shared_esp.then(reply)
    async with httpx.AsyncClient() as client:
        with pytest.raises(error, match=says) as info:
            await provider(client, shared_esp.url + path, domain).send(message)
    assert KEY not in str(info.value)


async def test_rate_limit_hint_in_message_and_header() -> None:
    message = OutboundMessage("m1", Envelope("a@example.com", ("ops@example.org",)), RAW)
    limit = {"message": "Domain mg.example.com is not allowed to send: account-requests-per-sec"
             " limit exceeded, try again after 120 seconds"}  # fmt: skip
    with FakeESP(mailgun) as esp:
        esp.then(Reply(429, limit), Reply(429, {"message": "slow down"}, {"Retry-After": "7"}))
        async with httpx.AsyncClient() as client:
            with pytest.raises(RateLimited) as first:
                await provider(client, esp.url).send(message)
            with pytest.raises(RateLimited) as second:
                await provider(client, esp.url).send(message)
    assert first.value.retry_after == 120
    assert second.value.retry_after == 7


# -- end to end: SMTP in, Mailgun's API out ------------------------------------------


def mailgun_env(url: str, **extra: str) -> dict[str, str]:
    return {
        "ESPRELAY_PROVIDER": "mailgun",
        "ESPRELAY_MAILGUN_API_KEY": KEY,
        "ESPRELAY_MAILGUN_DOMAIN": DOMAIN,
        "ESPRELAY_MAILGUN_API_URL": url,
        **extra,
    }


def test_smtp_to_mailgun_field_by_field(relay_factory: type[RelayProcess]) -> None:
    with FakeESP(mailgun) as esp:
        relay = relay_factory(mailgun_env(esp.url)).start()
        rcpts = ["ops@example.org", "hidden@example.net", "secret@example.net", "only@example.org"]
        message_id = queued_id(
            send_raw(relay, "bounces@example.com", rcpts, RAW, options=["BODY=8BITMIME"])
        )
        (request,) = esp.wait_for(1)
        relay.wait_for_log(rf"delivered id={message_id} provider=mailgun attempt=1")
        relay.wait_for_log(rf"id={message_id} provider=mailgun changed the message: removed 1 Bcc")

    assert request.method == "POST"
    assert request.path == f"/v3/{DOMAIN}/messages.mime"
    fields = form_fields(request)
    assert [name for name, _, _ in fields] == ["to"] * 4 + ["v:esprelay_id", "message"]
    assert [value.decode() for name, _, value in fields if name == "to"] == rcpts
    # The spool id, for Mailgun to echo in the events' user-variables.
    assert fields[4][2].decode() == message_id
    sent = fields[-1][2]
    assert sent == WITHOUT_BCC
    parsed = BytesParser(policy=email.policy.default).parsebytes(sent)
    assert parsed["Bcc"] is None and parsed["Subject"] == "monthly report"
    assert parsed["X-Custom"] == "kept as is"
    assert parsed.get_content() == "Grüße, Bcc: not a header\r\n"
    mailgun_id = re.search(rf"delivered id={message_id} .* provider_id=(\S+)", relay.log)
    # Stored as the events carry it (message.headers.message-id): no angle brackets.
    assert mailgun_id and mailgun_id.group(1).endswith(f"@{DOMAIN}")
    assert not mailgun_id.group(1).startswith("<")
    assert KEY not in relay.log


def test_size_and_recipient_limits_at_smtp_time(relay_factory: type[RelayProcess]) -> None:
    import smtplib

    relay = relay_factory(
        mailgun_env("http://127.0.0.1:9", ESPRELAY_MAX_MESSAGE_SIZE="1G",
                    ESPRELAY_MAX_RECIPIENTS="5000", ESPRELAY_DELIVERY_CONCURRENCY="0")
    ).start()  # fmt: skip
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        assert int(smtp.esmtp_features["size"]) == 25 * 1024 * 1024
        smtp.mail("a@example.com")
        codes = [smtp.rcpt(f"r{i}@example.org")[0] for i in range(1001)]
    assert codes[:1000] == [250] * 1000
    assert codes[1000] == 452


def test_error_mapping_end_to_end(relay_factory: type[RelayProcess]) -> None:
    def subject(request: Recorded) -> str:
        raw = next(v for name, _, v in form_fields(request) if name == "message")
        return str(BytesParser(policy=email.policy.default).parsebytes(raw)["Subject"])

    limit = "limit exceeded, try again after 1 seconds"
    cases = Cases(
        subject,
        mailgun,
        {
            "rate": [Reply(429, {"message": limit})],
            "boom": [Reply(500, {"message": "Internal Server Error"}), Reply(503, "busy")],
            "bad": [Reply(400, {"message": "to parameter is not a valid address"})],
            "key": [Reply(401, "Forbidden")],
        },
    )
    env = {"ESPRELAY_RETRY_INITIAL": "0.1", "ESPRELAY_RETRY_MAX": "0.2",
           "ESPRELAY_RETRY_CONFIG_ERROR": "1.5"}  # fmt: skip
    with FakeESP(cases.respond) as esp:
        relay = relay_factory(mailgun_env(esp.url, **env)).start()
        ids = {
            case: queued_id(send_raw(relay, "app@example.com", ["ops@example.org"],
                                     case_message(case)))
            for case in ("rate", "boom", "bad", "key")
        }  # fmt: skip
        for case in ("rate", "boom", "key"):
            relay.wait_for_log(rf"delivered id={ids[case]} provider=mailgun", timeout=20)
        relay.wait_for_log(rf"failed id={ids['bad']} provider=mailgun attempt=1 .*HTTP 400")

    assert cases.calls("rate") == 2 and cases.gap("rate") >= 0.9
    assert cases.calls("boom") == 3
    assert cases.calls("bad") == 1
    assert cases.calls("key") == 2 and cases.gap("key") >= 1.4
    assert re.search(
        rf"deferred id={ids['key']} provider=mailgun attempt=1 .*HTTP 401.*"
        r"configuration problem: operator action needed",
        relay.log,
    )
    assert len(re.findall(rf"delivered id=({'|'.join(ids.values())})", relay.log)) == 3


def test_message_corpus_arrives_as_meant(relay_factory: type[RelayProcess]) -> None:
    """Every case of tests.messages: `to` is the envelope, the MIME is the message as
    sent minus its Bcc header, byte for byte, and reads as the case expects."""
    cases = corpus()
    with FakeESP(mailgun) as esp:
        relay = relay_factory(mailgun_env(esp.url)).start()
        for case in cases:
            send_case(relay, case)
        requests = esp.wait_for(len(cases))
    by_case: dict[str, tuple[list[str], bytes]] = {}
    for request in requests:
        fields = form_fields(request)
        message = next(v for name, _, v in fields if name == "message")
        to = [v.decode() for name, _, v in fields if name == "to"]
        by_case[str(parse(message)["X-Case"])] = (to, message)
    assert sorted(by_case) == sorted(case.id for case in cases)
    for case in cases:
        to, message = by_case[case.id]
        assert to == list(case.rcpts), case.id
        assert message == without_bcc(case.raw), case.id
        assert_arrived_as_meant(case, message)
