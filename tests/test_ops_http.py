"""The ops HTTP server in this process: the limits on requests."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from esprelay.httpapi import OpsServer
from esprelay.metrics import RelayMetrics
from esprelay.spool import Spool, open_spool
from tests.opshttp import TOKEN

Serve = Callable[..., Awaitable[OpsServer]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    """Start OpsServers on an empty SQLite spool; all closed at the end."""
    spool: Spool = open_spool(f"sqlite:///{tmp_path / 'spool.db'}")
    await spool.open()
    servers: list[OpsServer] = []

    async def start(host: str = "127.0.0.1", admin_token: str | None = TOKEN) -> OpsServer:
        server = OpsServer(
            spool=spool, metrics=RelayMetrics(), admin_token=admin_token, readiness=[]
        )
        servers.append(server)
        await server.start(host, 0)
        return server

    yield start
    for server in servers:
        await server.close()
    await spool.close()


def client(server: OpsServer) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10)


async def raw_request(server: OpsServer, request: bytes) -> bytes:
    """Send ``request`` as it is; return the status line of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(request)
        await writer.drain()
        return (await reader.readline()).rstrip()
    finally:
        writer.close()
        await writer.wait_closed()


# region requests


async def test_request_bodies_are_refused(serve: Serve) -> None:
    server = await serve()
    async with client(server) as c:
        response = await c.post(
            "/api/messages/x/retry",
            content=b"x" * 100,
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
    assert response.status_code == 413
    assert response.json() == {"error": "request bodies are not accepted"}
    assert response.headers["connection"] == "close"


async def test_oversized_request_heads_are_refused_unlogged(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = await serve()
    long_line = b"GET /queue?token=" + TOKEN.encode() + b"&x=" + b"a" * 9000 + b" HTTP/1.1\r\n"
    long_field = b"GET /healthz HTTP/1.1\r\nAuthorization: Bearer " + TOKEN.encode() + b"a" * 9000
    many_fields = b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(100))
    for head in (long_line, long_field, many_fields):
        status = await raw_request(server, head + b"Host: localhost\r\n\r\n")
        assert status.split()[1] == b"400", status
    # aiohttp would log each at ERROR, quoting the request: token and all.
    assert TOKEN not in caplog.text
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert "http bad request: 400 LineTooLong" in caplog.text


async def test_errors_are_json_and_head_has_no_body(serve: Serve) -> None:
    server = await serve()
    async with client(server) as c:
        missing = await c.get("/nope")
        assert (missing.status_code, missing.json()) == (404, {"error": "not found"})
        assert missing.headers["x-content-type-options"] == "nosniff"
        wrong = await c.put("/api/messages/x", headers={"Authorization": f"Bearer {TOKEN}"})
        assert (wrong.status_code, wrong.json()) == (405, {"error": "method not allowed"})
        assert "DELETE" in wrong.headers["allow"]
        # Authentication comes before the method: no route is revealed to a stranger.
        assert (await c.put("/api/messages/x")).status_code == 401
        head = await c.head("/healthz")
        assert (head.status_code, head.content) == (200, b"")
        assert (
            await c.get(
                "/api/messages",
                params={"limit": "\u00b9"},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
        ).status_code == 400


# endregion
