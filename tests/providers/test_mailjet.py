"""Mailjet: the pure request builder, its control headers, Mailjet's per-message results
(partial failure fills ``SendResult.rejected``), the 429 hold, the doctor's check, and
end to end over SMTP to the loopback fake of ``esprelay.testing.fakeesp.MailjetAPI``."""

from __future__ import annotations

import asyncio
import base64
import email.header
import hashlib
import smtplib
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from esprelay.errors import (
    DeliveryError,
    MessageRejected,
    PermanentDeliveryError,
    ProviderConfigError,
    ProviderUnavailable,
    RateLimited,
    TransientDeliveryError,
)
from esprelay.message.mime import parse
from esprelay.models import Envelope, OutboundMessage
from esprelay.providers import mailjet as mailjet_module
from esprelay.providers.mailjet import (
    GROUPS,
    MAX_RECIPIENTS,
    ControlHeaderError,
    MailjetProvider,
    build_payload,
    read_controls,
)
from esprelay.ratelimit import RateLimit
from esprelay.testing.fakeesp import FakeESP, MailjetAPI, Recorded, Reply, mailjet_errors
from tests.fakeclock import FakeClock
from tests.messages import Case, corpus, crlf
from tests.providers.common import queue, send_case
from tests.providers.test_mailgun import DOMAIN, form_fields, mailgun
from tests.providers.test_mailgun import KEY as MAILGUN_KEY
from tests.relayproc import RelayProcess
from tests.test_doctor import checks, doctor, make_spool

KEY = "mj-public-key-0123456789"
SECRET = "mj-secret-key-not-a-secret-9876"
#: Headers the corpus carries that Mailjet's API cannot (forbidden ones).
NOT_CARRIED = {"message-id", "date", "x-mailer"}


def _provider(**kwargs: Any) -> MailjetProvider:
    return MailjetProvider(
        httpx.AsyncClient(), SecretStr(KEY), SecretStr(SECRET), "https://api.mailjet.com/", **kwargs
    )


