"""SparkPost: the pure request builder, the template-engine protection, partial results,
the error table, and end to end over SMTP to a loopback fake that validates like
SparkPost's POST /api/v1/transmissions, substitutes like its template engine, and
answers as it does."""

from __future__ import annotations

import asyncio
import email.header
import re
import smtplib
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from esprelay.errors import (
    DeliveryError,
    MessageRejected,
    PermanentDeliveryError,
    ProviderConfigError,
    ProviderUnavailable,
    RateLimited,
)
from esprelay.models import Envelope, OutboundMessage
from esprelay.providers.sparkpost import (
    MAX_MESSAGE_SIZE,
    SparkPostProvider,
    SparkPostSettings,
    build_payload,
    protect_headers,
)
from esprelay.ratelimit import RateLimit
from esprelay.testing.fakeesp import FakeESP, Recorded, Reply, SparkPostAPI
from esprelay.testing.fakeesp import sparkpost_error as _error
from esprelay.testing.fakeesp import sparkpost_problems as validate
from esprelay.testing.fakeesp import sparkpost_render_headers as render_headers
from tests.fakeclock import FakeClock
from tests.messages import Case, corpus, crlf
from tests.providers.common import queue, send_case
from tests.providers.rawcheck import assert_arrived_as_meant, without_bcc
from tests.providers.test_mailgun import DOMAIN, form_fields, mailgun
from tests.providers.test_mailgun import KEY as MAILGUN_KEY
from tests.relayproc import RelayProcess

KEY = "0123456789abcdef0123456789abcdef01234567"
#: The sending domains the fake's account has verified.
VERIFIED = {"example.com", "old.example"}

# --- the fake (esprelay.testing.fakeesp.SparkPostAPI), with this test's account ------------


def sparkpost_api(
    *, refuse: set[str] | frozenset[str] = frozenset(), name: bool = False
) -> SparkPostAPI:
    return SparkPostAPI(KEY, verified=VERIFIED, refuse=refuse, name_refused=name)


# --- the pure builder ----------------------------------------------------------------


def _provider(**kwargs: Any) -> SparkPostProvider:
    return SparkPostProvider(
        httpx.AsyncClient(), SecretStr(KEY), "https://api.sparkpost.com/", **kwargs
    )


def _message(raw: bytes, *rcpts: str, id: str = "m1") -> OutboundMessage:
    return OutboundMessage(id, Envelope("app@example.com", rcpts or ("r@example.org",)), raw)


def test_request_shape() -> None:
    raw = crlf("From: app@example.com\nTo: r@example.org\nBcc: b@example.org\nSubject: x\n\nhi\n")
    built = _provider().build_request(_message(raw, "r@example.org", "b@example.org"))
    request = built.request
    assert str(request.url) == "https://api.sparkpost.com/api/v1/transmissions"
    assert request.headers["authorization"] == KEY  # the bare key, no scheme
    assert request.headers["content-type"] == "application/json"
    body = httpx.Response(200, content=request.read()).json()
    assert validate(body) == []
    assert body["recipients"] == [
        {"address": {"email": "r@example.org"}},
        {"address": {"email": "b@example.org"}},
    ]
    # SparkPost's SMTP relay defaults: no tracking (links and HTML as written).
    assert body["options"] == {
        "open_tracking": False,
        "click_tracking": False,
        "perform_substitutions": False,
    }
    assert body["metadata"] == {"esprelay_id": "m1"}
    assert "substitution_data" not in body
    assert body["content"]["email_rfc822"] == without_bcc(raw).decode()
    assert any("Bcc" in w for w in built.warnings)
    assert KEY not in repr(_provider())
    assert (
        _provider(sandbox=True).build_request(_message(raw)).request.read().count(b'"sandbox":true')
        == 1
    )


@pytest.mark.parametrize("case", corpus(), ids=lambda c: c.id)
def test_payload_is_the_message_minus_bcc(case: Case) -> None:
    message = OutboundMessage("c", Envelope(case.mail_from, case.rcpts), case.raw)
    payload, warnings = build_payload(message)
    assert validate(payload) == []
    assert [r["address"]["email"] for r in payload["recipients"]] == list(case.rcpts)
    sent = payload["content"]["email_rfc822"].encode("utf-8")
    assert_arrived_as_meant(case, sent)
    if case.id == "latin1":  # Latin-1 8bit cannot be JSON text: re-encoded, said so
        assert sent.isascii() and any("re-encoded to 7-bit" in w for w in warnings)
    else:
        assert sent == without_bcc(case.raw)


