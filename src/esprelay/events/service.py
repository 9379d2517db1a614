"""The events listener as configured, for :class:`esprelay.app.Relay`.

:func:`start_events` answers None unless ``ESPRELAY_EVENTS_PORT`` is set.  Otherwise it
finds, among the configured providers (``ESPRELAY_PROVIDER``, or the routes file's
named ones), those of a kind with events whose webhook keys are set
(:mod:`esprelay.events.settings`), builds their sources and opens the listener.  The
events are stored in the spool's inbox, so the queue mode's spool is required; the
:class:`~esprelay.events.processor.EventProcessor` that applies them starts and stops
with the listener, and is woken whenever it stores some.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx

from esprelay.clock import SYSTEM_CLOCK, Clock
from esprelay.config import Settings
from esprelay.errors import ConfigError
from esprelay.events.forward import EventForwarder, parse_kinds
from esprelay.events.listener import PREFIX, EventsListener
from esprelay.events.model import Event, EventInbox, EventSource, InboxResult, StoredEvent
from esprelay.events.processor import EventProcessor
from esprelay.events.settings import SourceContext, prefix, read_settings, source_kind
from esprelay.events.status import MessageStatusStore
from esprelay.listeners import listen_error
from esprelay.metrics import RelayMetrics
from esprelay.providers.http import secret_key
from esprelay.routing import RoutingTable
from esprelay.smtp.tls import build_context
from esprelay.spool import Spool

log = logging.getLogger("esprelay.events")

#: Fetching an SNS certificate or confirming a subscription.
FETCH_TIMEOUT = 10.0


def build_sources(
    settings: Settings, routing: RoutingTable, context: SourceContext
) -> dict[str, EventSource]:
    """A source per configured provider whose webhook keys are set, by provider name."""
    sources: dict[str, EventSource] = {}
    for name, config in routing.providers.items():
        kind = source_kind(config.kind.name)
        if kind is None:
            continue
        webhook = read_settings(name, kind, settings.environ)
        if webhook is None:
            log.info(
                "events: provider %s has no webhook (no %sWEBHOOK_* / %s* keys set)",
                name,
                prefix(name),
                prefix(name),
            )
            continue
        sources[name] = kind.build(name, webhook, context)
    return sources


async def start_events(
    settings: Settings,
    *,
    routing: RoutingTable,
    spool: Spool | None,
    metrics: RelayMetrics | None,
    client: httpx.AsyncClient | None = None,
    overrides: Mapping[str, Any] | None = None,
    clock: Clock = SYSTEM_CLOCK,
    process: bool = False,
    wake_delivery: Callable[[], None] | None = None,
) -> EventsListener | None:
    """The listening events listener, or None when ``ESPRELAY_EVENTS_PORT`` is unset.

    ``client`` fetches SNS certificates (a client of its own by default, closed with
    the listener); ``overrides`` replace a source's checks in tests (see
    :class:`~esprelay.events.settings.SourceContext`).  With ``process`` (the relay's
    choice) the events are also applied to their messages by an
    :class:`~esprelay.events.processor.EventProcessor` started and stopped with the
    listener; ``wake_delivery`` sends the DSNs it queues at once.  Without it they
    wait in the inbox (tests of the listener alone).
    """
    if settings.events_port is None:
        return None
    inbox: object = spool  # both backends are an EventInbox too; the Spool protocol is not
    if not isinstance(inbox, EventInbox):
        raise ConfigError(
            "ESPRELAY_EVENTS_PORT needs the spool (ESPRELAY_DELIVERY_MODE=queue):"
            " events are stored there before they are acknowledged"
        )
    cert, key = settings.events_tls_cert_file, settings.events_tls_key_file
    if (cert is None) != (key is None):
        raise ConfigError(
            "ESPRELAY_EVENTS_TLS_CERT_FILE and ESPRELAY_EVENTS_TLS_KEY_FILE go together"
        )
    try:
        ssl_context = (
            None
            if cert is None or key is None
            else build_context(cert, key, min_version=settings.tls_min_version)
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"ESPRELAY_EVENTS_TLS_CERT_FILE / _KEY_FILE: {exc}") from None
    own_client = client is None
    http = client or httpx.AsyncClient(timeout=FETCH_TIMEOUT, follow_redirects=False)
    context = SourceContext(
        tolerance=settings.events_timestamp_tolerance,
        now=clock.time,
        client=http,
        overrides=overrides or {},
    )
    try:
        processor = (
            build_processor(
                settings,
                routing=routing,
                inbox=inbox,
                spool=spool,
                metrics=metrics,
                clock=clock,
                wake_delivery=wake_delivery,
                client=http,
            )
            if process
            else None
        )
        sources = build_sources(settings, routing, context)
        listener = EventsListener(
            sources=sources,
            inbox=inbox if processor is None else _WakingInbox(inbox, processor.wake),
            metrics=metrics,
            max_request_size=settings.events_max_request_size,
            rate=settings.events_rate_limit,
            burst=settings.events_rate_burst,
            clock=clock,
            on_close=[
                *([] if processor is None else [processor.close]),
                *([http.aclose] if own_client else []),
            ],
        )
        try:
            await listener.start(settings.events_host, settings.events_port, ssl_context)
        except OSError as exc:
            raise listen_error("EVENTS", settings.events_host, settings.events_port, exc) from None
    except BaseException:
        if own_client:
            await http.aclose()
        raise
    if processor is not None:
        processor.start()
    if not sources:
        log.warning(
            "events listening on %s:%d with no provider's webhook keys set: every event is"
            " refused (see the README, ESP events)",
            settings.events_host,
            listener.port,
        )
    else:
        log.info(
            "events listening on %s:%d (%s) for %s",
            settings.events_host,
            listener.port,
            "https" if ssl_context else "http",
            ", ".join(f"{PREFIX}{name} ({s.kind})" for name, s in sources.items()),
        )
    return listener


def build_processor(
    settings: Settings,
    *,
    routing: RoutingTable,
    inbox: EventInbox,
    spool: object,
    metrics: RelayMetrics | None,
    clock: Clock = SYSTEM_CLOCK,
    wake_delivery: Callable[[], None] | None = None,
    client: httpx.AsyncClient | None = None,
) -> EventProcessor:
    """The processor of ``inbox``'s events into ``spool``'s messages (both backends are
    a :class:`~esprelay.events.status.MessageStatusStore`); ``client`` posts the events
    forwarded to the failure webhook."""
    if not isinstance(spool, MessageStatusStore):
        raise ConfigError("ESPRELAY_EVENTS_PORT needs a spool that keeps message status")
    forwarder = None
    try:
        kinds = parse_kinds(settings.failure_webhook_events)
        secret = settings.failure_webhook_secret
        key = None if secret is None else secret_key(secret.get_secret_value())
    except ValueError as exc:
        raise ConfigError(f"ESPRELAY_FAILURE_WEBHOOK_EVENTS / _SECRET: {exc}") from None
    if kinds and settings.failure_webhook_url and client is not None:
        forwarder = EventForwarder(
            url=settings.failure_webhook_url, kinds=kinds, key=key, client=client
        )
    elif kinds:
        log.warning("ESPRELAY_FAILURE_WEBHOOK_EVENTS is set without ESPRELAY_FAILURE_WEBHOOK_URL")
    return EventProcessor(
        inbox=inbox,
        store=spool,
        spool=spool,
        hostname=settings.hostname,
        bounce_mode=settings.bounce_mode,
        bounce_from=settings.bounce_from,
        delay_dsn_after=settings.delay_dsn_after,
        default_chain=routing.default.providers,
        metrics=metrics,
        wake_delivery=wake_delivery,
        forwarder=forwarder,
        clock=clock,
        inbox_retention=lambda: settings.delivered_retention,
    )


class _WakingInbox:
    """``inbox``, calling ``wake`` once it has stored events (the processor's)."""

    def __init__(self, inbox: EventInbox, wake: Callable[[], None]) -> None:
        self._inbox = inbox
        self._wake = wake

    async def put_events(self, events: Sequence[Event]) -> list[InboxResult]:
        results = await self._inbox.put_events(events)
        if any(result.stored for result in results):
            self._wake()
        return results

    async def pending_events(self, limit: int = 100) -> list[StoredEvent]:
        return await self._inbox.pending_events(limit)

    async def finish_events(self, seqs: Sequence[int]) -> int:
        return await self._inbox.finish_events(seqs)

    async def purge_events(self, *, processed_before: float) -> int:
        return await self._inbox.purge_events(processed_before=processed_before)