def _messages(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Each Mailjet message as Mailjet reads it: Globals under the message's own."""
    return [{**payload.get("Globals", {}), **m} for m in payload["Messages"]]


def _message(
    text: str, rcpts: tuple[str, ...] = ("r@example.org",), id: str = "m"
) -> OutboundMessage:
    return OutboundMessage(id, Envelope("s@example.com", rcpts), crlf(text))


# --- pure builder ---------------------------------------------------------------------


def check_payload(payload: dict[str, Any], case: Case) -> None:
    messages = _messages(payload)
    for message in messages:
        assert mailjet_errors(message) == []
    (message,) = messages  # every corpus case has a visible recipient: one message
    people = {f: [p["Email"].lower() for p in message.get(f, [])] for f in ("To", "Cc", "Bcc")}
    assert people == {"To": list(case.to), "Cc": list(case.cc), "Bcc": list(case.bcc)}
    assert message["From"]["Email"] == case.from_addr
    assert message.get("Subject") == case.subject
    assert (message.get("TextPart") or "").replace("\r\n", "\n") == (case.text or "")
    assert (message.get("HTMLPart") or "").replace("\r\n", "\n") == (case.html or "")
    got = [
        (a["Filename"], hashlib.sha256(base64.b64decode(a["Base64Content"])).hexdigest())
        for kind in ("InlinedAttachments", "Attachments")
        for a in message.get(kind, [])
    ]
    assert got == [(a.filename, a.sha256) for a in case.attachments]
    inline = {a["Filename"]: a.get("ContentID") for a in message.get("InlinedAttachments", [])}
    assert inline == {a.filename: a.content_id for a in case.attachments if a.content_id}
    headers = message.get("Headers", {})
    for name, value in case.headers.items():
        if name.lower() not in NOT_CARRIED:
            assert headers[name] == value
    assert not NOT_CARRIED & {n.lower() for n in headers}
    assert headers.get("X-Case") == case.id
    visible = repr(headers) + repr(people["To"] + people["Cc"])
    for hidden in case.hidden:
        assert hidden not in visible


@pytest.mark.parametrize("case", corpus(), ids=lambda c: c.id)
def test_build_payload_for_corpus(case: Case) -> None:
    parsed = parse(case.raw, Envelope(case.mail_from, case.rcpts))
    payload, groups, warnings = build_payload(parsed, "spool-1")
    check_payload(payload, case)
    assert _messages(payload)[0]["CustomID"] == "spool-1"
    assert "SandboxMode" not in payload
    assert {a.lower() for a in groups[0]} == {a.lower() for a in case.rcpts}
    for expected in case.warnings:
        assert any(expected in w for w in warnings), warnings
    if b"Message-ID" in case.raw:
        assert any("Message-ID" in w and "cannot be set" in w for w in warnings), warnings


def test_identity_headers_are_a_recorded_loss_and_threading_is_kept() -> None:
    (case,) = [c for c in corpus() if c.id == "utf8-alternative"]
    payload, _, warnings = build_payload(parse(case.raw, Envelope(case.mail_from, case.rcpts)), "i")
    headers = payload["Messages"][0]["Headers"]
    assert headers["In-Reply-To"] == "<parent@example.com>"
    assert headers["References"] == "<root@example.com> <parent@example.com>"
    (loss,) = [w for w in warnings if "cannot be set" in w]
    assert loss.startswith("Message-ID and Date cannot be set") and "MessageID" in loss
    assert any("X-Mailer" in w and "dropped" in w for w in warnings)
    # Names go as they are: the v3.1 API takes commas and non-ASCII in them.
    assert payload["Messages"][0]["To"][0] == {"Email": "hans@example.org", "Name": "Müller, Hans"}


def test_only_blind_recipients_get_one_message_each_with_the_content_once() -> None:
    raw = "From: s@example.com\nTo: undisclosed-recipients:;\nSubject: x\n\nhi\n"
    rcpts = ("a@example.org", "b@example.org", "c@example.org")
    payload, groups, warnings = build_payload(parse(crlf(raw), Envelope("s@x.org", rcpts)), "m")
    assert payload["Messages"] == [{"To": [{"Email": a}]} for a in rcpts]
    assert payload["Globals"]["TextPart"] == "hi\r\n" and payload["Globals"]["CustomID"] == "m"
    assert groups == (("a@example.org",), ("b@example.org",), ("c@example.org",))
    assert all(mailjet_errors(m) == [] for m in _messages(payload))
    assert any("copy addressed to itself" in w for w in warnings)
    # One blind recipient alone is simply the To.
    one, groups, _ = build_payload(parse(crlf(raw), Envelope("s@x.org", rcpts[:1])), "m")
    assert one == {"Messages": [{**one["Messages"][0], "To": [{"Email": "a@example.org"}]}]}
    assert groups == (("a@example.org",),)


def test_cc_only_is_sent_as_to() -> None:
    raw = "From: s@example.com\nCc: a@example.org\nSubject: x\n\nhi\n"
    payload, _, warnings = build_payload(
        parse(crlf(raw), Envelope("s@x.org", ("a@example.org",))), "m"
    )
    assert payload["Messages"][0]["To"] == [{"Email": "a@example.org"}]
    assert "Cc" not in payload["Messages"][0]
    assert any("sent as To" in w for w in warnings)


def test_headers_mailjet_refuses_are_dropped_and_non_ascii_encoded() -> None:
    raw = (
        "From: s@example.com\nTo: r@example.org\nSubject: x\nList-Id: <l.example.com>\n"
        "Received: from a by b\nX-Note: café\nX-Twice: 1\nX-Twice: 2\nSender: o@example.com\n"
        "List-Unsubscribe: <mailto:u@example.com>\n\nhi\n"
    )
    payload, _, warnings = build_payload(
        parse(crlf(raw), Envelope("s@x.org", ("r@example.org",))), "m"
    )
    headers = payload["Messages"][0]["Headers"]
    assert set(headers) == {"X-Note", "X-Twice", "List-Unsubscribe"}
    assert headers["X-Twice"] == "1" and headers["X-Note"].startswith("=?utf-8?q?")
    assert str(email.header.make_header(email.header.decode_header(headers["X-Note"]))) == "café"
    assert any("List-Id" in w and "Received" in w and "Sender" in w for w in warnings), warnings
    assert any("repeated" in w and "X-Twice" in w for w in warnings)
    assert mailjet_errors(payload["Messages"][0]) == []


def test_long_subject_no_body_reply_to_and_text_attachment_charset() -> None:
    raw = (
        "From: s@example.com\nTo: r@example.org\nReply-To: a@example.com, b@example.com\n"
        f"Subject: {'x' * 300}\nMIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="b"\n\n--b\n'
        "Content-Type: text/plain; charset=iso-8859-1; name=note.txt\n"
        "Content-Disposition: attachment; filename=note.txt\n"
        "Content-Transfer-Encoding: base64\n\n"
        + base64.b64encode("Köln".encode("latin-1")).decode()
        + "\n--b--\n"
    )
    payload, _, warnings = build_payload(
        parse(crlf(raw), Envelope("s@x.org", ("r@example.org",))), "m"
    )
    message = payload["Messages"][0]
    assert len(message["Subject"]) == 255 and any("cut to 255" in w for w in warnings)
    assert message["TextPart"] == " " and any("blank text body" in w for w in warnings)
    assert message["ReplyTo"] == {"Email": "a@example.com"}
    assert any("takes one" in w for w in warnings)
    (att,) = message["Attachments"]
    assert att["ContentType"] == "text/plain"  # Mailjet adds charset=utf-8 itself
    assert base64.b64decode(att["Base64Content"]).decode("utf-8") == "Köln"
    assert mailjet_errors(message) == []


def test_more_than_50_recipients_and_the_limits() -> None:
    rcpts = tuple(f"r{i}@example.org" for i in range(MAX_RECIPIENTS + 1))
    with pytest.raises(MessageRejected):
        build_payload(parse(crlf("From: s@example.com\n\nhi\n"), Envelope("s@x.org", rcpts)), "m")
    assert MailjetProvider.max_recipients == 50
    assert MailjetProvider.max_message_size == 15_000_000
    assert MailjetProvider.smtputf8 and MailjetProvider.rebuilds_message


def test_sandbox_sets_sandbox_mode_at_the_root() -> None:
    built = _provider(sandbox=True).build_request(_message("From: s@example.com\n\nhi\n"))
    body = httpx.Response(200, content=built.request.read()).json()
    assert body["SandboxMode"] is True and "SandboxMode" not in body["Messages"][0]


def test_request_shape() -> None:
    built = _provider().build_request(_message("From: s@example.com\nTo: r@example.org\n\nhi\n"))
    request = built.request
    assert str(request.url) == "https://api.mailjet.com/v3.1/send"
    assert (
        request.headers["authorization"]
        == "Basic " + base64.b64encode(f"{KEY}:{SECRET}".encode()).decode()
    )
    assert request.headers["content-type"] == "application/json"
    assert request.extensions[GROUPS] == (("r@example.org",),)
    assert KEY not in repr(_provider()) and SECRET not in repr(_provider())


# --- control headers ------------------------------------------------------------------


def test_control_headers_become_properties() -> None:
    raw = crlf(
        "From: s@example.com\nTo: r@example.org\nSubject: x\nX-Mailjet-Campaign: spring sale\n"
        'X-Mailjet-DeduplicateCampaign: yes\nX-MJ-EventPayload: {"order": 42}\n'
        "X-Mailjet-TrackOpen: 0\nX-Mailjet-TrackClick: 1\nX-Mailjet-Prio: 2\n"
        "X-MJ-MonitoringCategory: orders\nX-MJ-CustomID: app-7\nX-MJ-TemplateID: 12\n"
        "Content-Type: text/html\n\n<p>hi</p>\n"
    )
    message = OutboundMessage("spool-9", Envelope("s@x.org", ("r@example.org",)), raw)
    built = _provider().build_request(message)
    sent = httpx.Response(200, content=built.request.read()).json()["Messages"][0]
    assert {k: sent[k] for k in mailjet_module.CONTROLS.values()} == {
        "CustomCampaign": "spring sale",
        "DeduplicateCampaign": True,
        "EventPayload": '{"order": 42}',
        "TrackOpens": "disabled",
        "TrackClicks": "enabled",
        "Priority": 2,
        "MonitoringCategory": "orders",
    }
    assert sent["CustomID"] == "spool-9"  # the spool id, not the message's X-MJ-CustomID
    assert "Headers" not in sent  # no control header is passed on as a header
    assert any("X-MJ-CustomID" in w and "X-MJ-TemplateID" in w for w in built.warnings)
    assert mailjet_errors(sent) == []


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("X-Mailjet-TrackOpen: yes", "X-Mailjet-TrackOpen 'yes' is not 0 or 1"),
        ("X-Mailjet-Prio: high", "X-Mailjet-Prio 'high' is not a priority number"),
        ("X-Mailjet-DeduplicateCampaign: maybe", "is not true or false"),
        ("X-Mailjet-DeduplicateCampaign: 1", "needs an X-Mailjet-Campaign"),
        ("X-Mailjet-Campaign: " + "c" * 256, "over 255 characters"),
        ("X-MJ-EventPayload:", "X-MJ-EventPayload is empty"),
    ],
)
def test_malformed_control_headers_are_refused(header: str, reason: str) -> None:
    message = _message(f"From: s@example.com\nTo: r@example.org\n{header}\n\nhi\n")
    refusal = _provider().refusal(message)
    assert refusal is not None and reason in refusal, refusal
    with pytest.raises(MessageRejected):  # a message spooled before: fails, not sent
        _provider().build_request(message)


