"""The exact bytes each JSON provider puts on the wire, through both transports.

A raw loopback server records every request byte for byte.  The expected requests
are what esprelay sent before its request building and HTTP client were tuned for
CPU (``git log`` of this file), with one intended change since: the JSON bodies are
compact (no space after ``,`` and ``:``) since ``orjson`` encodes them.  A change that
alters a request line, a header, its order or case, or one byte of a body fails here.
When the server sets a cookie, no request sends it back and the client keeps none (an
ESP API client has no session; before, the aiohttp transport sent cookies back to a
named host).
"""

from __future__ import annotations

import asyncio

import pytest
from pydantic import SecretStr

from esprelay.httpclient import make_client
from esprelay.models import Envelope, OutboundMessage
from esprelay.providers.base import HttpProvider
from esprelay.providers.postmark import PostmarkProvider
from esprelay.providers.sendgrid import SendGridProvider
from tests.messages import crlf

RAW = crlf(
    'From: "Billing, Inc." <a@example.com>\nTo: B <b@example.org>\nCc: c@example.org\n'
    "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\nMessage-ID: <m1@example.com>\n"
    "X-App: 42\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
    'Content-Transfer-Encoding: quoted-printable\n\nGr=C3=BC=C3=9Fe \\ "x"\n'
)
ENVELOPE = Envelope("a@example.com", ("b@example.org", "c@example.org", "hidden@example.net"))

SENDGRID_BODY = (
    '{"personalizations":[{"to":[{"email":"b@example.org","name":"B"}],"cc":[{"email":'
    '"c@example.org"}],"bcc":[{"email":"hidden@example.net"}],"custom_args":{"esprelay_id":'
    '"m0"}}],"from":{"email":'
    '"a@example.com","name":"Billing, Inc."},"subject":"Grüße","content":[{"type":'
    '"text/plain","value":"Grüße \\\\ \\"x\\"\\r\\n"}],"headers":{"Message-ID":'
    '"<m1@example.com>","X-App":"42"}}'
).encode()
POSTMARK_BODY = (
    '{"From":"\\"Billing, Inc.\\" <a@example.com>","To":"B <b@example.org>","Cc":'
    '"c@example.org","Bcc":"hidden@example.net","Subject":"Grüße","TextBody":'
    '"Grüße \\\\ \\"x\\"\\r\\n","Headers":[{"Name":"Message-ID","Value":'
    '"<m1@example.com>"},{"Name":"X-App","Value":"42"}],"MessageStream":"outbound",'
    '"Metadata":{"esprelay_id":"m0"}}'
).encode()

#: Header lines as each transport writes them (httpx-aiohttp hands aiohttp the
#: lower-cased names; aiohttp adds its defaults after them).
EXPECTED = {
    ("aiohttp", "sendgrid"): [
        "POST /v3/mail/send HTTP/1.1",
        "host: HOST",
        "authorization: Bearer SG.key",
        "content-type: application/json",
        "accept: application/json",
        f"content-length: {len(SENDGRID_BODY)}",
        "Accept-Encoding: gzip, deflate",
        "User-Agent: AIOHTTP_UA",
    ],
    ("aiohttp", "postmark"): [
        "POST /email HTTP/1.1",
        "host: HOST",
        "x-postmark-server-token: pm-token",
        "accept: application/json",
        "content-type: application/json",
        f"content-length: {len(POSTMARK_BODY)}",
        "Accept-Encoding: gzip, deflate",
        "User-Agent: AIOHTTP_UA",
    ],
    ("httpx", "sendgrid"): [
        "POST /v3/mail/send HTTP/1.1",
        "Host: HOST",
        "Authorization: Bearer SG.key",
        "Content-Type: application/json",
        "Accept: application/json",
        f"Content-Length: {len(SENDGRID_BODY)}",
    ],
    ("httpx", "postmark"): [
        "POST /email HTTP/1.1",
        "Host: HOST",
        "X-Postmark-Server-Token: pm-token",
        "Accept: application/json",
        "Content-Type: application/json",
        f"Content-Length: {len(POSTMARK_BODY)}",
    ],
}
REPLIES = {
    "/v3/mail/send": b"HTTP/1.1 202 Accepted\r\nX-Message-Id: sg-1\r\n",
    "/email": (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n",
        b'{"ErrorCode": 0, "Message": "OK", "MessageID": "pm-1"}',
    ),
}


class RawServer:
    """HTTP/1.1 on loopback that keeps each request's bytes (and sets a cookie)."""

    def __init__(self, cookie: bool) -> None:
        self.cookie = b"Set-Cookie: lb=sticky; Path=/\r\n" if cookie else b""
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                path = head.split(b" ", 2)[1].decode()
                reply = REPLIES[path]
                status, content = reply if isinstance(reply, tuple) else (reply, b"")
                writer.write(
                    status + self.cookie + b"Content-Length: %d\r\n\r\n" % len(content) + content
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.writers.discard(writer)

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.close()
            await writer.wait_closed()
        await self.server.wait_closed()


@pytest.mark.parametrize("cookie", [False, True], ids=["", "cookie"])
@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
@pytest.mark.parametrize("kind", ["sendgrid", "postmark"])
async def test_requests_are_byte_for_byte_as_before(
    transport: str, kind: str, cookie: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.delenv(variable, raising=False)
    import aiohttp

    server = RawServer(cookie)
    async with server as port:
        # "localhost", not an IP address: aiohttp's default cookie jar ignores cookies
        # from IP addresses, and this must show that none is sent back at all.
        base = f"http://localhost:{port}"
        client, name = make_client(timeout=5, max_connections=2, transport=transport)  # type: ignore[arg-type]
        assert name == transport
        provider: HttpProvider
        if kind == "sendgrid":
            provider = SendGridProvider(client, SecretStr("SG.key"), base + "/")
            body, provider_id = SENDGRID_BODY, "sg-1"
        else:
            provider = PostmarkProvider(client, SecretStr("pm-token"), base, "outbound")
            body, provider_id = POSTMARK_BODY, "pm-1"
        async with client:
            for i in range(3):
                result = await provider.send(OutboundMessage(f"m{i}", ENVELOPE, RAW))
                assert result.provider_message_id == provider_id
                assert result.warnings == ()
            assert not list(client.cookies.jar)
    user_agent = f"Python/3.{__import__('sys').version_info[1]} aiohttp/{aiohttp.__version__}"
    lines = [
        line.replace("HOST", f"localhost:{port}").replace("AIOHTTP_UA", user_agent)
        for line in EXPECTED[transport, kind]
    ]
    expected = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    # The same bytes for each message but its spool id, "m0", "m1", "m2" (esprelay_id).
    assert server.requests == [
        expected.replace(b'"esprelay_id":"m0"', b'"esprelay_id":"m%d"' % i) for i in range(3)
    ]
