"""The shared HTTP client: which transport it picks, and that both speak real HTTP."""

from __future__ import annotations

import asyncio
import gzip
import socket

import httpx
import pytest

from esprelay.httpclient import LARGE_BODY, ApiClient, ReadAnswer, make_client
from esprelay.providers.base import PostTarget
from esprelay.testing.fakeesp import FakeESP, Reply


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


async def _exchange(client: httpx.AsyncClient, url: str, seen: list[str]) -> httpx.Response:
    request = client.build_request("POST", url, content=b'{"a": 1}', headers={"X-Key": "k"})
    del request.extensions["timeout"]  # as the providers build them: the client sets it
    response = await client.send(request)
    assert response.request is request
    seen.append(repr(request.extensions["timeout"]))
    return response


async def test_the_direct_path_answers_as_httpx_does() -> None:
    """The aiohttp client sends plain requests straight to its transport; what a caller
    sees (status, headers, body, request, hooks, timeouts) is what httpx's send gives."""
    calls: list[str] = []

    async def on_request(request: httpx.Request) -> None:
        calls.append(f"request {request.url.path}")

    async def on_response(response: httpx.Response) -> None:
        calls.append(f"response {response.status_code}")

    reply = Reply(202, {"id": "x"}, headers={"X-Message-Id": "m-1"})
    with FakeESP(lambda r: reply) as esp:
        client, name = make_client(
            timeout=7,
            max_connections=2,
            transport="aiohttp",
            event_hooks={"request": [on_request], "response": [on_response]},
        )
        assert name == "aiohttp"
        assert client._direct is not None  # type: ignore[attr-defined]
        async with client:
            timeouts: list[str] = []
            direct = await _exchange(client, esp.url + "/v3/mail/send", timeouts)
            client._direct = None  # type: ignore[attr-defined]
            through_httpx = await _exchange(client, esp.url + "/v3/mail/send", timeouts)
        assert len(esp.wait_for(2)) == 2
    for response in (direct, through_httpx):
        assert response.status_code == 202
        assert response.json() == {"id": "x"}
        assert response.headers["x-message-id"] == "m-1"
        assert response.is_closed
    assert direct.headers.raw == through_httpx.headers.raw
    # The direct path's answer comes read (no decoders); httpx's path reads its own.
    assert type(direct) is ReadAnswer and type(through_httpx) is httpx.Response
    assert direct.content == through_httpx.content == b'{"id": "x"}'
    assert direct.text == through_httpx.text
    assert direct.is_stream_consumed and through_httpx.is_stream_consumed
    assert direct.http_version == through_httpx.http_version == "HTTP/1.1"
    assert direct.reason_phrase == through_httpx.reason_phrase
    assert timeouts[0] == timeouts[1] == repr(httpx.Timeout(7).as_dict())
    assert calls == ["request /v3/mail/send", "response 202"] * 2


async def test_the_direct_path_times_out_as_the_client_says() -> None:
    release = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await release.wait()  # never answers
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client, _name = make_client(timeout=0.3, max_connections=2, transport="aiohttp")
    try:
        async with client:
            request = httpx.Request("POST", f"http://127.0.0.1:{port}/", content=b"x")
            with pytest.raises(httpx.TimeoutException):
                await client.send(request)
    finally:
        release.set()
        await asyncio.sleep(0.05)  # the handler closes its side
        server.close()
        await server.wait_closed()


async def test_a_coded_answer_on_the_direct_path_is_decoded_by_httpx() -> None:
    """An answer with a Content-Encoding is not taken as read: httpx decodes it."""
    body = gzip.compress(b'{"id": "gz"}')
    reply = Reply(202, body, headers={"Content-Encoding": "gzip"})
    with FakeESP(lambda r: reply) as esp:
        client, _name = make_client(timeout=5, max_connections=2, transport="aiohttp")
        async with client:
            response = await client.post(esp.url + "/v3/mail/send", content=b"{}")
    assert type(response) is httpx.Response
    assert response.json() == {"id": "gz"}
    assert response.is_closed


async def test_what_the_direct_path_does_not_do_goes_through_httpx() -> None:
    """A redirect to follow (or auth, or a stream) takes httpx's own path."""

    def respond(request: object) -> Reply:
        if getattr(request, "path", "") == "/old":
            return Reply(302, b"", headers={"Location": "/new"})
        return Reply(200, {"here": True})

    with FakeESP(respond) as esp:
        client, _name = make_client(timeout=5, max_connections=2, transport="aiohttp")
        async with client:
            response = await client.post(esp.url + "/old", content=b"{}", follow_redirects=True)
            assert response.json() == {"here": True}
            assert [r.status_code for r in response.history] == [302]
            streamed = await client.send(client.build_request("GET", esp.url + "/new"), stream=True)
            assert not streamed.is_closed  # httpx's stream, left open for the caller
            await streamed.aread()
            await streamed.aclose()


async def _capture_server(seen: list[bytes]) -> asyncio.Server:
    async def capture(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        seen.append(head + await reader.readexactly(length))
        writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    return await asyncio.start_server(capture, "127.0.0.1", 0)


@pytest.mark.parametrize("size", [10, LARGE_BODY - 1, LARGE_BODY, 5 * 1024 * 1024 + 3])
async def test_a_large_body_goes_out_byte_for_byte(size: int) -> None:
    """From LARGE_BODY on, the aiohttp transport sends the body in pieces: the same
    request line, headers (Content-Length, no chunked encoding) and body on the wire."""
    seen: list[bytes] = []
    server = await _capture_server(seen)
    port = server.sockets[0].getsockname()[1]
    body = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    target = PostTarget(f"http://127.0.0.1:{port}/v3/mail/send", {"X-Key": "k"})
    client, name = make_client(timeout=5, max_connections=4, transport="aiohttp")
    try:
        async with client:
            for send in (client.send, super(ApiClient, client).send):  # direct, via httpx
                request = target.request(body)
                response = await send(request)  # type: ignore[operator]
                assert response.status_code == 202
                assert response.request is request
    finally:
        server.close()
        await server.wait_closed()
    assert name == "aiohttp"
    for wire in seen:
        head, _, sent = wire.partition(b"\r\n\r\n")
        assert sent == body
        lines = head.lower().split(b"\r\n")
        assert lines[0] == b"post /v3/mail/send http/1.1"
        assert b"content-length: %d" % size in lines
        assert b"x-key: k" in lines
        assert not any(line.startswith(b"transfer-encoding") for line in lines)
    assert seen[0] == seen[1]