def test_a_plain_message_is_not_read_for_controls(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_read(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("header read at the end of DATA")

    monkeypatch.setattr(mailjet_module, "read_header", no_read)
    assert _provider().refusal(_message("From: s@example.com\nTo: r@example.org\n\nhi\n")) is None
    assert read_controls(b"Subject: x\r\n\r\nX-Mailjet-Prio: no\r\n").properties == {}
    with pytest.raises(ControlHeaderError):
        mailjet_module.controls_from([("x-mailjet-trackclick", "2")])


# --- Mailjet's answer, over loopback ----------------------------------------------------


BLIND = "From: s@example.com\nTo: undisclosed-recipients:;\nSubject: blind\n\nhi\n"
THREE = ("a@example.org", "b@example.org", "c@example.org")


async def _send(api: MailjetAPI, message: OutboundMessage, **kwargs: Any) -> Any:
    with FakeESP(api) as esp:
        async with httpx.AsyncClient() as client:
            provider = MailjetProvider(client, SecretStr(KEY), SecretStr(SECRET), esp.url, **kwargs)
            try:
                return await provider.send(message)
            finally:
                assert len(esp.requests) == 1


async def test_success_keeps_every_recipients_message_id() -> None:
    message = _message("From: s@example.com\nTo: a@example.org\nCc: b@example.org\n\nhi\n", THREE)
    result = await _send(MailjetAPI(KEY, SECRET), message)
    ids = result.provider_message_id.split(" ")
    assert len(ids) == 3 and all(i.isdigit() for i in ids)
    assert result.rejected == ()


async def test_sandbox_answer_has_no_message_id() -> None:
    result = await _send(MailjetAPI(KEY, SECRET), _message(BLIND, THREE), sandbox=True)
    assert result.provider_message_id is None and result.rejected == ()


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        ((400, "mj-0013", '"b@example.org" is an invalid email'), MessageRejected),
        ((429, "mj-0002", "Too many requests"), RateLimited),
        ((500, "mj-0000", "Internal error"), ProviderUnavailable),
        ((403, "send-0008", "sender not authorized"), ProviderConfigError),
    ],
)
async def test_partial_failure_names_only_the_refused_recipient(
    error: tuple[int, str, str], kind: type[DeliveryError]
) -> None:
    api = MailjetAPI(KEY, SECRET, refuse=lambda a: error if a == "b@example.org" else None)
    result = await _send(api, _message(BLIND, THREE))
    # Mailjet answered 400 with both results: a and c were sent, b was not.
    assert len(result.provider_message_id.split(" ")) == 2
    ((address, refused),) = result.rejected
    assert address == "b@example.org" and type(refused) is kind
    assert refused.permanent == (kind is MessageRejected)
    assert error[1] in str(refused) and refused.status_code == error[0]