def test_limits() -> None:
    assert SparkPostProvider.max_message_size == MAX_MESSAGE_SIZE == 20_000_000
    assert SparkPostProvider.max_recipients == 10_000
    assert SparkPostProvider.rebuilds_message is False
    with pytest.raises(MessageRejected):
        build_payload(OutboundMessage("m", Envelope("a@example.com", ()), b"\r\nx"))


@pytest.mark.parametrize(
    "url", ["https://api.sparkpost.com", "https://api.eu.sparkpost.com/", "http://127.0.0.1:9"]
)
def test_api_url_is_scheme_and_host(url: str) -> None:
    assert SparkPostSettings(api_key=SecretStr("k"), api_url=url).api_urls() == (url,)


@pytest.mark.parametrize(
    "url", ["https://api.sparkpost.com/api/v1", "api.sparkpost.com", "ftp://x", "https://x/?a=1"]
)
def test_api_url_with_a_path_is_refused(url: str) -> None:
    with pytest.raises(ValidationError):
        SparkPostSettings(api_key=SecretStr("k"), api_url=url)


# --- the template engine: {{...}} in headers ------------------------------------------------

TEMPLATED = crlf(
    "From: {{app}} <app@example.com>\n"
    "To: r@example.org\n"
    "Subject: Use {{name}} and {{{raw}}} in your templates }} {\n"
    "X-Template: {{ if x }}a{{ end }}\n"
    "X-Quoted: =?utf-8?q?Caf=C3=A9_{{name}}?=\n"
    "X-Plain: no braces here {single}\n"
    "\n"
    "Body with {{name}} stays too.\n"
)


def _rendered(raw: bytes, payload: dict[str, Any]) -> bytes:
    """What SparkPost would send, by the fake's engine."""
    sent = payload["content"]["email_rfc822"].encode("utf-8")
    return render_headers(sent, payload.get("substitution_data", {}))


def test_the_hazard_is_real_without_protection() -> None:
    # The fake's engine on the message as it is: the header is mangled.
    assert b"Subject: Use  and  in your templates" in render_headers(TEMPLATED, {})


def test_protected_headers_come_back_unchanged() -> None:
    payload, warnings = build_payload(_message(TEMPLATED))
    assert payload["substitution_data"] == {"esprelaylbrace": "{", "esprelayrbrace": "}"}
    assert payload["options"]["perform_substitutions"] is False
    sent = payload["content"]["email_rfc822"]
    head, body = sent.split("\r\n\r\n", 1)
    assert "{{name}}" in body  # bodies: substitutions are off, nothing to protect
    assert "X-Plain: no braces here {single}" in head  # no {{: left as it is
    # Every brace of a protected field is a whole variable.
    subject = next(line for line in head.split("\r\n") if line.startswith("Subject:"))
    assert (
        re.sub(r"\{\{esprelay[lr]brace\}\}", "", subject)
        == "Subject: Use name and raw in your templates  "
    )
    rendered = _rendered(TEMPLATED, payload)
    fields = dict(
        line.split(": ", 1) for line in rendered.decode().split("\r\n\r\n")[0].split("\r\n")
    )
    assert fields["Subject"] == "Use {{name}} and {{{raw}}} in your templates }} {"
    assert fields["From"] == "{{app}} <app@example.com>"
    assert fields["X-Template"] == "{{ if x }}a{{ end }}"
    quoted = str(email.header.make_header(email.header.decode_header(fields["X-Quoted"])))
    assert quoted == "Café {{name}}"
    assert any("From, Subject, X-Template, X-Quoted" in w for w in warnings), warnings


def test_messages_without_braces_are_untouched() -> None:
    raw = crlf("From: a@example.com\nSubject: =?utf-8?q?Caf=C3=A9?= {x}\n\nb {{x}}\n")
    assert protect_headers(raw) == (raw, ())
    payload, _ = build_payload(_message(raw))
    assert "substitution_data" not in payload


def test_base64_encoded_braces_are_refused_at_data() -> None:
    word = email.header.Header("Grüße {{name}}", "utf-8").encode()
    assert word.startswith("=?utf-8?b?")
    raw = crlf(f"From: a@example.com\nSubject: {word}\n\nb\n")
    reason = _provider().refusal(_message(raw))
    assert reason is not None and "Subject" in reason and "template" in reason
    with pytest.raises(MessageRejected):
        build_payload(_message(raw))
    assert _provider().refusal(_message(TEMPLATED)) is None


