"""The ops HTTP server in this process: Host checks on loopback, the /queue cookie, the
warning for an admin API beyond loopback, and the limits on requests."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from esprelay.httpapi import COOKIE, OpsServer, loopback_host
from esprelay.metrics import RelayMetrics
from esprelay.spool import Spool, open_spool
from tests.opshttp import TOKEN, http
from tests.relayproc import RelayProcess

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


# region Host header (DNS rebinding)


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "localhost:8025",
        "LocalHost.:8025",
        "127.0.0.1",
        "127.0.0.1:8025",
        "127.8.9.10:1",
        "[::1]",
        "[::1]:8025",
        "[0:0:0:0:0:0:0:1]:8025",
    ],
)
def test_loopback_host_names_pass(host: str) -> None:
    assert loopback_host(host)


@pytest.mark.parametrize(
    "host",
    [
        "",
        "rebind.attacker.example",
        "rebind.attacker.example:8025",
        "localhost.attacker.example",
        "127.0.0.1.attacker.example",
        "sub.localhost",
        "0.0.0.0:8025",
        "10.0.0.1:8025",
        "[::2]:8025",
        "[::1",
        "[::1]8025",
        "localhost:",
        "localhost:80x",
        "localhost:\u00b9",
        "localhost:8025:1",
    ],
)
def test_other_host_names_do_not(host: str) -> None:
    assert not loopback_host(host)


async def test_loopback_server_refuses_other_hosts(serve: Serve) -> None:
    server = await serve()
    async with client(server) as c:
        for path in ("/healthz", "/readyz", "/metrics", "/api/messages", "/queue", "/nope"):
            response = await c.get(path, headers={"Host": f"rebind.attacker.example:{server.port}"})
            assert response.status_code == 421, path
            assert response.json() == {"error": "this endpoint answers to loopback host names only"}
            assert "esprelay_" not in response.text
        for host in ("localhost", f"localhost:{server.port}", f"127.0.0.1:{server.port}"):
            assert (await c.get("/metrics", headers={"Host": host})).status_code == 200
        authorized = {"Authorization": f"Bearer {TOKEN}", "Host": f"[::1]:{server.port}"}
        assert (await c.get("/api/messages", headers=authorized)).status_code == 200
    # No browser leaves the Host header out; an HTTP/1.0 probe may.
    assert await raw_request(server, b"GET /healthz HTTP/1.0\r\n\r\n") == b"HTTP/1.0 200 OK"
    assert await raw_request(server, b"GET /healthz HTTP/1.0\r\nHost: evil.example\r\n\r\n") == (
        b"HTTP/1.0 421 Misdirected Request"
    )


async def test_server_beyond_loopback_answers_any_host(serve: Serve) -> None:
    server = await serve("0.0.0.0", admin_token=None)
    async with client(server) as c:
        response = await c.get("/readyz", headers={"Host": "relay.internal.example:8025"})
    assert response.status_code == 200


def test_relay_refuses_a_rebound_host(relay: RelayProcess) -> None:
    with http(relay) as c:
        assert c.get("/metrics", headers={"Host": "rebind.attacker.example"}).status_code == 421
        assert c.get("/metrics").status_code == 200  # httpx sends Host: 127.0.0.1:PORT


# endregion

# region the /queue page's cookie


async def test_page_cookie_is_no_bearer_token(serve: Serve) -> None:
    server = await serve()
    async with client(server) as c:
        redirect = await c.get("/queue", params={"token": TOKEN})
        assert redirect.status_code == 303
        cookie = c.cookies[COOKIE]
        assert (await c.get("/queue")).status_code == 200  # the cookie opens the page

        c.cookies.clear()
        as_bearer = {"Authorization": f"Bearer {cookie}"}
        for path in ("/api/messages", "/queue"):
            assert (await c.get(path, headers=as_bearer)).status_code == 401, path
        assert TOKEN not in redirect.headers["set-cookie"]
        # The token itself, set as the cookie, does not open the page.
        c.cookies.set(COOKIE, TOKEN)
        assert (await c.get("/queue")).status_code == 401

        # A new token voids the cookies made from the old one.
        c.cookies.set(COOKIE, cookie)
        assert (await c.get("/queue")).status_code == 200
        server.admin_token = "another-admin-token-9876543210"
        assert (await c.get("/queue")).status_code == 401


# endregion

# region warning for an admin API beyond loopback


def _tls_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "esprelay.http" and r.levelno == logging.WARNING and "TLS" in r.getMessage()
    ]


async def test_admin_api_beyond_loopback_is_warned_about(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="esprelay.http")
    server = await serve("0.0.0.0")
    [warning] = _tls_warnings(caplog)
    assert f"0.0.0.0:{server.port}" in warning
    assert "reverse proxy" in warning
    assert TOKEN not in caplog.text


async def test_no_warning_on_loopback_or_without_admin_api(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="esprelay.http")
    await serve("127.0.0.1")
    exposed = await serve("0.0.0.0", admin_token=None)
    assert _tls_warnings(caplog) == []
    # Turned on later (SIGHUP), the admin API is warned about then.
    exposed.admin_token = TOKEN
    assert len(_tls_warnings(caplog)) == 1
    exposed.admin_token = "another-admin-token-9876543210"  # a new token, no new warning
    assert len(_tls_warnings(caplog)) == 1


# endregion

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