async def test_every_message_refused_raises_a_retryable_error_if_any_is() -> None:
    def refuse(address: str) -> tuple[int, str, str]:
        if address == "c@example.org":
            return (500, "mj-0000", "Internal error")
        return (400, "mj-0013", "invalid email")

    with pytest.raises(ProviderUnavailable):  # a and b fail again, alone, on the retry
        await _send(MailjetAPI(KEY, SECRET, refuse=refuse), _message(BLIND, THREE))
    with pytest.raises(MessageRejected) as rejected:
        await _send(
            MailjetAPI(KEY, SECRET, refuse=lambda a: (400, "mj-0013", "invalid email")),
            _message(BLIND, THREE),
        )
    assert "mj-0013" in str(rejected.value)


async def test_one_message_with_a_validation_error_fails_as_a_whole() -> None:
    # Every recipient is in one message: one invalid address stops all of them.
    message = _message("From: s@example.com\nTo: a@example.org\n\nhi\n", ("a@example.org", "x@y"))
    api = MailjetAPI(
        KEY, SECRET, refuse=lambda a: (400, "mj-0013", "invalid") if a == "x@y" else None
    )
    with pytest.raises(MessageRejected):
        await _send(api, message)


_REQUEST = httpx.Request("POST", "https://api.mailjet.com/v3.1/send")


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (400, {"ErrorCode": "mj-0002", "ErrorMessage": "Malformed JSON", "StatusCode": 400},
         MessageRejected),
        (401, {"ErrorCode": "mj-0015", "ErrorMessage": "bad key", "StatusCode": 401},
         ProviderConfigError),
        (401, "", ProviderConfigError),
        (403, {"ErrorCode": "mj-0001", "ErrorMessage": "suspended"}, ProviderConfigError),
        (404, "Not Found", ProviderConfigError),
        (413, "Too large", MessageRejected),
        (429, "", RateLimited),
        (500, {"ErrorIdentifier": "D4DF", "StatusCode": 500}, ProviderUnavailable),
        (503, "down", ProviderUnavailable),
    ],
)  # fmt: skip
def test_error_classification(status: int, body: Any, error: type[DeliveryError]) -> None:
    kwargs: dict[str, Any] = {"json": body} if isinstance(body, dict) else {"text": body}
    response = httpx.Response(status, request=_REQUEST, **kwargs)
    provider = _provider()
    assert not provider.answered(response)
    assert type(provider.classify_error(response)) is error