def test_only_what_is_sent_is_judged() -> None:
    # A Bcc header never reaches SparkPost: braces there are no hazard.
    word = email.header.Header("Grüße {{x}}", "utf-8").encode()
    raw = crlf(f"From: a@example.com\nBcc: {word} <b@example.org>\n\nb\n")
    assert _provider().refusal(_message(raw)) is None
    payload, _ = build_payload(_message(raw))
    assert "substitution_data" not in payload and "Bcc" not in payload["content"]["email_rfc822"]


# --- X-MSYS-API: coming from SparkPost's SMTP relay ------------------------------------------


def test_msys_api_becomes_transmission_fields() -> None:
    raw = crlf(
        "From: app@example.com\nTo: r@example.org\nSubject: x\n"
        'X-MSYS-API: {"campaign_id": "welcome", "metadata": {"plan": "pro"},\n'
        ' "tags": ["a", "b"], "options": {"click_tracking": true, "ip_pool": "p1",\n'
        ' "perform_substitutions": true}, "substitution_data": {"x": 1}}\n\nhi\n'
    )
    payload, warnings = build_payload(_message(raw, "r@example.org", "s@example.org"))
    assert validate(payload) == []
    assert payload["campaign_id"] == "welcome"
    assert payload["metadata"] == {"plan": "pro", "esprelay_id": "m1"}
    assert [r["tags"] for r in payload["recipients"]] == [["a", "b"], ["a", "b"]]
    assert payload["options"] == {
        "open_tracking": False,
        "click_tracking": True,
        "ip_pool": "p1",
        "perform_substitutions": False,  # never on, whatever the header says
    }
    assert b"x-msys-api" not in payload["content"]["email_rfc822"].lower().encode()
    assert any("options.perform_substitutions" in w for w in warnings)
    assert any("substitution_data ignored" in w for w in warnings)
    assert _provider().refusal(_message(raw)) is None


@pytest.mark.parametrize(
    ("header", "said"),
    [
        ("{not json", "not valid JSON"),
        ('["a"]', "JSON object"),
        ('{"metadata": "x"}', "'metadata' must be of type 'json object'"),
        ('{"campaign_id": "' + "c" * 65 + '"}', "64 bytes"),
        ('{"options": {"open_tracking": "yes"}}', "options.open_tracking must be a boolean"),
        ('{"bcc": ["x@example.org"]}', "outside the envelope"),
        ('{"tags": [1]}', "array of strings"),
    ],
)
def test_msys_api_refused_at_data(header: str, said: str) -> None:
    raw = crlf(f"From: app@example.com\nTo: r@example.org\nX-MSYS-API: {header}\n\nhi\n")
    reason = _provider().refusal(_message(raw))
    assert reason is not None and said in reason, reason
    with pytest.raises(MessageRejected):
        build_payload(_message(raw))


# --- the answer: success, partial results, errors -----------------------------------------

_REQUEST = httpx.Request("POST", "https://api.sparkpost.com/api/v1/transmissions")


def _answer(rejected: int, accepted: int, errors: list[dict[str, str]]) -> httpx.Response:
    results: dict[str, Any] = {
        "total_rejected_recipients": rejected,
        "total_accepted_recipients": accepted,
        "id": "11668787484950530",
    }
    if errors:
        results["rcpt_to_errors"] = errors
    return httpx.Response(200, json={"results": results}, request=_REQUEST)


RCPTS = ("a@example.org", "b@example.org", "c@example.org")


def test_success_keeps_the_transmission_id() -> None:
    result = _provider().parse_response(_answer(0, 3, []), _message(b"\r\n", *RCPTS))
    assert result.provider_message_id == "11668787484950530"
    assert result.rejected == () and result.warnings == ()
    with pytest.raises(ProviderConfigError):
        _provider().parse_response(
            httpx.Response(200, text="<html>", request=_REQUEST), _message(b"\r\n")
        )


