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

import httpx

from esprelay.backoff import RetryPolicy
from esprelay.config import Settings
from esprelay.delivery import Deliverer
from esprelay.errors import ConfigError
from esprelay.providers import Provider, build_provider
from esprelay.smtp.handler import IntakeState, RelayHandler
from esprelay.smtp.server import RelaySMTP, smtp_factory
from esprelay.spool import Spool, open_spool

log = logging.getLogger("esprelay")

PURGE_INTERVAL = 600.0


class Relay:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.intake = IntakeState()
        self.spool: Spool | None = None
        self.client: httpx.AsyncClient | None = None
        self.provider: Provider | None = None
        self.deliverer: Deliverer | None = None
        self.server: asyncio.Server | None = None
        self.sessions: set[RelaySMTP] = set()
        self.smtp_port: int | None = None
        self._stop = asyncio.Event()
        self._purge_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        settings = self.settings
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.provider_timeout),
            limits=httpx.Limits(
                max_connections=max(10, settings.delivery_concurrency),
                max_keepalive_connections=max(10, settings.delivery_concurrency),
            ),
            follow_redirects=False,
        )
        self.provider = build_provider(settings, self.client)
        self.spool = open_spool(
            settings.spool_url,
            exclusive=True,
            owner=self.owner,
            auto_migrate=settings.spool_auto_migrate,
            pool_size=settings.spool_pool_size,
        )
        await self.spool.open()

        self.deliverer = Deliverer(
            self.spool,
            {self.provider.name: self.provider},
            default_provider=self.provider.name,
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
        )
        self.intake.on_accepted.append(self.deliverer.wake)

        size_limit = _smallest(settings.max_message_size, self.provider.max_message_size)
        handler = RelayHandler(
            self.spool,
            provider=self.provider.name,
            max_recipients=_smallest(settings.max_recipients, self.provider.max_recipients),
            state=self.intake,
        )
        factory, self.sessions = smtp_factory(
            handler,
            self.intake,
            hostname=settings.hostname,
            data_size_limit=size_limit,
            line_length_limit=settings.max_line_length,
            timeout=settings.smtp_timeout,
        )
        loop = asyncio.get_running_loop()
        try:
            self.server = await loop.create_server(
                factory, host=settings.smtp_host, port=settings.smtp_port, reuse_address=True
            )
        except OSError as exc:
            raise ConfigError(
                f"ESPRELAY_SMTP_HOST/ESPRELAY_SMTP_PORT: cannot listen on"
                f" {settings.smtp_host}:{settings.smtp_port}: {exc.strerror or exc}"
            ) from None
        self.smtp_port = self.server.sockets[0].getsockname()[1]
        self.deliverer.start()
        self._purge_task = asyncio.create_task(self._purge_loop(), name="esprelay-purge")
        log.info(
            "smtp listening on %s:%d provider=%s spool=%s max_size=%d",
            settings.smtp_host,
            self.smtp_port,
            self.provider.name,
            settings.spool_url.split("://", 1)[0],
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
        self.intake.draining = True
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
        if self.provider is not None:
            await self.provider.aclose()
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


def _smallest(limit: int, provider_limit: int | None) -> int:
    return limit if provider_limit is None else min(limit, provider_limit)
