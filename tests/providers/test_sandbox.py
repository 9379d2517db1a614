"""Sandbox settings of SendGrid (``mail_settings.sandbox_mode``) and Postmark (the test
token ``POSTMARK_API_TEST``): off by default, in the request when on, for the provider
of ``ESPRELAY_PROVIDER`` and for a named one of the routes file alike, and shown in the
start-up line (``kind:sandbox``) as Brevo's is."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from esprelay.errors import ProviderConfigError
from esprelay.message.mime import parse
from esprelay.models import Envelope, OutboundMessage
from esprelay.providers.postmark import TEST_TOKEN, PostmarkProvider
from esprelay.providers.registry import configure, env_values, get_kind
from esprelay.providers.sendgrid import SendGridProvider, build_payload, read_smtpapi
from esprelay.testing.fakeesp import FakeESP, Recorded, Reply
from tests.messages import corpus, crlf
from tests.providers import test_postmark, test_sendgrid
from tests.providers.common import send_case
from tests.relayproc import RelayProcess

RAW = crlf("From: s@example.com\nTo: r@example.org\nSubject: x\n\nhi\n")
ENVELOPE = Envelope("s@example.com", ("r@example.org",))
MESSAGE = OutboundMessage("m1", ENVELOPE, RAW)


# --- settings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "required"),
    [("sendgrid", {"ESPRELAY_SENDGRID_API_KEY": "k"}),
     ("postmark", {"ESPRELAY_POSTMARK_SERVER_TOKEN": "t"})],
)  # fmt: skip
def test_sandbox_is_off_by_default_and_read_from_the_environment(
    kind: str, required: dict[str, str]
) -> None:
    provider_kind = get_kind(kind)
    variable = f"ESPRELAY_{kind.upper()}_SANDBOX"
    off = configure(provider_kind, env_values(provider_kind, required))
    on = configure(provider_kind, env_values(provider_kind, {**required, variable: "true"}))
    named = configure(
        provider_kind,
        {**env_values(provider_kind, required), "sandbox": True},
        where="routes file [providers.named]",
    )
    client = httpx.AsyncClient()
    assert not off.build(client).sandbox
    assert on.build(client).sandbox
    built = named.build(client, "named")
    assert built.name == "named" and built.sandbox


# --- SendGrid ---------------------------------------------------------------------


def test_sendgrid_sandbox_mode_in_the_request() -> None:
    parsed = parse(RAW, ENVELOPE)
    assert "mail_settings" not in build_payload(parsed)[0]
    payload, _ = build_payload(parsed, sandbox=True)
    assert payload["mail_settings"] == {"sandbox_mode": {"enable": True}}
    assert test_sendgrid.validate(payload) == []


def test_sendgrid_sandbox_keeps_the_mail_settings_of_x_smtpapi() -> None:
    raw = crlf(
        "From: s@example.com\nTo: r@example.org\nSubject: x\n"
        'X-SMTPAPI: {"filters": {"footer": {"settings": {"enable": 1, "text/plain": "Bye"}}}}\n'
        "\nhi\n"
    )
    payload, _ = build_payload(parse(raw, ENVELOPE), read_smtpapi(raw), sandbox=True)
    assert payload["mail_settings"]["sandbox_mode"] == {"enable": True}
    assert payload["mail_settings"]["footer"]["text"] == "Bye"


def _sendgrid(*, sandbox: bool) -> SendGridProvider:
    return SendGridProvider(
        httpx.AsyncClient(), SecretStr("k"), "https://api.sendgrid.com", sandbox=sandbox
    )


def test_sendgrid_sandbox_answer_is_200_without_an_id() -> None:
    request = httpx.Request("POST", "https://api.sendgrid.com/v3/mail/send")
    answer = httpx.Response(200, request=request)
    result = _sendgrid(sandbox=True).parse_response(answer, MESSAGE)
    assert result.provider_message_id is None and result.warnings == ()
    with pytest.raises(ProviderConfigError):  # not in sandbox mode: some other server
        _sendgrid(sandbox=False).parse_response(answer, MESSAGE)
    accepted = httpx.Response(202, headers={"X-Message-Id": "sg-1"}, request=request)
    assert _sendgrid(sandbox=True).parse_response(accepted, MESSAGE).provider_message_id == ("sg-1")


class SendGridSandboxAPI(test_sendgrid.SendGridAPI):
    """As SendGrid answers a valid request in sandbox mode: 200, nothing sent."""

    def __call__(self, request: Recorded) -> Reply:
        reply = super().__call__(request)
        sandbox = request.json().get("mail_settings", {}).get("sandbox_mode", {})
        if reply.status == 202 and sandbox.get("enable") is True:
            return Reply(200, b"")
        return reply


def test_sendgrid_sandbox_end_to_end(relay_factory: type[RelayProcess]) -> None:
    (case,) = [c for c in corpus() if c.id == "printer"]
    with FakeESP(SendGridSandboxAPI()) as esp:
        relay = relay_factory(
            test_sendgrid.relay_env(esp, ESPRELAY_SENDGRID_SANDBOX="true")
        ).start()
        assert "providers=sendgrid(sendgrid:sandbox)" in relay.log
        send_case(relay, case)
        (request,) = esp.wait_for(1)
        relay.wait_for_log(r"delivered id=\S+ provider=sendgrid")
    assert request.json()["mail_settings"]["sandbox_mode"] == {"enable": True}
    assert "without an X-Message-Id" not in relay.log


# --- Postmark -----------------------------------------------------------------------


def _postmark(*, sandbox: bool) -> PostmarkProvider:
    return PostmarkProvider(
        httpx.AsyncClient(),
        SecretStr("real-server-token"),
        "https://api.postmarkapp.com",
        sandbox=sandbox,
    )


def test_postmark_sandbox_sends_with_the_test_token() -> None:
    on = _postmark(sandbox=True).build_request(MESSAGE).request
    assert on.headers["x-postmark-server-token"] == TEST_TOKEN == "POSTMARK_API_TEST"
    assert b"real-server-token" not in on.content
    off = _postmark(sandbox=False).build_request(MESSAGE).request
    assert off.headers["x-postmark-server-token"] == "real-server-token"


class PostmarkTestTokenAPI(test_postmark.PostmarkAPI):
    """Postmark with the test token: checked and answered as a send, nothing sent."""

    def __call__(self, request: Recorded) -> Reply:
        if request.headers.get("x-postmark-server-token") != TEST_TOKEN:
            return test_postmark._error(401, 10, "not the test token")
        headers = {**request.headers, "x-postmark-server-token": test_postmark.TOKEN}
        return super().__call__(dataclasses.replace(request, headers=headers))


def test_postmark_sandbox_end_to_end(relay_factory: type[RelayProcess]) -> None:
    (case,) = [c for c in corpus() if c.id == "printer"]
    with FakeESP(PostmarkTestTokenAPI()) as esp:
        relay = relay_factory(
            {**test_postmark.relay_env(esp), "ESPRELAY_POSTMARK_SANDBOX": "true"}
        ).start()
        assert "providers=postmark(postmark:sandbox)" in relay.log
        send_case(relay, case)
        (request,) = esp.wait_for(1)
        relay.wait_for_log(r"delivered id=\S+ provider=postmark")
    assert request.headers["x-postmark-server-token"] == TEST_TOKEN
    assert test_postmark.TOKEN not in relay.log


def test_named_providers_take_the_sandbox_setting(
    relay_factory: type[RelayProcess], tmp_path: Path
) -> None:
    with FakeESP(PostmarkTestTokenAPI()) as pm, FakeESP(SendGridSandboxAPI()) as sg:
        routes = tmp_path / "routes.toml"
        routes.write_text(
            f'[providers.pm-test]\nkind = "postmark"\nserver_token = "{test_postmark.TOKEN}"\n'
            f'api_url = "{pm.url}"\nmessage_stream = "{test_postmark.STREAM}"\nsandbox = true\n\n'
            f'[providers.sg-live]\nkind = "sendgrid"\napi_key = "{test_sendgrid.KEY}"\n'
            f'api_url = "{sg.url}"\n\n'
            '[default]\nproviders = ["pm-test", "sg-live"]\n'
        )
        relay = relay_factory({"ESPRELAY_ROUTES_FILE": str(routes)}).start()
        assert "pm-test(postmark:sandbox)" in relay.log
        assert "sg-live(sendgrid)" in relay.log
        (case,) = [c for c in corpus() if c.id == "printer"]
        send_case(relay, case)
        (request,) = pm.wait_for(1)
        relay.wait_for_log(r"delivered id=\S+ provider=pm-test")
    assert request.headers["x-postmark-server-token"] == TEST_TOKEN
    assert sg.requests == []