def test_partial_result_without_names_is_a_warning() -> None:
    error = {"message": "invalid data format/type", "code": "1300", "description": "bad"}
    result = _provider().parse_response(_answer(1, 2, [error]), _message(b"\r\n", *RCPTS))
    assert result.provider_message_id == "11668787484950530"
    assert result.rejected == ()
    (warning,) = result.warnings
    assert "accepted 2 of 3" in warning and "refused 1" in warning and "1300" in warning


def test_partial_result_naming_recipients_fills_rejected() -> None:
    errors = [
        {"message": "invalid data format/type", "code": "1300", "description": "b@example.org"},
        {"message": "x", "code": "1300", "description": "not ab@example.org.uk"},
    ]
    result = _provider().parse_response(_answer(1, 2, errors), _message(b"\r\n", *RCPTS))
    ((rcpt, error),) = result.rejected
    assert rcpt == "b@example.org" and isinstance(error, PermanentDeliveryError)
    assert "1300" in str(error) and result.warnings == ()


def test_every_recipient_refused_fails_the_message() -> None:
    with pytest.raises(MessageRejected, match="every recipient"):
        _provider().parse_response(_answer(3, 0, []), _message(b"\r\n", *RCPTS))


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [
        (420, "2101", RateLimited),
        (420, "2102", RateLimited),
        (429, "", RateLimited),
        (401, "1100", ProviderConfigError),
        (403, "1100", ProviderConfigError),
        (400, "7001", ProviderConfigError),
        (404, "1101", ProviderConfigError),
        (400, "1902", MessageRejected),
        (422, "1300", MessageRejected),
        (400, "5002", MessageRejected),
        (413, "", MessageRejected),
        (409, "2006", MessageRejected),
        (500, "", ProviderUnavailable),
        (503, "", ProviderUnavailable),
    ],
)
def test_error_table(status: int, code: str, error: type[DeliveryError]) -> None:
    body = {"errors": [{"message": "m", "code": code, "description": "d"}]} if code else {}
    response = httpx.Response(status, json=body, request=_REQUEST)
    found = _provider().classify_error(response)
    assert type(found) is error
    if code:
        assert f"{code} m: d" in str(found)


def test_a_proxys_html_400_is_retried() -> None:
    html = "<html><head><title>400 Bad Request</title></head><body>openresty</body></html>"
    response = httpx.Response(400, text=html, request=_REQUEST)
    assert type(_provider().classify_error(response)) is ProviderUnavailable


async def test_a_429_holds_every_request() -> None:
    clock = FakeClock()
    api = sparkpost_api()
    with FakeESP(api) as esp:
        esp.then(_error(429, "", "Too many requests", **{"Retry-After": "3"}))
        async with httpx.AsyncClient() as client:
            provider = SparkPostProvider(client, SecretStr(KEY), esp.url)
            provider.rate_limit = RateLimit(1000.0, burst=1000, clock=clock)
            raw = crlf("From: app@example.com\nTo: r@example.org\nSubject: x\n\nhi\n")
            with pytest.raises(RateLimited) as limited:
                await provider.send(_message(raw))
            assert limited.value.retry_after == 3.0
            retry = asyncio.create_task(provider.send(_message(raw)))
            await clock.waiting(1, seconds=3.0)
            assert len(esp.requests) == 1
            clock.advance(3.0)
            assert (await asyncio.wait_for(retry, 30)).provider_message_id
    assert len(esp.requests) == 2


async def test_rejected_survive_the_bcc_warning() -> None:
    """The send template merges build warnings into the result without losing
    ``rejected``."""
    api = sparkpost_api(refuse={"b@example.org"}, name=True)
    raw = crlf("From: app@example.com\nTo: a@example.org\nBcc: b@example.org\nSubject: x\n\nhi\n")
    with FakeESP(api) as esp:
        async with httpx.AsyncClient() as client:
            provider = SparkPostProvider(client, SecretStr(KEY), esp.url)
            result = await provider.send(_message(raw, "a@example.org", "b@example.org"))
    assert [r for r, _ in result.rejected] == ["b@example.org"]
    assert any("Bcc" in w for w in result.warnings)
    assert [a for a, _ in api.delivered] == ["a@example.org"]


# --- end to end: SMTP in, SparkPost's API out ----------------------------------------------


def relay_env(esp: FakeESP, **extra: str) -> dict[str, str]:
    return {
        "ESPRELAY_PROVIDER": "sparkpost",
        "ESPRELAY_SPARKPOST_API_KEY": KEY,
        "ESPRELAY_SPARKPOST_API_URL": esp.url,
        "ESPRELAY_RETRY_INITIAL": "0.2s",
        "ESPRELAY_RETRY_CONFIG_ERROR": "1s",
        **extra,
    }


