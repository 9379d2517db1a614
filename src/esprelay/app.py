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
from esprelay.providers import Provider, build_provider
from esprelay.smtp.auth import FailureLimiter, UserDB
from esprelay.smtp.handler import IntakeState, RelayHandler
from esprelay.smtp.policy import RelayPolicy, parse_networks
from esprelay.smtp.server import Guards, RelaySMTP, smtp_factory
from esprelay.smtp.tls import TLSContextSource
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
        self.smtps_server: asyncio.Server | None = None
        self.smtps_port: int | None = None
        self._stop = asyncio.Event()
        self._purge_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        settings = self.settings
        # Certificates and users first: a mistake there stops start-up before anything runs.
        tls = self._tls_source()
        users = UserDB.load(
            settings.auth_file,
            settings.auth_user,
            settings.auth_password.get_secret_value() if settings.auth_password else None,
        )
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.provider_timeout),
            limits=httpx.Limits(
                max_connections=max(10, settings.delivery_concurrency),
                max_keepalive_connections=max(10, settings.delivery_concurrency),
            ),
            follow_redirects=False,
        )
        self.provider = build_provider(settings, self.client)
        self.spool = open_spool(settings.spool_url, exclusive=True)
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
        policy = RelayPolicy(
            trusted_networks=parse_networks(settings.trusted_networks),
            plaintext_auth_networks=parse_networks(settings.plaintext_auth_networks),
            allowed_sender_domains=tuple(
                d.lower().lstrip("@") for d in settings.allowed_sender_domains
            ),
        )
        handler = RelayHandler(
            self.spool,
            provider=self.provider.name,
            max_recipients=_smallest(settings.max_recipients, self.provider.max_recipients),
            state=self.intake,
            policy=policy,
            hostname=settings.hostname,
            repair_headers=settings.repair_headers,
            force_from=settings.force_from,
        )
        listener_options = {
            "hostname": settings.hostname,
            "data_size_limit": size_limit,
            "line_length_limit": settings.max_line_length,
            "timeout": settings.smtp_timeout,
            "policy": policy,
            "users": users,
            "limiter": FailureLimiter(settings.auth_max_failures, settings.auth_failure_window),
            "guards": Guards(
                max_connections=settings.max_connections,
                max_connections_per_client=settings.max_connections_per_client,
                max_errors=settings.max_errors,
                data_timeout=settings.data_timeout,
            ),
            "tls": tls,
            "command_size_limit": settings.max_command_length,
        }
        factory, self.sessions = smtp_factory(handler, self.intake, **listener_options)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            factory, host=settings.smtp_host, port=settings.smtp_port, reuse_address=True
        )
        self.smtp_port = self.server.sockets[0].getsockname()[1]
        if tls is not None and settings.smtps_port is not None:
            smtps_factory, _ = smtp_factory(
                handler,
                self.intake,
                **listener_options,  # type: ignore[arg-type]
                implicit_tls=True,
                sessions=self.sessions,
            )
            self.smtps_server = await loop.create_server(
                smtps_factory,
                host=settings.smtp_host,
                port=settings.smtps_port,
                reuse_address=True,
                ssl=tls.listener_context(),
                ssl_handshake_timeout=min(60.0, settings.smtp_timeout or 60.0),
            )
            self.smtps_port = self.smtps_server.sockets[0].getsockname()[1]
            log.info("smtps listening on %s:%d", settings.smtp_host, self.smtps_port)
        log.info(
            "security: trusted_networks=%s auth_users=%d starttls=%s",
            ",".join(settings.trusted_networks) or "-",
            len(users),
            "on" if tls is not None else "off",
        )
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

    def _tls_source(self) -> TLSContextSource | None:
        settings = self.settings
        if settings.tls_cert_file is None or settings.tls_key_file is None:
            return None
        if settings.tls_min_version in ("1.0", "1.1"):
            log.warning(
                "TLS %s allowed (ESPRELAY_TLS_MIN_VERSION): it is obsolete and weak; "
                "allow it only for devices that cannot do better",
                settings.tls_min_version,
            )
        return TLSContextSource(
            settings.tls_cert_file,
            settings.tls_key_file,
            min_version=settings.tls_min_version,
            ciphers=settings.tls_ciphers,
            reload_interval=settings.tls_reload_interval,
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
        log.info("shutting down: refusing new sessions, finishing messages under way")
        deadline = time.monotonic() + grace
        # Polling is fine here: it runs once, for at most the grace period.
        while any(s.in_transaction for s in self.sessions) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if self.server is not None:
            self.server.close()
        if self.smtps_server is not None:
            self.smtps_server.close()
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
