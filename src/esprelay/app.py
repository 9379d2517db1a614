"""Wiring and lifecycle: settings -> spool -> provider -> workers -> SMTP listener.

Shutdown (SIGTERM/SIGINT) follows uvicorn's shape:

1. stop taking new work: new sessions get ``421``, a new MAIL gets ``421``;
2. let sessions that are inside a transaction (MAIL given, DATA under way) finish,
   up to ``ESPRELAY_SHUTDOWN_GRACE`` seconds;
3. close the listener and every remaining session;
4. give deliveries in flight the same grace, then cancel them (they stay in the
   spool and are delivered after the restart);
5. close the spool and the HTTP client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Coroutine

import httpx

from esprelay.backoff import RetryPolicy
from esprelay.config import Settings
from esprelay.delivery import Deliverer, Outcome, provider_chain
from esprelay.dispatch import ProviderSet
from esprelay.dsn import build_dsn, is_dsn, status_for
from esprelay.errors import ConfigError, SpoolError
from esprelay.httpclient import make_client
from esprelay.intake import Intake, IntakeState
from esprelay.models import Envelope
from esprelay.providers import Provider, build_provider
from esprelay.routing import load_routing
from esprelay.smtp.handler import RelayHandler
from esprelay.smtp.server import RelaySMTP, smtp_factory
from esprelay.spool import NewPart, Spool, open_spool

log = logging.getLogger("esprelay")

PURGE_INTERVAL = 600.0
# asyncio's default listen backlog is 100: a burst of more new connections than that
# (200 sessions of a batch job) overflows it and the kernel drops SYNs, which clients
# retry only after a second. The kernel caps this at net.core.somaxconn.
LISTEN_BACKLOG = 1024


class Relay:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.intake_state = IntakeState()
        self.routing = load_routing(settings)
        self.spool: Spool | None = None
        self.client: httpx.AsyncClient | None = None
        self.providers: ProviderSet | None = None
        self.deliverer: Deliverer | None = None
        self.intake: Intake | None = None
        self.server: asyncio.Server | None = None
        self.sessions: set[RelaySMTP] = set()
        self.smtp_port: int | None = None
        self._stop = asyncio.Event()
        self._purge_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        settings = self.settings
        self.client, transport = make_client(
            timeout=settings.provider_timeout,
            max_connections=max(10, settings.delivery_concurrency),
            transport=settings.http_transport,
        )
        log.info("http transport: %s", transport)
        built: dict[str, Provider] = {}
        for name, provider_settings in self.routing.providers.items():
            provider = build_provider(provider_settings, self.client)
            provider.name = name
            built[name] = provider
        self.providers = ProviderSet(
            built,
            breaker_threshold=settings.breaker_threshold,
            breaker_cooldown=settings.breaker_cooldown,
        )
        if settings.delivery_mode == "queue":
            self.spool = open_spool(settings.spool_url, exclusive=True)
            await self.spool.open()
            self.deliverer = Deliverer(
                self.spool,
                self.providers,
                default_chain=self.routing.default.providers,
                owner=self.owner,
                concurrency=settings.delivery_concurrency,
                lease_time=settings.lease_time,
                poll_interval=settings.poll_interval,
                policy=RetryPolicy(
                    retry_initial=settings.retry_initial,
                    retry_max=settings.retry_max,
                    retry_config_error=settings.retry_config_error,
                    max_queue_lifetime=settings.max_queue_lifetime,
                ),
                on_failed=self._on_failed,
            )
            self.intake_state.on_accepted.append(self.deliverer.wake)
        self.intake = Intake(
            mode=settings.delivery_mode,
            routing=self.routing,
            providers=self.providers,
            state=self.intake_state,
            spool=self.spool,
            deliverer=self.deliverer,
            inline_seconds=settings.inline_attempt_seconds,
        )

        size_limit = min(
            [settings.max_message_size]
            + [p.max_message_size for p in built.values() if p.max_message_size]
        )
        max_recipients = min(
            [settings.max_recipients]
            + [p.max_recipients for p in built.values() if p.max_recipients]
        )
        handler = RelayHandler(self.intake, max_recipients=max_recipients)
        factory, self.sessions = smtp_factory(
            handler,
            self.intake_state,
            hostname=settings.hostname,
            data_size_limit=size_limit,
            line_length_limit=settings.max_line_length,
            timeout=settings.smtp_timeout,
        )
        loop = asyncio.get_running_loop()
        try:
            self.server = await loop.create_server(
                factory,
                host=settings.smtp_host,
                port=settings.smtp_port,
                reuse_address=True,
                backlog=LISTEN_BACKLOG,
            )
        except OSError as exc:
            raise ConfigError(
                f"ESPRELAY_SMTP_HOST/ESPRELAY_SMTP_PORT: cannot listen on"
                f" {settings.smtp_host}:{settings.smtp_port}: {exc.strerror or exc}"
            ) from None
        self.smtp_port = self.server.sockets[0].getsockname()[1]
        if self.deliverer is not None:
            self.deliverer.start()
            self._purge_task = asyncio.create_task(self._purge_loop(), name="esprelay-purge")
        log.info(
            "smtp listening on %s:%d mode=%s providers=%s spool=%s max_size=%d",
            settings.smtp_host,
            self.smtp_port,
            settings.delivery_mode,
            ",".join(f"{name}({p.kind})" for name, p in built.items()),
            settings.spool_url.split("://", 1)[0] if self.spool else "none",
            size_limit,
        )

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.shutdown()

    async def shutdown(self) -> None:
        grace = self.settings.shutdown_grace
        self.intake_state.draining = True
        if self.server is not None:
            log.info("shutting down: refusing new sessions, finishing messages under way")
        deadline = time.monotonic() + grace
        # Polling is fine here: it runs once, for at most the grace period.
        while any(s.in_transaction for s in self.sessions) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if self.server is not None:
            self.server.close()
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.close()
        if self.server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), timeout=2)
        if self._purge_task is not None:
            self._purge_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purge_task
        if self.deliverer is not None:
            await self.deliverer.stop(grace=grace)
        if self._background:
            await asyncio.wait(set(self._background), timeout=grace or 1.0)
        if self.providers is not None:
            for provider in self.providers.providers.values():
                await provider.aclose()
        if self.spool is not None:
            await self.spool.close()
        if self.client is not None:
            await self.client.aclose()
        if self.server is not None:
            log.info("stopped")

    async def _purge_loop(self) -> None:
        assert self.spool is not None
        while True:
            now = time.time()
            try:
                removed = await self.spool.purge(
                    delivered_before=now - self.settings.delivered_retention,
                    failed_before=now - self.settings.failed_retention,
                )
            except Exception:
                log.exception("spool purge failed")
            else:
                if removed:
                    log.info("purged %d finished message(s) past their retention", removed)
            await asyncio.sleep(PURGE_INTERVAL)

    # region failures: bounces and the failure webhook

    def _on_failed(self, outcome: Outcome) -> None:
        """A message answered 250 failed for good: tell its sender and the webhook."""
        if self.settings.failure_webhook_url:
            self._in_background(self._post_failure(outcome))
        message = outcome.message
        mode = self.settings.bounce_mode
        if mode == "off":
            return
        if not message.envelope.mail_from:
            log.info("no bounce for id=%s: null sender", message.id)
            return
        if message.raw is None or is_dsn(message.raw):
            log.info("no bounce for id=%s: it is itself a bounce", message.id)
            return
        recipient = message.envelope.mail_from if mode == "sender" else mode.split(":", 1)[1]
        self._in_background(self._send_bounce(outcome, recipient))

    def _in_background(self, coroutine: Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_bounce(self, outcome: Outcome, recipient: str) -> None:
        assert self.spool is not None and outcome.message.raw is not None
        message = outcome.message
        from_address = self.settings.bounce_from or f"MAILER-DAEMON@{self.settings.hostname}"
        dsn = build_dsn(
            raw=outcome.message.raw,
            failed_recipients=message.envelope.rcpt_tos,
            original_sender=message.envelope.mail_from,
            reason=str(outcome.error) if outcome.error else "delivery failed",
            status=status_for(outcome.error, expired=outcome.expired),
            reporting_mta=self.settings.hostname,
            from_address=from_address,
            to_address=recipient,
            arrival_date=message.created_at,
            message_id=message.id,
        )
        chain = provider_chain(message, self.routing.default.providers)
        part = NewPart(
            Envelope("", (recipient,)),
            chain[0],
            {
                "route": message.meta.get("route", "default"),
                "providers": list(chain),
                "dsn_for": message.id,
            },
        )
        try:
            [bounce_id] = await self.spool.put_parts(dsn, [part])
        except SpoolError as exc:
            log.error("cannot queue the bounce for id=%s: %s", message.id, exc)
            return
        log.info("bounce id=%s for=%s to=<%s> size=%d", bounce_id, message.id, recipient, len(dsn))
        if self.deliverer is not None:
            self.deliverer.wake()

    async def _post_failure(self, outcome: Outcome) -> None:
        assert self.client is not None and self.settings.failure_webhook_url
        message = outcome.message
        record = {
            "event": "failed",
            "id": message.id,
            "mail_from": message.envelope.mail_from,
            "rcpt_tos": list(message.envelope.rcpt_tos),
            "size": message.size,
            "provider": outcome.provider,
            "status_code": outcome.error.status_code if outcome.error else None,
            "error": str(outcome.error) if outcome.error else None,
            "expired": outcome.expired,
            "attempts": message.attempts + 1,
            "accepted_at": message.created_at,
            "failed_at": time.time(),
            "route": message.meta.get("route"),
        }
        try:
            response = await self.client.post(
                self.settings.failure_webhook_url, json=record, timeout=10.0
            )
        except httpx.HTTPError as exc:
            log.error("failure webhook for id=%s not delivered: %s", message.id, type(exc).__name__)
            return
        if not response.is_success:
            log.error(
                "failure webhook for id=%s answered HTTP %d", message.id, response.status_code
            )

    # endregion
