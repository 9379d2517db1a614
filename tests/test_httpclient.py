"""The shared HTTP client: which transport it picks, and that both speak real HTTP."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from esprelay.httpclient import make_client
from tests.fakeesp import FakeESP, Reply


@pytest.mark.parametrize("choice", ["auto", "aiohttp", "httpx"])
async def test_posts_exact_body_through_each_transport(
    choice: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.delenv(variable, raising=False)
    client, name = make_client(timeout=5, max_connections=4, transport=choice)  # type: ignore[arg-type]
    assert name == ("httpx" if choice == "httpx" else "aiohttp")
    with FakeESP(lambda r: Reply(202, {"ok": True})) as esp:
        async with client:
            response = await client.post(
                esp.url + "/v3/mail/send", content=b'{"a": 1}', headers={"X-Key": "k"}
            )
            await response.aread()
        (request,) = esp.wait_for(1)
    assert response.status_code == 202
    assert response.json() == {"ok": True}
    assert request.body == b'{"a": 1}'
    assert request.headers["x-key"] == "k"


async def test_auto_keeps_httpx_transport_when_a_proxy_is_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    client, name = make_client(timeout=5, max_connections=4)
    await client.aclose()
    assert name == "httpx"


async def test_connection_refused_is_an_httpx_transport_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client, name = make_client(timeout=5, max_connections=4, transport="aiohttp")
    async with client:
        with pytest.raises(httpx.TransportError):
            await client.post(f"http://127.0.0.1:{port}/", content=b"x")
    assert name == "aiohttp"


@pytest.mark.parametrize("choice", ["aiohttp", "httpx"])
async def test_a_truncated_answer_is_an_httpx_transport_error(choice: str) -> None:
    async def truncated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 100\r\n\r\nonly ten b")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(truncated, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client, name = make_client(timeout=5, max_connections=4, transport=choice)  # type: ignore[arg-type]
    try:
        async with client:
            with pytest.raises(httpx.TransportError):
                await client.post(f"http://127.0.0.1:{port}/", content=b"x")
    finally:
        server.close()
        await server.wait_closed()
    assert name == choice


async def test_the_answer_is_read_whole_and_the_connection_reused() -> None:
    with FakeESP(lambda r: Reply(200, {"n": "x" * 50_000})) as esp:
        client, _name = make_client(timeout=5, max_connections=1, transport="aiohttp")
        async with client:
            for _ in range(3):
                response = await client.post(esp.url + "/email", content=b"{}")
                assert response.json() == {"n": "x" * 50_000}
                assert response.is_closed
        assert len(esp.wait_for(3)) == 3
