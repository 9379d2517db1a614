"""The shared HTTP client: httpx's API over aiohttp's transport when it is available.

Measured with ``python -m bench.transport`` (200 concurrent POSTs, 100 ms API latency):
httpx's default transport (httpcore) checks every pooled connection on every request and
collapses under that concurrency (~9 ms of CPU per request, a few dozen requests/s on a
2-core box), while the ``httpx-aiohttp`` transport stays near 1 ms per request.  The
providers keep programming against ``httpx.AsyncClient``; only the transport changes.

``ESPRELAY_HTTP_TRANSPORT`` picks it: ``auto`` (aiohttp when importable and no proxy
variable is set, else httpx's own), ``aiohttp`` or ``httpx``.  aiohttp ignores the
``*_PROXY`` variables that httpx honours, so ``auto`` keeps httpx's transport when one
is set rather than silently bypassing a proxy.

The client keeps no cookies, on either side: an ESP API authenticates every request
with its key and has no session, while httpx parsed every response into a cookie jar
(most of its own CPU per request after the transport) and aiohttp sent cookies set by a
named API host back to it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, cast

import httpx

if TYPE_CHECKING:
    from httpx._types import CookieTypes

log = logging.getLogger("esprelay")

TransportName = Literal["auto", "aiohttp", "httpx"]
_PROXY_VARIABLES = (
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "ALL_PROXY",
    "https_proxy",
    "http_proxy",
    "all_proxy",
)


#: Request bodies of this size and more are handed to aiohttp in two pieces (below).
LARGE_BODY = 256 * 1024
_FIRST_PIECE = 16 * 1024


class _Pieces(httpx.AsyncByteStream):
    """A body already in memory, as a short first piece and a view of the rest.

    aiohttp sends a request's headers with the first piece of its body in one write
    and, on Python before 3.12.9, joins the two into new bytes to do so: for a 5 MB
    body a copy of 5 MB (and, for a fresh block, a page fault per page) on every
    request.  Given a short first piece, it joins only that, and hands the rest to the
    transport as it is.  The bytes on the wire are the same; ``Content-Length`` is set.
    """

    def __init__(self, body: bytes) -> None:
        self._body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._body[:_FIRST_PIECE]
        # aiohttp writes any buffer; a view is not a copy.
        yield cast(bytes, memoryview(self._body)[_FIRST_PIECE:])


class ReadAnswer(httpx.Response):
    """An answer read whole by aiohttp, with no content coding: already read.

    An ``httpx.Response`` reads its body through its content decoders, chunkers and an
    async generator, ~8 us of CPU per answer on the 2 KB path, to produce the very bytes
    aiohttp handed over when the answer has no ``Content-Encoding``.  This one is made
    as httpx's own ``read()`` leaves a response: the content set, the stream consumed
    and closed.  A coded answer (gzip, ...) stays an ``httpx.Response`` and is decoded
    by httpx as before.
    """

    def __init__(
        self,
        status: int,
        headers: Any,
        content: bytes,
        request: httpx.Request,
        extensions: dict[str, Any],
    ) -> None:
        super().__init__(
            status_code=status,
            headers=headers,
            stream=httpx.ByteStream(content),
            request=request,
            extensions=extensions,
        )
        # What Response.read() sets once the stream is read.
        self._content = content
        self.is_stream_consumed = True
        self.is_closed = True


def _aiohttp_transport(limits: httpx.Limits) -> httpx.AsyncBaseTransport | None:
    try:
        import aiohttp
        from httpx_aiohttp import AiohttpTransport
    except ImportError:
        return None

    from httpx_aiohttp.transport import map_aiohttp_exceptions
    from yarl import URL

    class Transport(AiohttpTransport):
        """httpx-aiohttp, with every aiohttp failure translated into httpx's tree.

        A request whose body is in memory (every API request esprelay makes) takes
        :meth:`_plain`: what ``AiohttpTransport.handle_async_request`` does for it, with
        the parsed URL and the aiohttp timeout kept from one request to the next and
        the answer read with one ``read()`` instead of through an async generator of
        chunks (~0.02 ms of CPU per request, ``python -m bench.transport --exchange``).
        """

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._urls: dict[str, URL] = {}
            self._timeouts: dict[tuple[Any, Any, Any], aiohttp.ClientTimeout] = {}

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            return await self.answer(request, read=False)

        async def answer(self, request: httpx.Request, *, read: bool = True) -> httpx.Response:
            """The answer to ``request``; with ``read``, already read (:class:`ReadAnswer`)
            when it has no content coding.  httpx's own ``send`` gets an answer it reads
            itself (``read=False``): it times it and hands streams to its caller."""
            try:
                body = request.content
            except httpx.RequestNotRead:
                body = None
            try:
                if (
                    body is not None
                    and len(body) < LARGE_BODY
                    and self.proxy is None
                    and "sni_hostname" not in request.extensions
                ):
                    return await self._plain(request, body, read)
                return await self._general(request, b"" if body is None else body)
            except aiohttp.ClientError as exc:
                # httpx-aiohttp maps the common ones; the rest must not escape as
                # foreign exceptions (the provider boundary only knows httpx's).
                raise httpx.TransportError(f"{type(exc).__name__}: {exc}") from exc

        async def _plain(self, request: httpx.Request, body: bytes, read: bool) -> httpx.Response:
            client = self.client
            if not isinstance(client, aiohttp.ClientSession):
                client = self.client = self.get_client()
            text = str(request.url)
            url = self._urls.get(text)
            if url is None:
                if len(self._urls) >= 64:
                    self._urls.clear()
                # What aiohttp makes of the same string (ClientSession._build_url).
                url = self._urls[text] = URL(text)
            given = request.extensions.get("timeout", {})
            key = (given.get("connect"), given.get("read"), given.get("pool"))
            timeout = self._timeouts.get(key)
            if timeout is None:
                if len(self._timeouts) >= 64:
                    self._timeouts.clear()
                timeout = self._timeouts[key] = aiohttp.ClientTimeout(
                    sock_connect=key[0], sock_read=key[1], connect=key[2]
                )
            with map_aiohttp_exceptions():
                answer = await client.request(
                    method=request.method,
                    url=url,
                    headers=request.headers,
                    data=body or None,
                    allow_redirects=False,
                    auto_decompress=False,
                    compress=False,
                    timeout=timeout,
                )
                # An API's answer is small and always read whole: read here, in one
                # go (the connection goes back to the pool at once), and give httpx the
                # bytes, which it decodes as it would have decoded the stream.
                try:
                    content = await answer.read()
                finally:
                    await answer.__aexit__(None, None, None)
            extensions: dict[str, Any] = {"http_version": b"HTTP/1.1"}
            if answer.reason:
                extensions["reason_phrase"] = answer.reason.encode()
            if read and answer.headers.get("Content-Encoding", "identity").lower() == "identity":
                return ReadAnswer(answer.status, answer.raw_headers, content, request, extensions)
            return httpx.Response(
                status_code=answer.status,
                headers=answer.raw_headers,
                stream=httpx.ByteStream(content),
                request=request,
                extensions=extensions,
            )

        async def _general(self, request: httpx.Request, body: bytes) -> httpx.Response:
            outgoing = request
            if len(body) >= LARGE_BODY and "content-length" in request.headers:
                outgoing = httpx.Request(
                    request.method,
                    request.url,
                    headers=request.headers,
                    stream=_Pieces(body),
                    extensions=request.extensions,
                )
            response = await super().handle_async_request(outgoing)
            response.request = request
            # An API's answer is small and always read whole: read it here, in one
            # go, and give httpx the bytes (its own chunked reading through the
            # aiohttp stream cost more than the read itself).  The connection goes
            # back to the pool at once.
            stream = response.stream
            assert isinstance(stream, httpx.AsyncByteStream)
            try:
                content = b"".join([chunk async for chunk in stream])
            finally:
                await stream.aclose()
            response.stream = httpx.ByteStream(content)
            return response

    transport = Transport(limits=limits)

    def session() -> aiohttp.ClientSession:
        # The session httpx-aiohttp would make (made in the event loop, on first use),
        # with a cookie jar that keeps nothing.
        connector = aiohttp.TCPConnector(
            keepalive_timeout=limits.keepalive_expiry,
            ssl=transport.ssl_context,
            # aiohttp's own default where httpx sets no limit, as httpx-aiohttp does
            limit=100 if limits.max_connections is None else limits.max_connections,
        )
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    transport.client = session
    return transport


class NoCookies(httpx.Cookies):
    """A cookie store that ignores Set-Cookie: an ESP API client has no session."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