def _case(subject: str, raw: bytes, sender: str = "app@example.com", *rcpts: str) -> Case:
    rcpts = rcpts or ("r@example.org",)
    return Case(subject, raw, sender, rcpts, "", (), (), (), None, None, None)


def test_corpus_end_to_end(relay_factory: type[RelayProcess]) -> None:
    cases = corpus()
    api = sparkpost_api()
    with FakeESP(api) as esp:
        relay = relay_factory(relay_env(esp)).start()
        assert "providers=sparkpost(sparkpost)" in relay.log
        for case in cases:
            send_case(relay, case)
        send_case(relay, _case("templated", TEMPLATED))
        esp.wait_for(len(cases) + 1)
        relay.wait_for_log(r"delivered id=\S+ provider=sparkpost", count=len(cases) + 1)
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
            smtp.ehlo("client.test")
            assert int(smtp.esmtp_features["size"]) == MAX_MESSAGE_SIZE
    by_rcpt: dict[str, list[bytes]] = {}
    for rcpt, sent in api.delivered:
        by_rcpt.setdefault(rcpt, []).append(sent)
    for case in cases:
        for rcpt in case.rcpts:
            (sent,) = [s for s in by_rcpt[rcpt] if f"X-Case: {case.id}".encode() in s]
            assert_arrived_as_meant(case, sent)
            if case.id != "latin1":
                assert sent == without_bcc(case.raw), case.id
    # The templated headers arrived as written, through the engine.
    (templated,) = by_rcpt["r@example.org"]
    assert templated.split(b"\r\n\r\n")[0].split(b"\r\n")[:4] == TEMPLATED.split(b"\r\n")[:4]
    assert all(b["options"]["perform_substitutions"] is False for b in api.bodies)
    assert KEY not in relay.log


def test_unprotectable_header_is_refused_at_data(relay_factory: type[RelayProcess]) -> None:
    word = email.header.Header("Grüße {{name}}", "utf-8").encode()
    raw = crlf(f"From: app@example.com\nTo: r@example.org\nSubject: {word}\n\nb\n")
    with FakeESP(sparkpost_api()) as esp:
        relay = relay_factory(relay_env(esp)).start()
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("app@example.com")
            assert smtp.rcpt("r@example.org")[0] == 250
            code, reply = smtp.data(raw)
        assert (code, reply[:5]) == (550, b"5.6.0"), reply
        assert b"Subject" in reply and b"template" in reply
    assert esp.requests == []


def test_msys_api_end_to_end(relay_factory: type[RelayProcess]) -> None:
    api = sparkpost_api()
    raw = crlf(
        "From: app@example.com\nTo: r@example.org\nSubject: relay\n"
        'X-MSYS-API: {"campaign_id": "c1", "options": {"open_tracking": true}}\n\nhi\n'
    )
    with FakeESP(api) as esp:
        relay = relay_factory(relay_env(esp)).start()
        send_case(relay, _case("relay", raw))
        (request,) = esp.wait_for(1)
        relay.wait_for_log(r"delivered id=\S+ provider=sparkpost")
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("app@example.com")
            smtp.rcpt("r@example.org")
            code, reply = smtp.data(raw.replace(b'"c1"', b'"c1"}'))
        assert (code, reply[:5]) == (550, b"5.6.0"), reply
        assert b"X-MSYS-API is not valid JSON" in reply
    body = request.json()
    assert body["campaign_id"] == "c1" and body["options"]["open_tracking"] is True
    ((_, sent),) = api.delivered
    assert b"X-MSYS-API" not in sent and sent.startswith(b"From: app@example.com\r\n")


def test_sandbox_end_to_end(relay_factory: type[RelayProcess]) -> None:
    api = sparkpost_api()
    with FakeESP(api) as esp:
        relay = relay_factory(relay_env(esp, ESPRELAY_SPARKPOST_SANDBOX="true")).start()
        assert "providers=sparkpost(sparkpost:sandbox)" in relay.log
        raw = crlf("From: t@sparkpostbox.com\nTo: r@example.org\nSubject: s\n\nhi\n")
        send_case(relay, _case("sandbox", raw, "t@sparkpostbox.com"))
        (request,) = esp.wait_for(1)
        relay.wait_for_log(r"delivered id=\S+ provider=sparkpost")
    assert request.json()["options"]["sandbox"] is True