def test_answers_without_a_result_for_each_message_are_not_mailjets() -> None:
    provider = _provider()
    message = _message("From: s@example.com\nTo: r@example.org\n\nhi\n")
    request = provider.build_request(message).request
    for body in ({}, {"Messages": []}, {"Messages": [{"Status": "success"}] * 2}):
        response = httpx.Response(200, json=body, request=request)
        with pytest.raises(ProviderConfigError):
            provider.parse_response(response, message)
    # A 4xx that lists results is read like a success; one that does not is an error.
    listed = httpx.Response(400, json={"Messages": [{"Status": "error"}]}, request=request)
    assert provider.answered(listed)
    with pytest.raises(PermanentDeliveryError):
        provider.parse_response(listed, message)
    assert not provider.answered(httpx.Response(400, json={"ErrorCode": "x"}, request=request))
    # Without the request (a response made by hand), the groups come from the message.
    bare = httpx.Response(200, json={"Messages": [{"Status": "success", "To": []}]})
    assert provider.parse_response(bare, message).provider_message_id is None


async def test_a_429_holds_every_request_and_honours_retry_after() -> None:
    clock = FakeClock()
    with FakeESP(MailjetAPI(KEY, SECRET)) as esp:
        esp.then(Reply(429, "", {"Retry-After": "7"}))
        async with httpx.AsyncClient() as client:
            provider = MailjetProvider(client, SecretStr(KEY), SecretStr(SECRET), esp.url)
            provider.rate_limit = RateLimit(1000.0, burst=1000, clock=clock)
            message = _message("From: s@example.com\nTo: r@example.org\n\nhi\n")
            with pytest.raises(RateLimited) as limited:
                await provider.send(message)
            assert limited.value.retry_after == 7.0
            retry = asyncio.create_task(provider.send(message))
            await clock.waiting(1, seconds=7.0)
            assert len(esp.requests) == 1
            clock.advance(7.0)
            assert (await asyncio.wait_for(retry, 30)).provider_message_id
    assert len(esp.requests) == 2


