"""The shared HTTP flow of providers, against a real loopback server."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from esprelay.errors import (
    MessageRejected,
    ProviderConfigError,
    ProviderConnectionError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from esprelay.models import Envelope, OutboundMessage, SendResult
from esprelay.providers.base import Built, HttpProvider, PostTarget, json_body, parse_retry_after
from esprelay.testing.fakeesp import FakeESP, Reply


class EchoProvider(HttpProvider):
    kind = "echo"

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        super().__init__(client)
        self.url = url

    def build_request(self, message: OutboundMessage) -> Built:
        return Built(httpx.Request("POST", f"{self.url}/send", content=message.raw))

    def parse_response(self, response: httpx.Response, message: OutboundMessage) -> SendResult:
        return SendResult(provider_message_id=response.json()["id"])


def outbound() -> OutboundMessage:
    return OutboundMessage(
        "m1", Envelope("a@example.com", ("b@example.org",)), b"Subject: x\r\n\r\nhi\r\n"
    )


async def test_success_returns_provider_id() -> None:
    with FakeESP(lambda r: Reply(200, {"id": "esp-1"})) as esp:
        async with httpx.AsyncClient() as client:
            result = await EchoProvider(client, esp.url).send(outbound())
    assert result.provider_message_id == "esp-1"
    assert esp.requests[0].body == b"Subject: x\r\n\r\nhi\r\n"


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (Reply(429, "slow down", {"Retry-After": "7"}), RateLimited),
        (Reply(500, "boom"), ProviderUnavailable),
        (Reply(503, "down"), ProviderUnavailable),
        (Reply(400, "bad"), MessageRejected),
        (Reply(422, "bad"), MessageRejected),
        (Reply(401, "who"), ProviderConfigError),
        (Reply(403, "no"), ProviderConfigError),
    ],
)
async def test_status_classification(reply: Reply, error: type[Exception]) -> None:
    with FakeESP() as esp:
        esp.then(reply)
        async with httpx.AsyncClient() as client:
            with pytest.raises(error) as info:
                await EchoProvider(client, esp.url).send(outbound())
    assert info.value.status_code == reply.status  # type: ignore[attr-defined]
    if reply.status == 429:
        assert info.value.retry_after == 7  # type: ignore[attr-defined]


async def test_timeout_and_connection_errors() -> None:
    with FakeESP(lambda r: Reply(200, {"id": "late"}, delay=1.0)) as esp:
        async with httpx.AsyncClient(timeout=0.2) as client:
            with pytest.raises(ProviderTimeout):
                await EchoProvider(client, esp.url).send(outbound())
    async with httpx.AsyncClient() as client:
        with pytest.raises(ProviderConnectionError):
            await EchoProvider(client, "http://127.0.0.1:9").send(outbound())


def test_parse_retry_after() -> None:
    assert parse_retry_after("12") == 12
    assert parse_retry_after(None) is None
    assert parse_retry_after("garbage") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0


@pytest.mark.parametrize(
    "url",
    [
        "https://api.sendgrid.com/v3/mail/send",
        "https://api.postmarkapp.com:443/email",
        "http://127.0.0.1:8080/prefix/v3/mail/send",
        "http://[::1]:9/email",
        "https://API.Example.COM/x%2Fy/email?q=1",
        "http://user:pw@example.com/email",
    ],
)
@pytest.mark.parametrize("body", [b'{"a": 1}', b"", "é".encode() * 3000])
def test_post_target_builds_what_httpx_request_builds(url: str, body: bytes) -> None:
    headers = {"Authorization": "Bearer SG.k", "Content-Type": "application/json", "Accept": "*"}
    extensions = {"esprelay.warnings": ("w",)}
    reference = httpx.Request("POST", url, content=body, headers=headers, extensions=extensions)
    built = PostTarget(url, headers).request(body, extensions)
    assert built.method == reference.method
    assert built.url == reference.url
    assert str(built.url) == str(reference.url)
    assert built.headers.raw == reference.headers.raw
    assert built.content == reference.content
    assert type(built.stream) is type(reference.stream)
    assert b"".join(built.stream) == b"".join(reference.stream)  # type: ignore[arg-type]
    assert built.extensions == reference.extensions


@pytest.mark.parametrize(
    "payload",
    [
        {"a": [1, 2.5, None, True], "b": {"c": 'é\u2028\x00"\\/'}, "": ""},
        ["\ud83d\ude00", "\udce9", {"k": []}],
        {},
    ],
)
def test_json_body_is_compact_json_dumps(payload: object) -> None:
    def outcome(encode: Callable[[], bytes]) -> bytes | type[Exception]:
        try:
            return encode()
        except Exception as exc:
            return type(exc)

    # The json module's compact form, byte for byte; what it cannot encode (a lone
    # surrogate is not UTF-8) fails here too, with orjson's own error.
    reference = outcome(
        lambda: json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    )
    got = outcome(lambda: json_body(payload))
    if isinstance(reference, bytes):
        assert got == reference
        assert json.loads(got) == payload
    else:
        assert isinstance(got, type) and issubclass(got, Exception)


def test_post_target_sets_content_length_itself() -> None:
    with pytest.raises(ValueError, match="Content-Length"):
        PostTarget("https://api.example.com/send", {"Content-Length": "3"})