def test_partial_result_end_to_end(relay_factory: type[RelayProcess]) -> None:
    api = sparkpost_api(refuse={"refused@example.org"})
    rcpts = ("ok@example.org", "refused@example.org")
    raw = crlf("From: app@example.com\nTo: ok@example.org, refused@example.org\nSubject: p\n\nhi\n")
    with FakeESP(api) as esp:
        relay = relay_factory(relay_env(esp)).start()
        spool_id = send_case(relay, _case("partial", raw, "app@example.com", *rcpts))
        relay.wait_for_log(rf"delivered id={spool_id} provider=sparkpost")
        relay.wait_for_log(rf"id={spool_id} provider=sparkpost changed the message: .*refused 1")
        assert len(esp.requests) == 1  # accepted: never sent again
    assert [a for a, _ in api.delivered] == ["ok@example.org"]


def test_error_mapping_end_to_end(relay_factory: type[RelayProcess]) -> None:
    attempts: dict[str, list[float]] = {}
    lock = threading.Lock()
    api = sparkpost_api()

    def respond(request: Recorded) -> Reply:
        found = re.search(r"Subject: (\S+)", request.json()["content"]["email_rfc822"])
        subject = found[1] if found else ""
        with lock:
            seen = attempts.setdefault(subject, [])
            seen.append(time.monotonic())
            n = len(seen)
        if subject == "quota" and n == 1:
            return _error(420, "2102", "Exceed Sending Limit (daily)")
        if subject == "throttled" and n == 1:
            return _error(429, "", "Too many requests", **{"Retry-After": "2"})
        if subject == "unauthorized" and n == 1:
            return _error(401, "1100", "Unauthorized.")
        return api(request)

    # Four failing at once: the breaker opens at five in a row (5xx: the failover test).
    subjects = ("quota", "throttled", "unauthorized", "unverified")
    with FakeESP(respond) as esp:
        relay = relay_factory(relay_env(esp)).start()
        ids = {}
        for subject in subjects:
            sender = "app@unverified.example" if subject == "unverified" else "app@example.com"
            raw = crlf(f"From: {sender}\nTo: r@example.org\nSubject: {subject}\n\nhi\n")
            ids[subject] = send_case(relay, _case(subject, raw, sender))
        for subject in subjects[:3]:
            relay.wait_for_log(rf"delivered id={ids[subject]} provider=sparkpost attempt=2")
        relay.wait_for_log(rf"deferred id={ids['unverified']} .*7001.*configuration problem")
        assert queue(relay, "failed") == []
    first, second = attempts["throttled"]
    assert second - first >= 1.9  # Retry-After (2 s) rather than RETRY_INITIAL (0.2 s)
    first, second = attempts["unauthorized"]
    assert second - first >= 0.9  # a configuration problem is retried slowly


def test_invalid_message_bounces_end_to_end(relay_factory: type[RelayProcess]) -> None:
    api = sparkpost_api()

    def respond(request: Recorded) -> Reply:
        head = request.json()["content"]["email_rfc822"].split("\r\n\r\n", 1)[0]
        if "Subject: invalid" in head:  # not the bounce, which quotes it in its body
            return _error(422, "1300", "invalid data format/type", "Unable to parse MIME")
        return api(request)

    with FakeESP(respond) as esp:
        # SparkPost sends only from verified domains: bounces too.
        relay = relay_factory(
            relay_env(esp, ESPRELAY_BOUNCE_FROM="mailer-daemon@example.com")
        ).start()
        raw = crlf("From: app@example.com\nTo: r@example.org\nSubject: invalid\n\nhi\n")
        spool_id = send_case(relay, _case("invalid", raw))
        relay.wait_for_log(rf"failed id={spool_id} ", timeout=30)
        (failed,) = queue(relay, "failed")
        assert "1300" in failed["last_error"]
        # The bounce went back to the sender through SparkPost too.
        relay.wait_for_log(r"delivered id=\S+ provider=sparkpost")
    assert [rcpt for rcpt, _ in api.delivered] == ["app@example.com"]