class ApiClient(httpx.AsyncClient):
    """``httpx.AsyncClient`` whose cookie store keeps nothing (:class:`NoCookies`), and
    which sends a plain request straight to its transport when it has one of its own.

    ``send()`` through httpx walks its auth flow, its redirect loop, a per-request
    transport lookup and a timing wrapper around the answer: ~0.03 ms of CPU per
    request, ~4% of a 2 KB message's (``python -m bench.transport --exchange``).  With
    no auth, no redirects to follow, no streaming and one transport for every URL (given
    explicitly: httpx then mounts no proxies), :meth:`send` does what that path does for
    such a request: the client's timeouts, the request and response event hooks, the
    transport, the answer read whole.  Anything else goes through httpx.
    """

    def __init__(self, *, direct: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._no_cookies = NoCookies()
        transport = kwargs.get("transport")
        self._direct: Callable[[httpx.Request], Awaitable[httpx.Response]] | None = None
        if direct and transport is not None and not kwargs.get("mounts"):
            # The aiohttp transport's answers come already read (ReadAnswer).
            self._direct = getattr(transport, "answer", transport.handle_async_request)

    async def send(
        self,
        request: httpx.Request,
        *,
        stream: bool = False,
        auth: Any = httpx.USE_CLIENT_DEFAULT,
        follow_redirects: Any = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        transport = self._direct
        if (
            transport is None
            or stream
            or auth is not httpx.USE_CLIENT_DEFAULT
            or follow_redirects is not httpx.USE_CLIENT_DEFAULT
            or self.auth is not None
            or self.follow_redirects
            or self.is_closed
        ):
            return await super().send(
                request, stream=stream, auth=auth, follow_redirects=follow_redirects
            )
        request.extensions.setdefault("timeout", self.timeout.as_dict())
        hooks = self.event_hooks
        for hook in hooks["request"]:
            await hook(request)
        response = await transport(request)
        response.request = request
        try:
            for hook in hooks["response"]:
                await hook(response)
            await response.aread()
        except BaseException:
            await response.aclose()
            raise
        return response

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies: CookieTypes | None) -> None:
        self._no_cookies = NoCookies(cookies)


EventHooks = dict[str, list[Callable[[Any], Awaitable[None]]]]


def make_client(
    *,
    timeout: float,
    max_connections: int,
    transport: TransportName = "auto",
    event_hooks: EventHooks | None = None,
) -> tuple[httpx.AsyncClient, str]:
    """The shared ``httpx.AsyncClient`` and the name of the transport it uses."""
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    chosen: httpx.AsyncBaseTransport | None = None
    name = "httpx"
    if transport == "aiohttp" or (
        transport == "auto" and not any(os.environ.get(v) for v in _PROXY_VARIABLES)
    ):
        chosen = _aiohttp_transport(limits)
        if chosen is not None:
            name = "aiohttp"
        elif transport == "aiohttp":
            log.warning(
                "ESPRELAY_HTTP_TRANSPORT=aiohttp but httpx-aiohttp is not installed;"
                " using httpx's own transport"
            )
    client = ApiClient(
        direct=name == "aiohttp",
        timeout=httpx.Timeout(timeout),
        limits=limits,
        transport=chosen,
        follow_redirects=False,
        event_hooks=event_hooks,
    )
    return client, name