# --- the doctor's credential check --------------------------------------------------------


def test_doctor_checks_the_key_pair(tmp_path: Path) -> None:
    make_spool(tmp_path)
    with FakeESP(MailjetAPI(KEY, SECRET)) as esp:
        env = {
            "ESPRELAY_PROVIDER": "mailjet",
            "ESPRELAY_MAILJET_API_KEY": KEY,
            "ESPRELAY_MAILJET_SECRET_KEY": SECRET,
            "ESPRELAY_MAILJET_API_URL": esp.url,
        }
        good = checks(doctor(tmp_path, env, "--json"))["credentials mailjet"]
        wrong = {**env, "ESPRELAY_MAILJET_SECRET_KEY": "mj-wrong-secret-4799"}
        result = doctor(tmp_path, wrong, "--json")
        bad = checks(result)["credentials mailjet"]
    assert good["status"] == "pass", good
    assert bad["status"] == "fail" and "HTTP 401" in bad["detail"]
    assert "ESPRELAY_MAILJET_SECRET_KEY" in bad["fix"]
    assert "mj-wrong-secret-4799" not in result.stdout + result.stderr
    assert [r.path for r in esp.requests] == ["/v3/REST/apikey"] * 2


# --- end to end: SMTP in, Mailjet's API out -----------------------------------------------


def relay_env(esp: FakeESP, **extra: str) -> dict[str, str]:
    return {
        "ESPRELAY_PROVIDER": "mailjet",
        "ESPRELAY_MAILJET_API_KEY": KEY,
        "ESPRELAY_MAILJET_SECRET_KEY": SECRET,
        "ESPRELAY_MAILJET_API_URL": esp.url,
        "ESPRELAY_RETRY_INITIAL": "0.2s",
        "ESPRELAY_RETRY_CONFIG_ERROR": "1s",
        **extra,
    }


def _case(subject: str, rcpts: tuple[str, ...] = ("r@example.org",), head: str = "") -> Case:
    raw = crlf(f"From: s@example.com\nTo: {rcpts[0]}\nSubject: {subject}\n{head}\nhi\n")
    return Case(subject, raw, "s@example.com", rcpts, "", (), (), (), None, None, None)


def test_corpus_end_to_end(relay_factory: type[RelayProcess]) -> None:
    cases = corpus()
    with FakeESP(MailjetAPI(KEY, SECRET)) as esp:
        relay = relay_factory(relay_env(esp)).start()
        ids = {case.id: send_case(relay, case) for case in cases}
        esp.wait_for(len(cases))
        relay.wait_for_log(r"delivered id=\S+ provider=mailjet", count=len(cases))
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
            smtp.ehlo("client.test")
            assert int(smtp.esmtp_features["size"]) == MailjetProvider.max_message_size
            assert "smtputf8" in smtp.esmtp_features
            # A malformed control header is refused at the end of DATA.
            smtp.mail("s@example.com")
            assert smtp.rcpt("r@example.org")[0] == 250
            code, reply = smtp.data(_case("bad", head="X-Mailjet-TrackOpen: on\n").raw)
            assert (code, reply[:5]) == (550, b"5.6.0") and b"X-Mailjet-TrackOpen" in reply
            # SMTP enforces Mailjet's recipient limit: the 51st RCPT gets 452.
            smtp.mail("s@example.com")
            for i in range(50):
                assert smtp.rcpt(f"r{i}@example.org")[0] == 250
            assert smtp.rcpt("r50@example.org")[0] == 452
    assert len(esp.requests) == len(cases)
    by_case = {r.json()["Messages"][0]["Headers"]["X-Case"]: r for r in esp.requests}
    for case in cases:
        body = by_case[case.id].json()
        assert "SandboxMode" not in body
        check_payload(body, case)
        assert body["Messages"][0]["CustomID"] == ids[case.id]
    shown = queue(relay, "delivered")
    assert {m["id"] for m in shown} == set(ids.values())
    assert all(m["provider_message_id"].replace(" ", "").isdigit() for m in shown)
    relay.wait_for_log(
        rf"id={ids['utf8-alternative']} provider=mailjet changed the message: .*Message-ID"
    )
    assert KEY not in relay.log and SECRET not in relay.log
    assert "providers=mailjet(mailjet)" in relay.log