def test_failover_between_sparkpost_and_mailgun_end_to_end(
    relay_factory: type[RelayProcess], tmp_path: Path
) -> None:
    """A route mixing SparkPost and an older provider fails over both ways."""
    api = sparkpost_api()

    def sparkpost_down_for_some(request: Recorded) -> Reply:
        if request.json()["recipients"][0]["address"]["email"].startswith("via-mailgun"):
            return Reply(503, "Service Unavailable")
        return api(request)

    def mailgun_down_for_some(request: Recorded) -> Reply:
        rcpts = [v.decode() for n, _, v in form_fields(request) if n == "to"]
        if rcpts[0].startswith("via-sparkpost"):
            return Reply(503, "Service Unavailable")
        return mailgun(request)

    with FakeESP(sparkpost_down_for_some) as sp, FakeESP(mailgun_down_for_some) as mg:
        routes = tmp_path / "routes.toml"
        routes.write_text(
            f'[providers.sp]\nkind = "sparkpost"\napi_key_env = "TEST_SPARKPOST_KEY"\n'
            f'api_url = "{sp.url}"\n'
            f'[providers.mg]\nkind = "mailgun"\napi_key_env = "TEST_MAILGUN_KEY"\n'
            f'domain = "{DOMAIN}"\napi_url = "{mg.url}"\n'
            '[[routes]]\nsender_domains = ["old.example"]\nproviders = ["mg", "sp"]\n'
            '[default]\nproviders = ["sp", "mg"]\n'
        )
        relay = relay_factory(
            {
                "TEST_SPARKPOST_KEY": KEY,
                "TEST_MAILGUN_KEY": MAILGUN_KEY,
                "ESPRELAY_ROUTES_FILE": str(routes),
                "ESPRELAY_RETRY_INITIAL": "0.2s",
            }
        ).start()
        for sender, rcpt in (
            ("app@example.com", "via-mailgun@example.org"),
            ("app@old.example", "via-sparkpost@example.org"),
        ):
            raw = crlf(f"From: {sender}\nTo: {rcpt}\nBcc: hidden@example.org\nSubject: f\n\nhi\n")
            send_case(relay, _case(rcpt, raw, sender, rcpt, "hidden@example.org"))
        relay.wait_for_log(r"delivered id=\S+ provider=mg", timeout=30)
        relay.wait_for_log(r"delivered id=\S+ provider=sp", timeout=30)
    # Each was tried first on its route's first provider, then delivered by the other.
    assert [r.json()["recipients"][0]["address"]["email"] for r in sp.requests] == [
        "via-mailgun@example.org",
        "via-sparkpost@example.org",
    ]
    assert sorted(a for a, _ in api.delivered) == [
        "hidden@example.org",
        "via-sparkpost@example.org",
    ]
    for _, sent in api.delivered:
        assert b"hidden@" not in sent.split(b"\r\n\r\n")[0]
    assert sorted(v.decode() for r in mg.requests for n, _, v in form_fields(r) if n == "to") == [
        "hidden@example.org",
        "hidden@example.org",
        "via-mailgun@example.org",
        "via-sparkpost@example.org",
    ]


# --- esprelay doctor: the credential check ----------------------------------------------


def _account(request: Recorded) -> Reply:
    """The fake's GET /api/v1/account, and 403 for a key without Account: Read-only
    (SparkPost's "permission denied")."""
    if request.headers.get("authorization") == "send-only-key":
        return _error(403, "1100", "permission denied")
    return sparkpost_api()(request)


@pytest.mark.parametrize(
    ("key", "status", "said"),
    [(KEY, "pass", "credentials accepted"), ("send-only-key", "warn", "Transmissions"),
     ("wrong-key-4798", "fail", "HTTP 401")],
)  # fmt: skip
def test_doctor_checks_the_key(tmp_path: Path, key: str, status: str, said: str) -> None:
    from tests.test_doctor import checks, doctor, make_spool

    make_spool(tmp_path)
    with FakeESP(_account) as esp:
        env = {
            "ESPRELAY_PROVIDER": "sparkpost",
            "ESPRELAY_SPARKPOST_API_KEY": key,
            "ESPRELAY_SPARKPOST_API_URL": esp.url,
        }
        result = doctor(tmp_path, env, "--json")
    check = checks(result)["credentials sparkpost"]
    assert check["status"] == status, check
    assert said in check["detail"]
    assert (check["fix"] != "") == (status != "pass")
    assert key not in result.stdout + result.stderr
    assert [(r.method, r.path) for r in esp.requests] == [("GET", "/api/v1/account")]
