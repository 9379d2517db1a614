"""The generic HTTP provider: the request offline, its settings, and esprelay end to end
against a fake service on loopback that checks each request the way a receiver would:
the Standard Webhooks signature with the reference verifier (the ``standardwebhooks``
package, not our code), the payload against the schema shipped beside the module
(``esprelay/providers/http.schema.json``), the bearer token and the custom headers."""

from __future__ import annotations

import base64
import importlib.resources
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from esprelay.config import Settings, load_settings
from esprelay.errors import (
    ConfigError,
    MessageRejected,
    PermanentDeliveryError,
    ProviderConfigError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from esprelay.models import Envelope, OutboundMessage
from esprelay.providers.http import HttpApiProvider, HttpApiSettings
from esprelay.providers.registry import configure, get_kind
from esprelay.routing import default_provider
from esprelay.testing.fakeesp import FakeESP, Recorded, Reply
from tests.fakeclock import FakeClock
from tests.messages import corpus
from tests.providers.common import send_case
from tests.providers.errorcases import Cases, case_message
from tests.providers.rawcheck import assert_arrived_as_meant, parse, without_bcc
from tests.relayproc import RelayProcess
from tests.test_e2e_smtp import queued_id, send_raw

#: 32 random bytes, as a Standard Webhooks secret.
SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
TOKEN = "svc-token-7c1f0e"
SCHEMA = json.loads(
    importlib.resources.files("esprelay.providers").joinpath("http.schema.json").read_text()
)
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)

