"""The shared HTTP flow of providers, against a real loopback server."""

from __future__ import annotations

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
from esprelay.providers.base import HttpProvider, parse_retry_after
from tests.fakeesp import FakeESP, Reply


class EchoProvider(HttpProvider):
    kind = "echo"

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        super().__init__(client)
        self.url = url

    def build_request(self, message: OutboundMessage) -> httpx.Request:
        return httpx.Request("POST", f"{self.url}/send", content=message.raw)

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
