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
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import httpx

from esprelay.backoff import RetryPolicy
from esprelay.config import Settings, load_settings
from esprelay.delivery import Deliverer
from esprelay.errors import ConfigError
from esprelay.httpapi import OpsServer, ReadinessCheck
from esprelay.logsetup import apply_level
from esprelay.metrics import RelayMetrics
from esprelay.providers import Provider, build_provider
from esprelay.smtp.handler import IntakeState, RelayHandler
from esprelay.smtp.server import RelaySMTP, smtp_factory
from esprelay.spool import Spool, open_spool

log = logging.getLogger("esprelay")

PURGE_INTERVAL = 600.0

#: Called on SIGHUP with freshly loaded settings; may be sync or async.  A callback
#: that raises is logged and the others still run.
ReloadCallback = Callable[[Settings], Awaitable[None] | None]

#: Settings a SIGHUP applies at once; a change to any other is logged as needing a restart.
RELOADABLE = frozenset(
    {"log_level", "admin_token", "shutdown_grace", "delivered_retention", "failed_retention"}
)


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
        self.metrics = RelayMetrics()
        self.http: OpsServer | None = None
        #: Readiness checks for /readyz, by name; others (circuit breakers) add theirs.
        self.readiness: list[tuple[str, ReadinessCheck]] = [
            ("smtp", self._check_smtp),
            ("spool", self._check_spool),
        ]
        #: SIGHUP callbacks (see :meth:`reload`); other subsystems register theirs.
        self.reloaders: list[ReloadCallback] = [self._reload_settings]
        self._reloading: asyncio.Task[None] | None = None

    def add_reload_callback(self, callback: ReloadCallback) -> None:
        self.reloaders.append(callback)

    def add_readiness_check(self, name: str, check: ReadinessCheck) -> None:
        self.readiness.append((name, check))

    async def start(self) -> None:
        settings = self.settings
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.provider_timeout),
            limits=httpx.Limits(
                max_connections=max(10, settings.delivery_concurrency),
                max_keepalive_connections=max(10, settings.delivery_concurrency),
            ),
            follow_redirects=False,
            event_hooks=self.metrics.httpx_event_hooks(_provider_hosts(settings)),
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
            on_outcome=self.metrics.delivery_outcome,
        )
        self.intake.on_accepted.append(self.deliverer.wake)
        self.intake.on_accepted.append(self.metrics.message_accepted)
        self.intake.on_reply.append(self.metrics.smtp_reply)

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
        self.server = await loop.create_server(
            factory, host=settings.smtp_host, port=settings.smtp_port, reuse_address=True
        )
        self.smtp_port = self.server.sockets[0].getsockname()[1]
        self.metrics.smtp_sessions.set_function(lambda: len(self.sessions))
        await self._start_http()
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

    async def _start_http(self) -> None:
        settings = self.settings
        if not settings.http_enabled:
            return
        assert self.spool is not None and self.deliverer is not None
        self.http = OpsServer(
            spool=self.spool,
            metrics=self.metrics,
            admin_token=_secret(settings),
            readiness=self.readiness,
            on_retry=self.deliverer.wake,
        )
        await self.http.start(settings.http_host, settings.http_port)
        log.info(
            "http listening on %s:%d (admin api %s)",
            settings.http_host,
            self.http.port,
            "on" if self.http.admin_token else "off: no ESPRELAY_ADMIN_TOKEN",
        )

    async def _check_smtp(self) -> str | None:
        if self.intake.draining:
            return "shutting down"
        if self.server is None or not self.server.is_serving():
            return "not listening"
        return None

    async def _check_spool(self) -> str | None:
        assert self.spool is not None
        await self.spool.stats()  # raises SpoolError if unreadable
        path = getattr(self.spool, "path", None)  # file-backed spools (SQLite)
        if path is None:
            return None
        return await asyncio.to_thread(_file_writable, str(path))

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        """SIGHUP: reload in a task, one at a time; sessions are not touched."""
        if self._reloading is not None and not self._reloading.done():
            log.info("reload already under way")
            return
        self._reloading = asyncio.create_task(self.reload(), name="esprelay-reload")

    async def reload(self) -> None:
        """Re-read the settings (environment and .env) and run every reload callback."""
        log.info("SIGHUP: reloading configuration")
        try:
            fresh = await asyncio.to_thread(load_settings)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        failures = 0
        for callback in list(self.reloaders):
            try:
                result = callback(fresh)
                if result is not None:
                    await result
            except Exception:
                failures += 1
                log.exception("reload callback %r failed", callback)
        log.info("reload done%s", f" ({failures} callback(s) failed)" if failures else "")

    def _reload_settings(self, fresh: Settings) -> None:
        current = self.settings
        changed = [
            name
            for name in type(current).model_fields
            if getattr(current, name) != getattr(fresh, name)
        ]
        pending = sorted(f"ESPRELAY_{n.upper()}" for n in changed if n not in RELOADABLE)
        if pending:
            log.warning("changed but only applied after a restart: %s", ", ".join(pending))
        self.settings = current.model_copy(
            update={name: getattr(fresh, name) for name in RELOADABLE}
        )
        apply_level(self.settings.log_level)
        if self.http is not None:
            self.http.admin_token = _secret(self.settings)
        applied = sorted(f"ESPRELAY_{n.upper()}" for n in changed if n in RELOADABLE)
        if applied:
            log.info("applied: %s", ", ".join(applied))

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        try:
            await self.start()
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
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
        if self.http is not None:
            await self.http.close()
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


def _file_writable(path: str) -> str | None:
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"spool file {path} is not writable"
    if not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
        return "spool directory is not writable"
    return None


def _secret(settings: Settings) -> str | None:
    token = settings.admin_token
    return None if token is None else token.get_secret_value()


def _provider_hosts(settings: Settings) -> dict[str, str]:
    """API host -> provider name, for the provider label of HTTP status metrics."""
    urls = {
        "sendgrid": settings.sendgrid_api_url,
        "mailgun": settings.mailgun_api_url,
        "postmark": settings.postmark_api_url,
    }
    if settings.ses_endpoint_url:
        urls["ses"] = settings.ses_endpoint_url
    elif settings.ses_region:
        urls["ses"] = f"https://email.{settings.ses_region}.amazonaws.com"
    hosts: dict[str, str] = {}
    for name, url in urls.items():
        host = urlsplit(url).hostname
        if host:
            hosts.setdefault(host, name)
    # The configured provider wins where two share a host (a local test endpoint).
    own = urls.get(settings.provider)
    if own and urlsplit(own).hostname:
        hosts[urlsplit(own).hostname or ""] = settings.provider
    return hosts


def _smallest(limit: int, provider_limit: int | None) -> int:
    return limit if provider_limit is None else min(limit, provider_limit)