RAW = (
    b"From: App <app@example.com>\r\n"
    b"To: Ops <ops@example.org>\r\n"
    b"Cc: cc@example.org\r\n"
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
RCPTS = ("ops@example.org", "cc@example.org", "hidden@example.net", "secret@example.net")


def settings(url: str = "https://mail.example.com/inbound?v=1", **extra: Any) -> HttpApiSettings:
    values: dict[str, Any] = {"api_url": url, "api_secret": SECRET, **extra}
    config = configure(get_kind("http"), values)
    assert isinstance(config.settings, HttpApiSettings)
    return config.settings


def provider(client: httpx.AsyncClient | None = None, **extra: Any) -> HttpApiProvider:
    return HttpApiProvider(client or httpx.AsyncClient(), settings(**extra))


def body_of(request: httpx.Request) -> dict[str, Any]:
    body = json.loads(request.read())
    assert isinstance(body, dict)
    return body


def verified(body: bytes, headers: dict[str, str]) -> Any:
    """The payload, once the reference verifier accepts the signature."""
    return Webhook(SECRET).verify(body, headers)


# -- the request, offline ---------------------------------------------------------------


def test_build_request_is_the_documented_payload() -> None:
    message = OutboundMessage("18c2f0a1b2c3d4e5f6a", Envelope("bounces@example.com", RCPTS), RAW)
    built = provider(api_token=TOKEN, api_headers='{"X-Tenant": "acme"}').build_request(message)
    request = built.request
    assert request.method == "POST"
    assert str(request.url) == "https://mail.example.com/inbound?v=1"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["x-tenant"] == "acme"
    assert request.headers["webhook-id"] == message.id
    body = body_of(request)
    VALIDATOR.validate(body)
    assert body == {
        "type": "esprelay.message",
        "id": message.id,
        "envelope": {"mail_from": "bounces@example.com", "rcpt_to": list(RCPTS)},
        "raw": base64.b64encode(WITHOUT_BCC).decode(),
    }
    assert built.warnings == (
        "removed 1 Bcc header field(s); their recipients still get the message through the"
        " envelope",
    )
    # Not signed yet: the signature is made at send time, with that moment's timestamp.
    assert "webhook-signature" not in request.headers


def test_parsed_parts_on_request() -> None:
    raw = (
        b"From: =?utf-8?q?Caf=C3=A9?= <app@example.com>\r\nTo: Ops <ops@example.org>\r\n"
        b"Cc: outside@elsewhere.example\r\nBcc: hidden@example.net\r\nReply-To: r@example.com\r\n"
        b"Subject: report\r\nMessage-ID: <m1@example.com>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=b1\r\n\r\n"
        b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello\r\n"
        b"--b1\r\nContent-Type: text/calendar; charset=utf-8; method=REQUEST\r\n"
        b"Content-Disposition: attachment; filename=invite.ics\r\n\r\nBEGIN:VCALENDAR\r\n"
        b"--b1--\r\n"
    )
    message = OutboundMessage("abc-1", Envelope("app@example.com", RCPTS[:1] + RCPTS[2:3]), raw)
    body = body_of(provider(api_parsed=True).build_request(message).request)
    VALIDATOR.validate(body)
    parsed = body["parsed"]
    assert parsed["subject"] == "report"
    assert parsed["from"] == {"name": "Café", "address": "app@example.com"}
    assert parsed["reply_to"] == [{"name": "", "address": "r@example.com"}]
    assert parsed["to"] == [{"name": "Ops", "address": "ops@example.org"}]
    assert parsed["cc"] == []  # not an envelope recipient: not shown as one
    assert parsed["text"] == "Hello"
    assert parsed["html"] is None
    assert {"name": "Message-ID", "value": "<m1@example.com>"} in parsed["headers"]
    [invite] = parsed["attachments"]
    assert invite["filename"] == "invite.ics"
    assert invite["content_type"] == "text/calendar; charset=utf-8; method=REQUEST"
    assert base64.b64decode(invite["content"]) == b"BEGIN:VCALENDAR"
    assert parsed["warnings"] == [
        "1 To/Cc header address(es) are not envelope recipients: not sent and not shown"
        " (the envelope decides who receives)"
    ]
    # The blind recipient is in the envelope only; nothing else shows it.
    shown = json.dumps({k: v for k, v in body.items() if k != "envelope"})
    assert "hidden@example.net" not in shown
    assert b"hidden@example.net" not in base64.b64decode(body["raw"])


async def test_signature_verifies_with_the_reference_library_and_is_fresh_per_attempt() -> None:
    clock = FakeClock(start=time.time())
    message = OutboundMessage("18c2f0a1b2c3d4e5f6a", Envelope("a@example.com", RCPTS[:1]), RAW)
    adapter = HttpApiProvider(httpx.AsyncClient(), settings(), clock=clock)
    first = adapter.build_request(message).request
    await adapter.authorize(first)
    clock.advance(120)  # a retry, two minutes later
    second = adapter.build_request(message).request
    await adapter.authorize(second)

    for request in (first, second):
        headers = dict(request.headers)
        assert verified(request.read(), headers)["id"] == message.id
        assert headers["webhook-id"] == message.id
        assert re.fullmatch(r"v1,[A-Za-z0-9+/]{43}=", headers["webhook-signature"])
    assert int(second.headers["webhook-timestamp"]) == int(first.headers["webhook-timestamp"]) + 120
    assert first.headers["webhook-signature"] != second.headers["webhook-signature"]

    # The verifier does check: another body, id, timestamp or secret is refused.
    headers = dict(first.headers)
    with pytest.raises(WebhookVerificationError):
        verified(first.read().replace(b"esprelay.message", b"esprelay.massage"), headers)
    with pytest.raises(WebhookVerificationError):
        verified(first.read(), {**headers, "webhook-id": "18c2f0a1b2c3d4e5f6b"})
    with pytest.raises(WebhookVerificationError):
        later = second.headers["webhook-timestamp"]
        verified(first.read(), {**headers, "webhook-timestamp": later})
    other = "whsec_" + base64.b64encode(bytes(range(1, 33))).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(first.read(), headers)


@pytest.mark.parametrize(
    ("secret", "says"),
    [
        ("c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0", "must start with whsec_"),
        ("whsec_not*base64*at*all!!", "not base64"),
        ("whsec_" + base64.b64encode(b"x" * 16).decode(), "16 bytes, not 24 to 64"),
        ("whsec_" + base64.b64encode(b"x" * 65).decode(), "65 bytes, not 24 to 64"),
        ("whsec_", "0 bytes"),
    ],
)
def test_a_malformed_secret_is_one_line_at_start_up(secret: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        configure(get_kind("http"), {"api_url": "https://x.example/in", "api_secret": secret})
    text = str(info.value)
    assert text.startswith("ESPRELAY_HTTP_API_SECRET: not a Standard Webhooks secret")
    assert says in text and "\n" not in text
    value = secret.removeprefix("whsec_")
    assert not value or value[:8] not in text


def test_secrets_as_the_reference_libraries_make_them() -> None:
    # Svix-made secrets: 24 bytes, base64 without padding needed; 32 bytes padded too.
    unpadded = "whsec_" + base64.b64encode(bytes(range(25))).decode().rstrip("=")
    for secret in ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", SECRET, unpadded):
        assert settings(api_secret=secret).api_secret.get_secret_value() == secret


@pytest.mark.parametrize(
    ("headers", "says"),
    [
        ('{"X-A": "one\\r\\nX-Injected: two"}', "contains CR, LF or NUL"),
        ('{"X-A": "line\\nbreak"}', "contains CR, LF or NUL"),
        ('{"X A": "v"}', "is not a header name"),
        ('{"X-A": "caf\\u00e9"}', "not printable ASCII"),
        ('{"X-A": "1", "x-a": "2"}', "given twice"),
        ('{"webhook-signature": "v1,forged"}', "written by esprelay"),
        ('{"Content-Type": "text/plain"}', "written by esprelay"),
        ('{"X-A": 1}', "string values"),
        ('["X-A: v"]', "string values"),
        ("X-A: v", "not a JSON object"),
    ],
)
def test_bad_custom_headers_are_refused(headers: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings(api_headers=headers)
    assert str(info.value).startswith("ESPRELAY_HTTP_API_HEADERS: ")
    assert says in str(info.value) and "\n" not in str(info.value)


def test_the_module_does_not_shadow_the_http_package() -> None:
    """esprelay.providers.http shares its last name with the standard library's http."""
    import http.client

    from esprelay.providers import http as ours

    assert http.client.__name__ == "http.client" and http.HTTPStatus.OK == 200
    assert ours.__name__ == "esprelay.providers.http" and ours.KIND.name == "http"


def test_headers_token_and_url_checks() -> None:
    # A routes file may give the headers as a TOML table.
    assert settings(api_headers={"X-Tenant": "acme"}).api_headers["X-Tenant"].get_secret_value()
    assert settings(api_headers="").api_headers == {}
    with pytest.raises(ConfigError, match="HEADERS: sets Authorization and so does"):
        settings(api_token=TOKEN, api_headers='{"Authorization": "Basic eDp5"}')
    basic = provider(api_headers='{"Authorization": "Basic eDp5"}')  # without a token: fine
    message = OutboundMessage("a1", Envelope("a@example.com", ("b@example.org",)), RAW)
    assert basic.build_request(message).request.headers["authorization"] == "Basic eDp5"
    accept = provider(api_headers='{"accept": "application/vnd.acme+json"}').build_request(message)
    assert accept.request.headers.get_list("accept") == ["application/vnd.acme+json"]
    with pytest.raises(ConfigError, match=r"ESPRELAY_HTTP_API_TOKEN: .*printable ASCII"):
        settings(api_token="two words")
    for url in ("ftp://x.example/in", "/relative/path", "https://", "not a url"):
        with pytest.raises(ConfigError, match="ESPRELAY_HTTP_API_URL: not an http"):
            settings(url=url)
    # Secrets stay out of repr: the secret, the token and the header values.
    shown = repr(settings(api_token=TOKEN, api_headers='{"X-Key": "k-secret-value"}'))
    assert SECRET not in shown and TOKEN not in shown and "k-secret-value" not in shown


def test_settings_do_not_collide_with_the_ops_endpoint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """ESPRELAY_HTTP_HOST/_PORT/_ENABLED/_TRANSPORT are the relay's; ours are _API_*."""
    assert not {f"http_{name}" for name in HttpApiSettings.model_fields} & set(
        Settings.model_fields
    )
    for key in list(os.environ):
        if key.startswith("ESPRELAY_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    env = {
        "ESPRELAY_PROVIDER": "http",
        "ESPRELAY_HTTP_HOST": "0.0.0.0",
        "ESPRELAY_HTTP_PORT": "9100",
        "ESPRELAY_HTTP_ENABLED": "false",
        "ESPRELAY_HTTP_TRANSPORT": "httpx",
        "ESPRELAY_HTTP_API_URL": "https://mail.example.com/in",
        "ESPRELAY_HTTP_API_SECRET": SECRET,
        "ESPRELAY_HTTP_API_TOKEN": TOKEN,
        "ESPRELAY_HTTP_API_HEADERS": '{"X-Tenant": "acme"}',
        "ESPRELAY_HTTP_API_PARSED": "true",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    loaded = load_settings(env_file=None)
    assert (loaded.http_host, loaded.http_port, loaded.http_enabled) == ("0.0.0.0", 9100, False)
    assert loaded.http_transport == "httpx"
    ours = default_provider(loaded).settings
    assert isinstance(ours, HttpApiSettings)
    assert ours.api_url == "https://mail.example.com/in" and ours.api_parsed is True
    assert ours.api_token is not None and ours.api_token.get_secret_value() == TOKEN
    assert ours.api_headers["X-Tenant"].get_secret_value() == "acme"


def test_a_bad_secret_stops_the_relay_with_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESPRELAY_")}
    env.update(
        ESPRELAY_PROVIDER="http",
        ESPRELAY_HTTP_API_URL="https://mail.example.com/in",
        ESPRELAY_HTTP_API_SECRET="whsec_c2hvcnQ=",
    )
    result = subprocess.run(
        [sys.executable, "-m", "esprelay", "serve"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 78  # EX_CONFIG
    assert result.stderr.splitlines() == [
        "esprelay: configuration error: ESPRELAY_HTTP_API_SECRET: not a Standard Webhooks"
        " secret: 5 bytes, not 24 to 64"
    ]
    assert "c2hvcnQ" not in result.stderr and "Traceback" not in result.stderr


# -- answers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "error", "retry_after"),
    [
        pytest.param(Reply(408, "timeout"), ProviderUnavailable, None, id="408"),
        pytest.param(Reply(429, "", {"Retry-After": "7"}), RateLimited, 7, id="429"),
        pytest.param(Reply(500, "boom"), ProviderUnavailable, None, id="500"),
        pytest.param(Reply(503, "", {"Retry-After": "30"}), ProviderUnavailable, 30, id="503"),
        pytest.param(Reply(400, {"error": "no such mailbox"}), MessageRejected, None, id="400"),
        pytest.param(Reply(409, "conflict"), PermanentDeliveryError, None, id="409"),
        pytest.param(Reply(410, "gone"), PermanentDeliveryError, None, id="410"),
        pytest.param(Reply(413, "too large"), MessageRejected, None, id="413"),
        pytest.param(Reply(422, "unprocessable"), MessageRejected, None, id="422"),
        pytest.param(Reply(401, "bad signature"), ProviderConfigError, None, id="401"),
        pytest.param(Reply(403, "forbidden"), ProviderConfigError, None, id="403"),
        pytest.param(Reply(404, "not found"), ProviderConfigError, None, id="404"),
        pytest.param(Reply(405, "method"), ProviderConfigError, None, id="405"),
        pytest.param(Reply(308, "", {"Location": "https://new.example/in"}), ProviderConfigError,
                     None, id="308"),
    ],
)  # fmt: skip
async def test_answers_map_onto_the_error_tree(
    service: FakeESP, reply: Reply, error: type[Exception], retry_after: float | None
) -> None:
    message = OutboundMessage("a1", Envelope("a@example.com", ("b@example.org",)), RAW)
    service.then(reply)
    async with httpx.AsyncClient() as client:
        with pytest.raises(error) as info:
            await provider(client, url=service.url + "/in").send(message)
    assert type(info.value) is error
    assert getattr(info.value, "retry_after", None) == retry_after
    if reply.status == 308:
        assert "https://new.example/in" in str(info.value)


async def test_a_timeout_is_transient() -> None:
    def hang(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("no answer", request=request)

    message = OutboundMessage("a1", Envelope("a@example.com", ("b@example.org",)), RAW)
    async with httpx.AsyncClient(transport=httpx.MockTransport(hang)) as client:
        with pytest.raises(ProviderTimeout):
            await provider(client).send(message)


@pytest.mark.parametrize(
    ("reply", "provider_id", "warned"),
    [
        (Reply(200, {"id": "svc-42"}), "svc-42", False),
        (Reply(201, {"id": 42}), "42", False),
        (Reply(202, {"status": "queued"}), None, False),
        (Reply(204), None, False),
        (Reply(200, "OK"), None, False),
        (Reply(200, [1, 2]), None, False),
        (Reply(200, {"id": "two\r\nlines"}), None, True),
        (Reply(200, {"id": "x" * 256}), None, True),
    ],
)
async def test_success_takes_the_answers_id(
    service: FakeESP, reply: Reply, provider_id: str | None, warned: bool
) -> None:
    message = OutboundMessage("a1", Envelope("a@example.com", ("b@example.org",)), RAW)
    service.then(reply)
    async with httpx.AsyncClient() as client:
        result = await provider(client, url=service.url + "/in").send(message)
    assert result.provider_message_id == provider_id
    assert any("answer's id is not kept" in w for w in result.warnings) is warned


# -- the fake service -------------------------------------------------------------------


class Service:
    """A receiver as the README asks one to be: it verifies the signature with the
    reference library, checks the token, headers and schema, and answers with an id."""

    def __init__(self, token: str | None = TOKEN, tenant: str | None = "acme") -> None:
        self.token = token
        self.tenant = tenant
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, request: Recorded) -> Reply:
        if request.method != "POST" or request.path != "/in":
            return Reply(404, "not found")
        if self.token and request.headers.get("authorization") != f"Bearer {self.token}":
            return Reply(401, {"error": "bad token"})
        if self.tenant and request.headers.get("x-tenant") != self.tenant:
            return Reply(401, {"error": "bad tenant"})
        try:
            payload = verified(request.body, request.headers)
        except WebhookVerificationError as exc:
            return Reply(401, {"error": f"bad signature: {exc}"})
        problems = [e.message[:200] for e in VALIDATOR.iter_errors(payload)]
        if problems:
            return Reply(422, {"error": "schema", "problems": problems})
        if request.headers.get("webhook-id") != payload["id"]:
            return Reply(400, {"error": "webhook-id is not the payload's id"})
        with self._lock:
            self.count += 1
            return Reply(200, {"id": f"svc-{self.count}"})


@pytest.fixture(scope="module")
def service() -> Iterator[FakeESP]:
    """One fake service for the offline answer tables (tests script their replies)."""
    with FakeESP(Service()) as esp:
        yield esp


def payload(request: Recorded) -> dict[str, Any]:
    body = json.loads(request.body)
    assert isinstance(body, dict)
    return body


def http_env(url: str, **extra: str) -> dict[str, str]:
    return {
        "ESPRELAY_PROVIDER": "http",
        "ESPRELAY_HTTP_API_URL": url + "/in",
        "ESPRELAY_HTTP_API_SECRET": SECRET,
        "ESPRELAY_HTTP_API_TOKEN": TOKEN,
        "ESPRELAY_HTTP_API_HEADERS": '{"X-Tenant": "acme"}',
        **extra,
    }


# -- end to end: SMTP in, your service out ------------------------------------------------


def test_smtp_to_the_service_field_by_field(relay_factory: type[RelayProcess]) -> None:
    with FakeESP(Service()) as esp:
        relay = relay_factory(http_env(esp.url, ESPRELAY_HTTP_API_PARSED="true")).start()
        message_id = queued_id(
            send_raw(relay, "bounces@example.com", list(RCPTS), RAW, options=["BODY=8BITMIME"])
        )
        relay.wait_for_log(
            rf"delivered id={message_id} provider=http attempt=1 .* provider_id=svc-1"
        )
        relay.wait_for_log(rf"id={message_id} provider=http changed the message: removed 1 Bcc")
        (request,) = esp.requests

    assert relay.http_port  # ESPRELAY_HTTP_PORT (the ops endpoint) is still the relay's
    sent = payload(request)
    assert sent["id"] == request.headers["webhook-id"] == message_id
    assert sent["envelope"] == {"mail_from": "bounces@example.com", "rcpt_to": list(RCPTS)}
    assert base64.b64decode(sent["raw"]) == WITHOUT_BCC
    assert sent["parsed"]["subject"] == "monthly report"
    assert sent["parsed"]["text"] == "Grüße, Bcc: not a header\r\n"
    assert [box["address"] for box in sent["parsed"]["to"] + sent["parsed"]["cc"]] == list(
        RCPTS[:2]
    )
    assert {"name": "X-Custom", "value": "kept as is"} in sent["parsed"]["headers"]
    assert "hidden@example.net" not in json.dumps(sent["parsed"])
    for secret in (SECRET, TOKEN):
        assert secret not in relay.log


def test_retries_are_signed_afresh_and_errors_map(relay_factory: type[RelayProcess]) -> None:
    def subject(request: Recorded) -> str:
        return str(parse(base64.b64decode(payload(request)["raw"]))["Subject"])

    cases = Cases(
        subject,
        Service(),
        {
            "rate": [Reply(429, "slow down", {"Retry-After": "1"})],
            "boom": [Reply(503, "busy", {"Retry-After": "1"}), Reply(500, "boom")],
            "bad": [Reply(422, {"error": "no such mailbox"})],
            "key": [Reply(401, {"error": "bad signature"})],
        },
    )
    env = {"ESPRELAY_RETRY_INITIAL": "0.1", "ESPRELAY_RETRY_MAX": "0.2",
           "ESPRELAY_RETRY_CONFIG_ERROR": "1.5"}  # fmt: skip
    with FakeESP(cases.respond) as esp:
        relay = relay_factory(http_env(esp.url, **env)).start()
        ids = {
            case: queued_id(send_raw(relay, "app@example.com", ["ops@example.org"],
                                     case_message(case)))
            for case in ("rate", "boom", "bad", "key")
        }  # fmt: skip
        for case in ("rate", "boom", "key"):
            relay.wait_for_log(rf"delivered id={ids[case]} provider=http", timeout=20)
        relay.wait_for_log(rf"failed id={ids['bad']} provider=http attempt=1 .*HTTP 422")
        requests = list(esp.requests)

    assert cases.calls("rate") == 2 and cases.gap("rate") >= 0.9  # Retry-After honoured
    assert cases.calls("boom") == 3 and cases.gap("boom") >= 0.9
    assert cases.calls("bad") == 1
    assert cases.calls("key") == 2 and cases.gap("key") >= 1.4
    assert re.search(
        rf"deferred id={ids['key']} provider=http attempt=1 .*HTTP 401.*"
        r"configuration problem: operator action needed",
        relay.log,
    )
    # Every attempt of a message: the same webhook-id, its own timestamp, each signature
    # valid (the reference verifier), the timestamps in order.
    boom = [r for r in requests if r.headers["webhook-id"] == ids["boom"]]
    assert len(boom) == 3
    for request in boom:
        assert verified(request.body, request.headers)["id"] == ids["boom"]
    stamps = [int(r.headers["webhook-timestamp"]) for r in boom]
    assert stamps == sorted(stamps) and abs(stamps[-1] - time.time()) < 60


def test_message_corpus_arrives_as_meant(relay_factory: type[RelayProcess]) -> None:
    """Every case of tests.messages, with the parsed parts: each request passed the
    service's checks (signature, schema); the raw message is the case as sent minus
    its Bcc header, byte for byte, and the envelope is the case's."""
    cases = corpus()
    with FakeESP(Service()) as esp:
        relay = relay_factory(http_env(esp.url, ESPRELAY_HTTP_API_PARSED="true")).start()
        for case in cases:
            send_case(relay, case)
        requests = esp.wait_for(len(cases))
        relay.wait_for_log(r"delivered id=\S+ provider=http", count=len(cases))
    by_case = {}
    for request in requests:
        sent = payload(request)
        raw = base64.b64decode(sent["raw"])
        by_case[str(parse(raw)["X-Case"])] = (sent, raw)
    assert sorted(by_case) == sorted(case.id for case in cases)
    for case in cases:
        sent, raw = by_case[case.id]
        assert sent["envelope"]["rcpt_to"] == list(case.rcpts), case.id
        assert raw == without_bcc(case.raw), case.id
        assert_arrived_as_meant(case, raw)
        assert sent["parsed"]["subject"] == case.subject, case.id
        for hidden in case.hidden:
            assert hidden not in json.dumps(sent["parsed"]), case.id
