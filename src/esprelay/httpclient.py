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
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import httpx

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


def _aiohttp_transport(limits: httpx.Limits) -> httpx.AsyncBaseTransport | None:
    try:
        import aiohttp
        from httpx_aiohttp import AiohttpTransport
    except ImportError:
        return None

    class Transport(AiohttpTransport):
        """httpx-aiohttp, with every aiohttp failure translated into httpx's tree."""

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            try:
                return await super().handle_async_request(request)
            except aiohttp.ClientError as exc:
                # httpx-aiohttp maps the common ones; the rest must not escape as
                # foreign exceptions (the provider boundary only knows httpx's).
                raise httpx.TransportError(f"{type(exc).__name__}: {exc}") from exc

    return Transport(limits=limits)


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
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(timeout),
        limits=limits,
        transport=chosen,
        follow_redirects=False,
        event_hooks=event_hooks,
    )
    return client, name
