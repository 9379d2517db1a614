"""The sender rules check the From that the providers send, read by one header reader.

Before ``esprelay.message.header`` there were four readers of where a header ends, and
they disagreed: a line such as ``: x`` ended the sender check's header while Python's
``email`` parser (behind the JSON providers) read on and found a later ``From:``.  The
reproductions from the report run end to end here against each provider on loopback;
then hypothesis builds hostile header blocks and checks that every From a provider
would send (JSON field or raw MIME, read by Python's parser and by a lenient line
scanner, as an ESP might) is one the rules allowed.
"""

from __future__ import annotations

import asyncio
import base64
import email.policy
import json
import re
import smtplib
from collections.abc import Iterator
from email.parser import BytesParser
from email.utils import getaddresses, parseaddr
from pathlib import Path

import httpx
import pytest
from botocore.credentials import Credentials
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from esprelay.message.header import items, read_header
from esprelay.message.repair import prepare
from esprelay.models import Envelope, OutboundMessage
from esprelay.providers.base import HttpProvider
from esprelay.providers.mailgun import MailgunProvider
from esprelay.providers.postmark import PostmarkProvider
from esprelay.providers.sendgrid import SendGridProvider
from esprelay.providers.ses import SesProvider
from esprelay.smtp.auth import hash_password
from esprelay.smtp.policy import RelayPolicy, parse_networks, sender_matches
from esprelay.testing.fakeesp import FakeESP, Recorded, Reply
from tests.providers.test_mailgun import form_fields
from tests.relayproc import RelayProcess
from tests.securitykit import crlf

ALLOWED = ("example.com",)
POLICY = RelayPolicy(parse_networks(("127.0.0.0/8",)), allowed_sender_domains=ALLOWED)
OPEN_POLICY = RelayPolicy(parse_networks(("127.0.0.0/8",)))

# --- the reproductions, end to end --------------------------------------------------


def ok(request: Recorded) -> Reply:
    """A successful answer in the shape each provider's API gives it."""
    if request.path.endswith("/v3/mail/send"):
        return Reply(202, b"", {"X-Message-Id": "sg-1"})
    if request.path.endswith("/email"):
        return Reply(200, {"ErrorCode": 0, "Message": "OK", "MessageID": "pm-1"})
    if request.path.endswith("/messages.mime"):
        return Reply(200, {"id": "<mg-1@mg.example.com>", "message": "Queued. Thank you."})
    return Reply(200, {"MessageId": "ses-1"})


def provider_env(kind: str, url: str) -> dict[str, str]:
    return {
        "sendgrid": {"ESPRELAY_SENDGRID_API_KEY": "SG.key", "ESPRELAY_SENDGRID_API_URL": url},
        "postmark": {
            "ESPRELAY_POSTMARK_SERVER_TOKEN": "pm-token",
            "ESPRELAY_POSTMARK_API_URL": url,
        },
        "mailgun": {
            "ESPRELAY_MAILGUN_API_KEY": "key-1",
            "ESPRELAY_MAILGUN_DOMAIN": "mg.example.com",
            "ESPRELAY_MAILGUN_API_URL": url,
        },
        "ses": {
            "ESPRELAY_SES_REGION": "eu-west-1",
            "ESPRELAY_SES_ENDPOINT_URL": url,
            "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
            "AWS_SECRET_ACCESS_KEY": "secret",
        },
    }[kind] | {"ESPRELAY_PROVIDER": kind}


def sent_mime(kind: str, request: Recorded) -> bytes | None:
    """The raw message a raw-MIME provider was sent (None for the JSON providers)."""
    if kind == "ses":
        return base64.b64decode(request.json()["Content"]["Raw"]["Data"])
    if kind == "mailgun":
        (message,) = [value for name, _, value in form_fields(request) if name == "message"]
        return message
    return None


_LENIENT = re.compile(rb"(?im)^(from|sender)[ \t]*:(.*(?:\r\n[ \t].*)*)")


