"""The HTTP listener the ESPs post their events to: ``POST /webhooks/<provider name>``.

On ``aiohttp.web``, like the ops endpoint (:mod:`esprelay.httpapi`), but meant to face
the internet, so every request goes through, in order:

1. a per-peer rate limit (a token bucket per address, :class:`~esprelay.ratelimit.RateLimit`):
   ``429`` beyond it, and the ESP tries again later;
2. the path: ``/webhooks/<name>`` of a provider with webhook keys, else ``404``;
   only ``POST`` (``405``);
3. the size: a body over ``ESPRELAY_EVENTS_MAX_REQUEST_SIZE`` is ``413`` and not read;
4. the provider's source verifies and normalises it (:class:`~esprelay.events.model.EventSource`):
   a request it refuses is answered ``400``/``401``/``403``, logged at WARNING and
   counted (``esprelay_events_rejected``), and nothing is stored;
5. the events go into the spool's inbox (:class:`~esprelay.events.model.EventInbox`),
   committed to stable storage, and only then is the request answered ``200``.  A
   spool that cannot store them answers ``503``: the ESP sends them again.

An event the inbox has already (an ESP's retry) is acknowledged and changes nothing;
one whose echoed esprelay id names no message in the spool is stored, acknowledged and
counted (``esprelay_events_unknown_message``).  No access log: a Postmark URL carries
credentials, and an ESP's address says nothing the counters do not.
"""

from __future__ import annotations

import logging
import ssl
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from aiohttp import hdrs, web

from esprelay.clock import SYSTEM_CLOCK, Clock
from esprelay.errors import SpoolError
from esprelay.events.model import EventInbox, EventSource, Rejected, WebhookRequest
from esprelay.httpapi import MAX_FIELD, MAX_HEADERS, MAX_LINE, SHUTDOWN_TIMEOUT
from esprelay.metrics import RelayMetrics
from esprelay.ratelimit import RateLimit

log = logging.getLogger("esprelay.events")

#: Peers whose rate is remembered at most (the least recently seen go first).
MAX_PEERS = 10_000
#: Seconds a keep-alive connection may stay idle; ESPs post and go.
IDLE_TIMEOUT = 15.0
#: The path prefix; the provider's name follows.
PREFIX = "/webhooks/"

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Mapping[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


class EventsListener:
    """``POST /webhooks/<name>`` for each source in ``sources`` (by provider name)."""

    def __init__(
        self,
        *,
        sources: Mapping[str, EventSource],
        inbox: EventInbox,
        metrics: RelayMetrics | None = None,
        max_request_size: int = 4 * 1024 * 1024,
        rate: float = 100.0,
        burst: int = 500,
        clock: Clock = SYSTEM_CLOCK,
        on_close: list[Callable[[], Awaitable[None]]] | None = None,
    ) -> None:
        self.sources = dict(sources)
        self.inbox = inbox
        self.metrics = metrics
        self.max_request_size = max_request_size
        self.port: int | None = None
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._peers: OrderedDict[str, RateLimit] = OrderedDict()
        self._runner: web.AppRunner | None = None
        self._on_close = on_close or []

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=self.max_request_size)
        app.router.add_route("*", PREFIX + "{name}", self._webhook)
        runner = web.AppRunner(
            app,
            access_log=None,
            keepalive_timeout=IDLE_TIMEOUT,
            max_line_size=MAX_LINE,
            max_field_size=MAX_FIELD,
            max_headers=MAX_HEADERS,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
        )
        await runner.setup()
        try:
            await web.TCPSite(
                runner, host, port, ssl_context=ssl_context, reuse_address=True
            ).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        for source in self.sources.values():
            await source.aclose()
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            await callback()

    # region request handling

    @web.middleware
    async def _middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # no route, wrong method, body too large
            response = _json({"error": exc.reason.lower()}, exc.status)
            if "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
            if exc.status == 413:
                self._count_rejected(self._provider_label(request), "too_large")
                response.force_close()
        except Exception:
            log.exception("events %s %s failed", request.method, request.path)
            response = _json({"error": "internal error"}, 500)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers[hdrs.SERVER] = "esprelay"
        return response

    def _provider_label(self, request: web.Request) -> str:
        name = request.match_info.get("name", "")
        return name if name in self.sources else "unknown"

    def _allowed(self, peer: str) -> bool:
        limit = self._peers.get(peer)
        if limit is None:
            limit = self._peers[peer] = RateLimit(self._rate, self._burst, clock=self._clock)
            while len(self._peers) > MAX_PEERS:
                self._peers.popitem(last=False)
        else:
            self._peers.move_to_end(peer)
        return limit.try_acquire()

    async def _webhook(self, request: web.Request) -> web.Response:
        peer = request.remote or ""
        provider = self._provider_label(request)
        if not self._allowed(peer):
            self._count_rejected(provider, "rate_limited")
            response = _json({"error": "too many requests"}, 429)
            response.headers["Retry-After"] = "1"
            return response
        source = self.sources.get(request.match_info["name"])
        if source is None:
            self._count_rejected(provider, "no_such_provider")
            return _json({"error": "not found"}, 404)
        if request.method != hdrs.METH_POST:
            raise web.HTTPMethodNotAllowed(request.method, [hdrs.METH_POST])
        if request.content_length is not None and request.content_length > self.max_request_size:
            raise web.HTTPRequestEntityTooLarge(
                max_size=self.max_request_size, actual_size=request.content_length
            )
        body = await request.read()  # aiohttp stops at client_max_size: 413
        incoming = WebhookRequest(
            method=request.method,
            headers=request.headers,
            body=body,
            peer=peer or None,
            query=request.query,
        )
        try:
            events = await source.receive(incoming)
        except Rejected as exc:
            log.warning(
                "events %s: refused a request from %s: %s (%d)",
                provider,
                peer,
                exc,
                exc.status,
            )
            self._count_rejected(provider, exc.reason)
            response = _json({"error": exc.reason}, exc.status)
            response.headers.update(exc.headers)
            return response
        try:
            results = await self.inbox.put_events(events)
        except SpoolError as exc:
            log.error("events %s: cannot store %d event(s): %s", provider, len(events), exc)
            return _json({"error": "cannot store the events now"}, 503)
        stored = duplicates = 0
        for event, result in zip(events, results, strict=True):
            if not result.stored:
                duplicates += 1
                if self.metrics is not None:
                    self.metrics.events_duplicates.labels(provider).inc()
                continue
            stored += 1
            if self.metrics is not None:
                self.metrics.events_received.labels(provider, event.kind).inc()
                if result.message_id is None:
                    self.metrics.events_unknown_message.labels(provider).inc()
        log.debug("events %s: %d event(s) stored, %d duplicate(s)", provider, stored, duplicates)
        return _json({"received": len(events), "stored": stored, "duplicates": duplicates})

    def _count_rejected(self, provider: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.events_rejected.labels(provider, reason).inc()

    # endregion