def test_sandbox_end_to_end(relay_factory: type[RelayProcess]) -> None:
    with FakeESP(MailjetAPI(KEY, SECRET)) as esp:
        relay = relay_factory(relay_env(esp, ESPRELAY_MAILJET_SANDBOX="true")).start()
        assert "providers=mailjet(mailjet:sandbox)" in relay.log
        send_case(relay, _case("sandboxed"))
        (request,) = esp.wait_for(1)
        relay.wait_for_log(r"delivered id=\S+ provider=mailjet")
    assert request.json()["SandboxMode"] is True


def test_partial_failure_is_not_resent_to_those_who_got_it(
    relay_factory: type[RelayProcess],
) -> None:
    """Blind recipients only: one Mailjet message each. Mailjet refuses two of five (one
    for good, one for now); the three it sent never get the message again."""
    blind = tuple(f"blind{i}@example.org" for i in range(5))
    refused = {
        "blind1@example.org": (400, "mj-0013", "invalid email"),
        "blind3@example.org": (500, "mj-0000", "Internal error"),
    }
    api = MailjetAPI(KEY, SECRET, refuse=refused.get)
    with FakeESP(api) as esp:
        relay = relay_factory(relay_env(esp)).start()
        raw = crlf("From: s@example.com\nTo: undisclosed-recipients:;\nSubject: p\n\nhi\n")
        spool_id = send_case(
            relay, Case("p", raw, "s@example.com", blind, "", (), (), (), None, None, None)
        )
        # Whatever the queue makes of the refused two, the attempt is logged first.
        relay.wait_for_log(rf" id={spool_id} provider=mailjet")
        time.sleep(1.5)  # room for any retry (RETRY_INITIAL is 0.2 s) to show up
        requests = list(esp.requests)
    first = requests[0].json()
    assert [m["To"][0]["Email"] for m in first["Messages"]] == list(blind)
    assert "To" not in first["Globals"] and "Bcc" not in first["Globals"]
    sent_to = [m["To"][0]["Email"] for r in requests[1:] for m in r.json()["Messages"]]
    # Whatever is retried later is for the refused recipients only (the bounce of the
    # one refused for good goes to the sender, through Mailjet too).
    assert set(sent_to) - {"s@example.com"} <= set(refused), sent_to


def test_error_mapping_end_to_end(relay_factory: type[RelayProcess]) -> None:
    attempts: dict[str, list[float]] = {}
    lock = threading.Lock()
    api = MailjetAPI(KEY, SECRET)

    def respond(request: Recorded) -> Reply:
        subject = request.json()["Messages"][0].get("Subject", "")
        with lock:
            seen = attempts.setdefault(subject, [])
            seen.append(time.monotonic())
            n = len(seen)
        if subject == "rate-limited" and n == 1:
            return Reply(429, "", {"Retry-After": "2"})
        if subject == "server-error" and n == 1:
            return Reply(500, {"ErrorIdentifier": "D4DF574C", "StatusCode": 500})
        if subject == "invalid":
            error = {"ErrorCode": "mj-0013", "StatusCode": 400, "ErrorMessage": "bad To"}
            return Reply(400, {"Messages": [{"Status": "error", "Errors": [error]}]})
        if subject == "unauthorized" and n == 1:
            return Reply(401, "")
        return api(request)

    subjects = ("rate-limited", "server-error", "invalid", "unauthorized")
    with FakeESP(respond) as esp:
        relay = relay_factory(relay_env(esp)).start()
        ids = {subject: send_case(relay, _case(subject)) for subject in subjects}
        relay.wait_for_log(r"delivered id=", count=3, timeout=30)
        failed = queue(relay, "failed")
        time.sleep(1.0)  # room for a wrongly scheduled retry to show up
    assert [m["id"] for m in failed] == [ids["invalid"]], failed
    assert "mj-0013" in failed[0]["last_error"]
    assert len(attempts["invalid"]) == 1
    for subject in ("rate-limited", "server-error", "unauthorized"):
        assert len(attempts[subject]) == 2, subject
        relay.wait_for_log(rf"delivered id={ids[subject]} provider=mailjet attempt=2")
    first, second = attempts["rate-limited"]
    assert second - first >= 1.9  # Retry-After (2 s), not RETRY_INITIAL (0.2 s)
    relay.wait_for_log(rf"deferred id={ids['unauthorized']} .*configuration problem")