def senders_a_reader_could_see(raw: bytes) -> list[str]:
    """Every From/Sender address in ``raw``'s header section, read two ways: Python's
    parser, and a lenient scan of every line before the first empty line."""
    message = BytesParser(policy=email.policy.compat32).parsebytes(raw)
    values = [str(v) for name in ("from", "sender") for v in message.get_all(name, [])]
    head = b"" if raw.startswith(b"\r\n") else raw.split(b"\r\n\r\n", 1)[0]
    values += [m.group(2).decode("utf-8", "replace") for m in _LENIENT.finditer(head)]
    return [addr for _, addr in getaddresses(values) if "@" in addr]


def request_senders(kind: str, request: Recorded) -> list[str]:
    """The sender addresses a provider's request carries."""
    mime = sent_mime(kind, request)
    if mime is not None:
        return senders_a_reader_could_see(mime)
    body = request.json()
    if kind == "sendgrid":
        return [body["from"]["email"]]
    return [parseaddr(body["From"])[1]]


PROVIDERS = ["sendgrid", "postmark", "mailgun", "ses"]


@pytest.fixture
def esp() -> Iterator[FakeESP]:
    with FakeESP(ok) as server:
        yield server


def data_reply(relay: RelayProcess, mail_from: str, raw: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        assert smtp.mail(mail_from)[0] == 250
        assert smtp.rcpt("b@example.org")[0] == 250
        return smtp.data(raw)


@pytest.mark.parametrize("kind", PROVIDERS)
def test_empty_field_name_cannot_smuggle_a_from(
    kind: str, esp: FakeESP, relay_factory: type[RelayProcess]
) -> None:
    relay = relay_factory(
        {**provider_env(kind, esp.url), "ESPRELAY_ALLOWED_SENDER_DOMAINS": "example.com"}
    ).start()
    raw = crlf('Subject: P5\n: x\nFrom: "Accounts" <billing@evil.test>\n\nPay now.\n')
    # With the null sender the message has no From a rule allows: refused.
    code, reply = data_reply(relay, "", raw)
    assert code == 550, reply
    # With an allowed envelope sender it is sent as that sender; the foreign From is
    # body text for every reader.
    code, reply = data_reply(relay, "app@example.com", raw)
    assert code == 250, reply
    (request,) = esp.wait_for(1)
    senders = request_senders(kind, request)
    assert all(sender_matches(s, ALLOWED) for s in senders), senders
    if sent_mime(kind, request) is None:  # a JSON API always names its sender
        assert senders == ["app@example.com"]


@pytest.mark.parametrize("kind", PROVIDERS)
def test_line_without_colon_cannot_smuggle_a_from(
    kind: str, esp: FakeESP, relay_factory: type[RelayProcess]
) -> None:
    relay = relay_factory(
        {**provider_env(kind, esp.url), "ESPRELAY_ALLOWED_SENDER_DOMAINS": "example.com"}
    ).start()
    raw = crlf("Subject\njunk line without colon\nFrom: evil@other.test\n\nbody\n")
    code, reply = data_reply(relay, "app@example.com", raw)
    assert code == 250, reply
    (request,) = esp.wait_for(1)
    assert "evil@other.test" not in request_senders(kind, request)
    mime = sent_mime(kind, request)
    if mime is not None:  # the foreign From is in the body, after an empty line
        assert mime.startswith(b"\r\n") or b"evil" not in mime.split(b"\r\n\r\n")[0]


@pytest.mark.parametrize("kind", PROVIDERS)
def test_obsolete_and_mbox_from_lines_are_read_as_every_reader_reads_them(
    kind: str, esp: FakeESP, relay_factory: type[RelayProcess]
) -> None:
    relay = relay_factory(
        {**provider_env(kind, esp.url), "ESPRELAY_ALLOWED_SENDER_DOMAINS": "example.com"}
    ).start()
    # "From :" is a From field (obsolete syntax) that Python's parser skips as an mbox
    # line: checked as a From, and refused.
    code, reply = data_reply(relay, "app@example.com", crlf("From : evil@other.test\n\nb\n"))
    assert code == 550, reply
    code, reply = data_reply(
        relay, "app@example.com", crlf("Subject: s\nSender : evil@other.test\n\nb\n")
    )
    assert code == 550, reply
    assert esp.requests == []


@pytest.mark.parametrize("kind", ["sendgrid", "ses"])
def test_authenticated_user_cannot_smuggle_a_from(
    kind: str, esp: FakeESP, relay_factory: type[RelayProcess], tmp_path: Path
) -> None:
    users = tmp_path / "users"
    users.write_text(f"printer:{hash_password('pw', log_n=4)}:a.example\n")
    relay = relay_factory(
        {
            **provider_env(kind, esp.url),
            "ESPRELAY_TRUSTED_NETWORKS": "127.0.0.1/32",
            "ESPRELAY_AUTH_FILE": str(users),
            "ESPRELAY_PLAINTEXT_AUTH_NETWORKS": "127.0.0.0/8",
        }
    ).start()
    raw = crlf("Subject: P5\n: x\nFrom: ceo@b.example\n\nwire the money\n")
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30, source_address=("127.0.0.2", 0)) as smtp:
        smtp.ehlo("client.test")
        assert smtp.login("printer", "pw")[0] == 235
        # Sent directly, that From is refused...
        assert smtp.mail("")[0] == 250
        assert smtp.rcpt("b@example.org")[0] == 250
        code, reply = smtp.data(crlf("From: ceo@b.example\n\nx\n"))
        assert code == 550, reply
        # ...and so it is behind an empty field name, with the null sender.
        assert smtp.mail("")[0] == 250
        assert smtp.rcpt("b@example.org")[0] == 250
        code, reply = smtp.data(raw)
        assert code == 550, reply
    assert esp.requests == []


