"""Postmark's SMTP control headers (X-PM-Tag, X-PM-Metadata-*, X-PM-Message-Stream,
X-PM-TrackOpens, X-PM-TrackLinks): each one becomes its /email field and leaves Headers,
against the fake Postmark that checks those fields as Postmark documents them; a
malformed one is refused at the end of DATA, end to end through a real relay."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from esprelay.errors import MessageRejected, ProviderConfigError
from esprelay.message import header as header_module
from esprelay.message.mime import parse
from esprelay.models import Envelope, OutboundMessage
from esprelay.providers import postmark as postmark_module
from esprelay.providers.postmark import PostmarkProvider, build_payload
from esprelay.testing.fakeesp import FakeESP, Recorded
from tests.providers.test_postmark import STREAM, TOKEN, PostmarkAPI, relay_env, validate
from tests.relayproc import RelayProcess
from tests.test_e2e_smtp import queued_id, send_raw

TOP = b"From: App <app@example.com>\r\nTo: ops@example.org\r\nSubject: hello\r\n"
BOTTOM = b"X-Custom: kept\r\nContent-Type: text/plain\r\n\r\nHello, X-PM-Tag: body\r\n"
RCPTS = ("ops@example.org",)
ENVELOPE = Envelope("app@example.com", RCPTS)


def message_with(controls: bytes) -> bytes:
    return TOP + controls + BOTTOM


def provider(client: httpx.AsyncClient, url: str, stream: str = STREAM) -> PostmarkProvider:
    return PostmarkProvider(client, SecretStr(TOKEN), url, stream)


def header_pairs(payload: dict[str, Any]) -> list[tuple[str, str]]:
    return [(h["Name"], h["Value"]) for h in payload.get("Headers", [])]


async def send(esp: FakeESP, raw: bytes) -> dict[str, Any]:
    message = OutboundMessage("m1", ENVELOPE, raw)
    async with httpx.AsyncClient() as client:
        pm = provider(client, esp.url)
        assert pm.refusal(message) is None
        result = await pm.send(message)
    assert result.provider_message_id
    payload: dict[str, Any] = esp.requests[-1].json()
    return payload


@pytest.fixture(scope="module")
def esp() -> Iterator[FakeESP]:
    with FakeESP(PostmarkAPI()) as fake:
        yield fake


# -- each header, against the fake -------------------------------------------------

CASES = [
    pytest.param(b"X-PM-Tag: welcome\r\n", {"Tag": "welcome"}, id="tag"),
    pytest.param(
        b"X-PM-Tag: =?utf-8?q?bienvenue_=C3=A0_bord?=\r\n",
        {"Tag": "bienvenue à bord"},
        id="tag-encoded-word",
    ),
    pytest.param(
        b"X-PM-Metadata-color: blue\r\nX-PM-Metadata-Client-Id: 12345\r\n",
        # esprelay's id after the message's own fields (tests/providers/test_stamp.py)
        {"Metadata": {"color": "blue", "Client-Id": "12345", "esprelay_id": "m1"}},
        id="metadata",
    ),
    pytest.param(
        "X-PM-Metadata-city: Zürich\r\n".encode(),
        {"Metadata": {"city": "Zürich", "esprelay_id": "m1"}},
        id="metadata-utf8",
    ),
    pytest.param(
        b"X-PM-Message-Stream: broadcast-test\r\n",
        {"MessageStream": "broadcast-test"},
        id="stream-overrides-the-configured-one",
    ),
    pytest.param(
        b"x-pm-message-stream: broadcast-test\r\n",
        {"MessageStream": "broadcast-test"},
        id="stream-lower-case-name",
    ),
    pytest.param(b"X-PM-TrackOpens: true\r\n", {"TrackOpens": True}, id="track-opens"),
    pytest.param(b"X-PM-TrackOpens: False\r\n", {"TrackOpens": False}, id="track-opens-false"),
    pytest.param(
        b"X-PM-TrackLinks: HtmlAndText\r\n", {"TrackLinks": "HtmlAndText"}, id="track-links"
    ),
    pytest.param(
        b"X-PM-TrackLinks: htmlonly\r\n", {"TrackLinks": "HtmlOnly"}, id="track-links-any-case"
    ),
    pytest.param(b"X-PM-TrackLinks: None\r\n", {"TrackLinks": "None"}, id="track-links-none"),
]


@pytest.mark.parametrize(("controls", "fields"), CASES)
async def test_control_header_becomes_its_field(
    esp: FakeESP, controls: bytes, fields: dict[str, Any]
) -> None:
    payload = await send(esp, message_with(controls))
    assert {k: payload[k] for k in fields} == fields
    assert payload.get("MessageStream") == fields.get("MessageStream", STREAM)
    # Removed from Headers, as Postmark's SMTP service removes them; the rest stays.
    assert header_pairs(payload) == [("X-Custom", "kept")]


async def test_other_x_pm_headers_stay_in_headers(esp: FakeESP) -> None:
    """X-PM-KeepID and X-PM-Bounce-Type are read by Postmark's API from Headers, as its
    SMTP service reads them from the message."""
    payload = await send(
        esp,
        message_with(
            b"X-PM-KeepID: true\r\nX-PM-Bounce-Type: HardBounce\r\nX-PM-Tag: t1\r\n"
            b"X-PM-Metadata-a: 1\r\n"
        ),
    )
    assert payload["Tag"] == "t1" and payload["Metadata"] == {"a": "1", "esprelay_id": "m1"}
    assert header_pairs(payload) == [
        ("X-PM-KeepID", "true"),
        ("X-PM-Bounce-Type", "HardBounce"),
        ("X-Custom", "kept"),
    ]


async def test_all_together_and_folded(esp: FakeESP) -> None:
    metadata = b"".join(b"X-PM-Metadata-k%d: v%d\r\n" % (i, i) for i in range(10))
    payload = await send(
        esp,
        message_with(
            b"X-PM-Tag: a long\r\n tag\r\n" + metadata + b"X-PM-TrackOpens: true\r\n"
            b"X-PM-TrackLinks: TextOnly\r\nX-PM-Message-Stream: broadcast-test\r\n"
        ),
    )
    assert payload["Tag"] == "a long tag"
    assert payload["Metadata"] == {f"k{i}": f"v{i}" for i in range(10)}
    assert (payload["TrackOpens"], payload["TrackLinks"]) == (True, "TextOnly")
    assert payload["MessageStream"] == "broadcast-test"


# -- malformed: refused at the end of DATA -----------------------------------------

MALFORMED = [
    pytest.param(b"X-PM-Tag:\r\n", "X-PM-Tag is empty", id="empty-tag"),
    pytest.param(b"X-PM-Tag: a\r\nX-PM-Tag: b\r\n", "2 X-PM-Tag headers", id="two-tags"),
    pytest.param(
        b"X-PM-Tag: " + b"t" * 1001 + b"\r\n", "longer than 1000 characters", id="long-tag"
    ),
    pytest.param(b"X-PM-Tag: \xff\xfe\r\n", "X-PM-Tag: not UTF-8", id="tag-not-utf8"),
    pytest.param(b"X-PM-Metadata-" + b"k" * 21 + b": v\r\n", "key longer than 20", id="long-key"),
    pytest.param(
        b"X-PM-Metadata-k: " + b"v" * 81 + b"\r\n", "value longer than 80", id="long-value"
    ),
    pytest.param(b"X-PM-Metadata-k:\r\n", "'X-PM-Metadata-k' is empty", id="empty-value"),
    pytest.param(b"X-PM-Metadata-: v\r\n", "without a key", id="no-key"),
    pytest.param(
        b"X-PM-Metadata-id: 1\r\nX-PM-Metadata-ID: 2\r\n", "given twice", id="same-key-twice"
    ),
    pytest.param(
        b"".join(b"X-PM-Metadata-k%d: v\r\n" % i for i in range(11)),
        "11 X-PM-Metadata-* headers",
        id="eleven-fields",
    ),
    pytest.param(b"X-PM-Message-Stream:  \r\n", "X-PM-Message-Stream is empty", id="empty-stream"),
    pytest.param(
        b"X-PM-Message-Stream: a\r\nX-PM-Message-Stream: b\r\n",
        "2 X-PM-Message-Stream headers",
        id="two-streams",
    ),
    pytest.param(b"X-PM-TrackOpens: yes\r\n", "'yes' is not true or false", id="opens-yes"),
    pytest.param(
        b"X-PM-TrackOpens: true\r\nX-PM-TrackOpens: true\r\n",
        "2 X-PM-TrackOpens headers",
        id="opens-twice",
    ),
    pytest.param(
        b"X-PM-TrackLinks: All\r\n",
        "'All' is not one of None, HtmlAndText, HtmlOnly, TextOnly",
        id="links-unknown",
    ),
]


@pytest.mark.parametrize(("controls", "reason"), MALFORMED)
def test_malformed_control_header_is_refused(controls: bytes, reason: str) -> None:
    message = OutboundMessage("m1", ENVELOPE, message_with(controls))
    pm = provider(httpx.AsyncClient(), "https://api.postmarkapp.com")
    why = pm.refusal(message)
    assert why is not None and reason in why, why
    # A message spooled before the check existed is rejected, never sent without it.
    with pytest.raises(MessageRejected) as info:
        pm.build_request(message)
    assert info.value.provider == "postmark" and why in str(info.value)


def test_common_message_pays_no_header_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """No X-PM-* header in the header section ("X-PM-" in the body does not count): the
    check at DATA does not read the header, and the request is what it was without it."""
    calls: list[int] = []
    real = header_module.read_header

    def counting(raw: bytes, *, obsolete: bool = False) -> header_module.Header:
        calls.append(len(raw))
        return real(raw, obsolete=obsolete)

    monkeypatch.setattr(postmark_module, "read_header", counting)
    raw = message_with(b"X-Mailer: app 1.0\r\n")
    message = OutboundMessage("m1", ENVELOPE, raw)
    pm = provider(httpx.AsyncClient(), "https://api.postmarkapp.com")
    assert pm.refusal(message) is None
    built = pm.build_request(message)
    assert calls == []
    expected, _ = build_payload(parse(raw, ENVELOPE), STREAM, None, "m1")
    assert built.request.read() == postmark_module.json_body(expected)
    assert built.request.extensions == {}


def test_fake_postmark_checks_the_fields() -> None:
    """The fake answers 422 ErrorCode 300 where Postmark documents a field's values or
    limits, and ErrorCode 1235 for a stream its server does not have."""
    base = {"From": "app@example.com", "To": "ops@example.org", "TextBody": "hi"}
    bad: list[dict[str, Any]] = [
        {"Tag": ""},
        {"Tag": "t" * 1001},
        {"Tag": ["a", "b"]},
        {"Metadata": {f"k{i}": "v" for i in range(11)}},
        {"Metadata": {"k" * 21: "v"}},
        {"Metadata": {"k": "v" * 81}},
        {"Metadata": {"k": 1}},
        {"Metadata": {"a": "1", "A": "2"}},
        {"TrackOpens": "true"},
        {"TrackLinks": "Always"},
    ]
    headers = {"X-Postmark-Server-Token": TOKEN, "Accept": "application/json"}
    with FakeESP(PostmarkAPI()) as fake, httpx.Client(headers=headers) as client:
        for fields in bad:
            payload = {**base, "MessageStream": STREAM, **fields}
            response = client.post(f"{fake.url}/email", json=payload)
            assert (response.status_code, response.json()["ErrorCode"]) == (422, 300), fields
        unknown = client.post(f"{fake.url}/email", json={**base, "MessageStream": "nope"})
        assert (unknown.status_code, unknown.json()["ErrorCode"]) == (422, 1235)
        good = {
            **base,
            "MessageStream": "broadcast-test",
            "Tag": "t" * 1000,
            "Metadata": {f"k{i}": "v" * 80 for i in range(10)},
            "TrackOpens": False,
            "TrackLinks": "HtmlOnly",
        }
        assert validate(good) == []
        response = client.post(f"{fake.url}/email", json=good)
        assert response.status_code == 200, response.text


async def test_unknown_stream_named_by_the_message_is_rejected(esp: FakeESP) -> None:
    """Only Postmark knows its streams: its ErrorCode 1235 rejects a message that named
    one it does not have, while an unknown configured stream stays an operator problem."""
    async with httpx.AsyncClient() as client:
        chosen = OutboundMessage(
            "m1", ENVELOPE, message_with(b"X-PM-Message-Stream: no-such-stream\r\n")
        )
        pm = provider(client, esp.url)
        assert pm.refusal(chosen) is None  # cannot be told at DATA
        with pytest.raises(MessageRejected) as info:
            await pm.send(chosen)
        assert "ErrorCode 1235" in str(info.value)
        assert "X-PM-Message-Stream: 'no-such-stream'" in str(info.value)
        configured = provider(client, esp.url, stream="no-such-stream")
        with pytest.raises(ProviderConfigError):
            await configured.send(OutboundMessage("m2", ENVELOPE, message_with(b"")))
        with pytest.raises(ProviderConfigError):  # the message only named that one too
            await configured.send(chosen)


# -- end to end: refused at DATA, translated on the way out -------------------------

GOOD = (
    b"X-PM-Tag: welcome\r\n"
    b"X-PM-Metadata-user-id: 42\r\n"
    b"X-PM-Metadata-plan: pro\r\n"
    b"X-PM-Message-Stream: broadcast-test\r\n"
    b"X-PM-TrackOpens: true\r\n"
    b"X-PM-TrackLinks: HtmlOnly\r\n"
    b"X-PM-KeepID: true\r\n"
)


def test_end_to_end_refused_at_data_and_translated(relay_factory: type[RelayProcess]) -> None:
    with FakeESP(PostmarkAPI()) as fake:
        relay = relay_factory(relay_env(fake)).start()
        bad = message_with(b"X-PM-Tag: ok\r\nX-PM-TrackLinks: Sometimes\r\n")
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("app@example.com")
            smtp.rcpt("ops@example.org")
            code, reply = smtp.data(bad)
        assert (code, reply.decode()) == (
            550,
            "5.6.0 postmark: X-PM-TrackLinks 'Sometimes' is not one of None, HtmlAndText,"
            " HtmlOnly, TextOnly",
        )
        good = message_with(GOOD)
        message_id = queued_id(send_raw(relay, "app@example.com", ["ops@example.org"], good))
        relay.wait_for_log(rf"delivered id={message_id} provider=postmark attempt=1")
        (request,) = fake.requests  # the refused message never reached Postmark
    payload = request.json()
    assert isinstance(request, Recorded) and validate(payload, stream=None) == []
    assert payload["Tag"] == "welcome"
    assert payload["Metadata"] == {"user-id": "42", "plan": "pro", "esprelay_id": message_id}
    assert payload["MessageStream"] == "broadcast-test"
    assert (payload["TrackOpens"], payload["TrackLinks"]) == (True, "HtmlOnly")
    assert header_pairs(payload) == [("X-PM-KeepID", "true"), ("X-Custom", "kept")]
    assert payload["TextBody"].startswith("Hello, X-PM-Tag: body")
    assert "not accepted" in relay.log and "X-PM-TrackLinks 'Sometimes'" in relay.log