def test_failover_between_mailjet_and_mailgun_end_to_end(
    relay_factory: type[RelayProcess], tmp_path: Path
) -> None:
    """A route mixing Mailjet and an older provider fails over both ways."""
    api = MailjetAPI(KEY, SECRET)

    def mailjet_down_for_some(request: Recorded) -> Reply:
        if request.json()["Messages"][0]["To"][0]["Email"].startswith("via-mailgun"):
            return Reply(503, "Service Unavailable")
        return api(request)

    def mailgun_down_for_some(request: Recorded) -> Reply:
        rcpts = [v.decode() for n, _, v in form_fields(request) if n == "to"]
        if rcpts[0].startswith("via-mailjet"):
            return Reply(503, "Service Unavailable")
        return mailgun(request)

    with FakeESP(mailjet_down_for_some) as mj, FakeESP(mailgun_down_for_some) as mg:
        routes = tmp_path / "routes.toml"
        routes.write_text(
            f'[providers.mj]\nkind = "mailjet"\napi_key_env = "TEST_MJ_KEY"\n'
            f'secret_key_env = "TEST_MJ_SECRET"\napi_url = "{mj.url}"\n'
            f'[providers.mg]\nkind = "mailgun"\napi_key_env = "TEST_MAILGUN_KEY"\n'
            f'domain = "{DOMAIN}"\napi_url = "{mg.url}"\n'
            '[[routes]]\nsender_domains = ["old.example"]\nproviders = ["mg", "mj"]\n'
            '[default]\nproviders = ["mj", "mg"]\n'
        )
        relay = relay_factory(
            {
                "TEST_MJ_KEY": KEY,
                "TEST_MJ_SECRET": SECRET,
                "TEST_MAILGUN_KEY": MAILGUN_KEY,
                "ESPRELAY_ROUTES_FILE": str(routes),
                "ESPRELAY_RETRY_INITIAL": "0.2s",
            }
        ).start()
        for sender, rcpt in (
            ("app@example.com", "via-mailgun@example.org"),
            ("app@old.example", "via-mailjet@example.org"),
        ):
            raw = crlf(f"From: {sender}\nTo: {rcpt}\nSubject: failover\n\nhi\n")
            send_case(relay, Case(rcpt, raw, sender, (rcpt,), "", (), (), (), None, None, None))
        relay.wait_for_log(r"delivered id=\S+ provider=mg", timeout=30)
        relay.wait_for_log(r"delivered id=\S+ provider=mj", timeout=30)
    # Each was tried first on its route's first provider, then delivered by the other.
    assert [r.json()["Messages"][0]["To"][0]["Email"] for r in mj.requests] == [
        "via-mailgun@example.org",
        "via-mailjet@example.org",
    ]
    assert all(mailjet_errors(m) == [] for m in _messages(mj.requests[1].json()))
    assert sorted(v.decode() for r in mg.requests for n, _, v in form_fields(r) if n == "to") == [
        "via-mailgun@example.org",
        "via-mailjet@example.org",
    ]


def test_transient_rejected_is_a_transient_error() -> None:
    # The half of the error tree each per-message StatusCode lands in.
    response = httpx.Response(400, request=_REQUEST)
    for code, half in ((400, PermanentDeliveryError), (429, TransientDeliveryError),
                       (503, TransientDeliveryError), (401, TransientDeliveryError)):  # fmt: skip
        result = {"Status": "error", "Errors": [{"StatusCode": code, "ErrorCode": "x"}]}
        assert isinstance(mailjet_module.message_error(result, response, "mj"), half), code