# --- hostile header blocks: what the rules approve is what is sent ------------------

NAMES = [b"From", b"from", b"FROM", b"Sender", b"Subject", b"To", b"Reply-To", b"X-A"]
ODD_NAMES = [b"", b"Fr\x00om", b"Fr\xc3\xb6m", b"From ", b" From", b"\tFrom", b"From\x7f"]
SEPARATORS = [b":", b": ", b" :", b"\t:", b"::", b"", b" "]
GOOD = [b"app@example.com", b"App <app@example.com>", b'"x@evil.test" <app@example.com>']
EVIL = [b"evil@other.test", b"Evil <evil@other.test>", b"app@example.com.other.test"]
VALUES = [
    *GOOD,
    *EVIL,
    b"app@example.com, evil@other.test",
    b"=?utf-8?q?evil=40other.test?= <app@example.com>",
    b"<evil@other.test>\x00app@example.com",
    b"caf\xc3\xa9 <app@example.com>",
    b"\xff\xfe",
    b"",
    b"x",
    b"(evil@other.test) app@example.com",
]
LINE_ENDS = [b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b"\r\r\n"]


@st.composite
def header_blocks(draw: st.DrawFn) -> bytes:
    lines = []
    for _ in range(draw(st.integers(1, 7))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            line = draw(st.sampled_from([b" folded", b"\tFrom: evil@other.test", b" ", b""]))
        elif kind == 1:
            line = draw(st.binary(max_size=12))
        else:
            name = draw(st.sampled_from(NAMES + ODD_NAMES if kind < 4 else NAMES))
            separator = draw(st.sampled_from(SEPARATORS if kind < 6 else [b": "]))
            line = name + separator + draw(st.sampled_from(VALUES))
        lines.append(line + draw(st.sampled_from(LINE_ENDS)))
    if draw(st.booleans()):
        lines.insert(0, b"From app@example.com Sat Nov 28 01:02:03 2026\r\n")
    return b"".join(lines) + draw(st.sampled_from([b"\r\n", b"", b"\n"])) + b"body\r\n"


def _client() -> httpx.AsyncClient:
    return httpx.AsyncClient()


def _providers() -> dict[str, HttpProvider]:
    client = _client()
    return {
        "sendgrid": SendGridProvider(client, SecretStr("SG.key"), "http://127.0.0.1:9/"),
        "postmark": PostmarkProvider(client, SecretStr("pm"), "http://127.0.0.1:9", "outbound"),
        "mailgun": MailgunProvider(
            client, api_key=SecretStr("k"), domain="mg.example.com", api_url="http://127.0.0.1:9"
        ),
        "ses": SesProvider(
            client,
            region="eu-west-1",
            endpoint_url="http://127.0.0.1:9",
            credentials=lambda: Credentials("AKID", "secret"),
        ),
    }


BUILT = _providers()


def as_recorded(request: httpx.Request) -> Recorded:
    return Recorded(
        request.method,
        request.url.path,
        {},
        {k.lower(): v for k, v in request.headers.items()},
        request.read(),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Found by this test: SES's 7-bit re-encoding re-parsed and re-folded a From whose
# encoded-word display name reads as an address, and so sent that address.
@example(
    raw=b"From:App <app@example.com>\r\n folded\r\nFrom:=?utf-8?q?evil=40other.test?="
    b" <app@example.com>\r\n From:caf\xc3\xa9 <app@example.com>\r\n\r\nbody\r\n",
    mail_from="",
    repair=False,
    user=False,
)
@given(
    raw=header_blocks(),
    mail_from=st.sampled_from(["", "app@example.com"]),
    repair=st.booleans(),
    user=st.booleans(),
)
def test_the_from_the_rules_approve_is_the_from_every_provider_sends(
    raw: bytes, mail_from: str, repair: bool, user: bool
) -> None:
    prepared = prepare(raw, mail_from=mail_from, hostname="relay.example", repair=repair)
    policy, rules = (OPEN_POLICY, ALLOWED) if user else (POLICY, None)
    why = policy.message_sender_error(prepared.raw, mail_from=mail_from, user_rules=rules)
    # The header every reader sees is the one header reader's.
    parsed = BytesParser(policy=email.policy.compat32).parsebytes(prepared.raw)
    assert [(n.lower(), v) for n, v in items(prepared.raw, read_header(prepared.raw))] == [
        (n.lower(), v) for n, v in parsed.raw_items()
    ]
    if why is not None:
        return
    envelope = Envelope(mail_from, ("b@example.org",))
    message = OutboundMessage("id-1", envelope, prepared.raw)
    for kind, provider in BUILT.items():
        try:
            request = provider.build_request(message).request
        except Exception as exc:  # a provider may refuse a message; it then sends nothing
            assert getattr(exc, "permanent", False), (kind, exc)
            continue
        senders = request_senders(kind, as_recorded(request))
        assert all(sender_matches(s, ALLOWED) for s in senders), (kind, senders, prepared.raw)


def teardown_module() -> None:
    client = next(iter(BUILT.values()))._client  # type: ignore[attr-defined]
    asyncio.run(client.aclose())


def test_hypothesis_blocks_include_the_reported_tricks() -> None:
    """The strategy can build the two reported bypasses (so the property covers them)."""
    for raw in (
        b"Subject: P5\r\n: x\r\nFrom: evil@other.test\r\n\r\nbody\r\n",
        b"Subject\r\njunk line\r\nFrom: evil@other.test\r\n\r\nbody\r\n",
    ):
        prepared = prepare(raw, mail_from="", hostname="relay.example")
        assert POLICY.message_sender_error(prepared.raw, mail_from="", user_rules=None)
        assert json.dumps(senders_a_reader_could_see(prepared.raw)) == "[]"
