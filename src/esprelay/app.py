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
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from esprelay.backoff import RetryPolicy
from esprelay.config import Settings, load_settings
from esprelay.delivery import Deliverer, Outcome, provider_chain
from esprelay.dispatch import ProviderSet
from esprelay.dsn import build_dsn, is_dsn, status_for
from esprelay.errors import ConfigError, SpoolError
from esprelay.gctune import return_large_blocks_to_the_system, tune_for_serving
from esprelay.httpapi import OpsServer, ReadinessCheck
from esprelay.httpclient import make_client
from esprelay.intake import Intake, IntakeState
from esprelay.logsetup import apply_level
from esprelay.metrics import RelayMetrics
from esprelay.models import Envelope
from esprelay.providers import Provider, build_provider
from esprelay.routing import RoutingTable, load_routing
from esprelay.smtp.auth import FailureLimiter, UserDB
from esprelay.smtp.guards import Guards
from esprelay.smtp.handler import RelayHandler
from esprelay.smtp.policy import RelayPolicy, parse_networks
from esprelay.smtp.server import smtp_factory
from esprelay.smtp.tls import TLSContextSource
from esprelay.spool import NewPart, Spool, open_spool

log = logging.getLogger("esprelay")

PURGE_INTERVAL = 600.0
# asyncio's default listen backlog is 100: a burst of more new connections than that
# (200 sessions of a batch job) overflows it and the kernel drops SYNs, which clients
# retry only after a second. The kernel caps this at net.core.somaxconn.
LISTEN_BACKLOG = 1024

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
        self.intake_state = IntakeState()
        self.routing = load_routing(settings)
        self.spool: Spool | None = None
        self.client: httpx.AsyncClient | None = None
        self.providers: ProviderSet | None = None
        self.deliverer: Deliverer | None = None
        self.intake: Intake | None = None
        self.server: asyncio.Server | None = None
        self.sessions: set[Any] = set()
        self.smtp_port: int | None = None
        self.smtps_server: asyncio.Server | None = None
        self.smtps_port: int | None = None
        self._stop = asyncio.Event()
        self._purge_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.metrics = RelayMetrics()
        self.http: OpsServer | None = None
        #: Readiness checks for /readyz, by name; other subsystems add theirs.
        self.readiness: list[tuple[str, ReadinessCheck]] = [
            ("smtp", self._check_smtp),
            ("spool", self._check_spool),
            ("providers", self._check_providers),
        ]
        #: SIGHUP callbacks (see :meth:`reload`); other subsystems register theirs.
        self.reloaders: list[ReloadCallback] = [
            self._reload_routes,
            self._reload_users,
            self._reload_certificates,
            self._reload_settings,
        ]
        self.users: UserDB | None = None
        self.tls: TLSContextSource | None = None
        self._reloading: asyncio.Task[None] | None = None
        # API host -> provider name, for the provider label of HTTP status metrics.
        self._provider_hosts: dict[str, str] = {}

    def add_reload_callback(self, callback: ReloadCallback) -> None:
        self.reloaders.append(callback)

    def add_readiness_check(self, name: str, check: ReadinessCheck) -> None:
        self.readiness.append((name, check))

    async def start(self) -> None:
        settings = self.settings
        # Certificates and users first: a mistake there stops start-up before anything runs.
        tls = self._tls_source()
        users = UserDB.load(
            settings.auth_file,
            settings.auth_user,
            settings.auth_password.get_secret_value() if settings.auth_password else None,
        )
        self.users = users
        self.tls = tls
        self.client, transport = make_client(
            timeout=settings.provider_timeout,
            max_connections=max(10, settings.delivery_concurrency),
            transport=settings.http_transport,
            event_hooks=self.metrics.httpx_event_hooks(self._provider_hosts),
        )
        log.info("http transport: %s", transport)
        self._provider_hosts.update(
            _provider_hosts(self.routing.providers, settings.failure_webhook_url)
        )
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
                on_outcome=self.metrics.delivery_outcome,
            )
        self.intake_state.on_accepted.append(self.metrics.message_accepted)
        self.intake_state.on_reply.append(self.metrics.smtp_reply)
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
        policy = RelayPolicy(
            trusted_networks=parse_networks(settings.trusted_networks),
            plaintext_auth_networks=parse_networks(settings.plaintext_auth_networks),
            allowed_sender_domains=tuple(
                d.lower().lstrip("@") for d in settings.allowed_sender_domains
            ),
        )
        handler = RelayHandler(
            self.intake,
            max_recipients=max_recipients,
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
                junk_command_limit=settings.smtp_junk_command_limit,
                max_session_seconds=settings.smtp_max_session_seconds,
            ),
            "tls": tls,
            "command_size_limit": settings.max_command_length,
            "engine": settings.smtp_engine,
        }
        factory, self.sessions = smtp_factory(handler, self.intake_state, **listener_options)  # type: ignore[arg-type]
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
        self.metrics.smtp_sessions.set_function(lambda: len(self.sessions))
        if tls is not None and settings.smtps_port is not None:
            smtps_factory, _ = smtp_factory(
                handler,
                self.intake_state,
                **listener_options,  # type: ignore[arg-type]
                implicit_tls=True,
                sessions=self.sessions,
            )
            self.smtps_server = await loop.create_server(
                smtps_factory,
                host=settings.smtp_host,
                port=settings.smtps_port,
                reuse_address=True,
                backlog=LISTEN_BACKLOG,
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
        await self._start_http()
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

    async def _start_http(self) -> None:
        settings = self.settings
        if not settings.http_enabled:
            return
        self.http = OpsServer(
            spool=self.spool,
            metrics=self.metrics,
            admin_token=_secret(settings),
            readiness=self.readiness,
            on_retry=self.deliverer.wake if self.deliverer is not None else None,
        )
        try:
            await self.http.start(settings.http_host, settings.http_port)
        except OSError as exc:
            raise ConfigError(
                f"ESPRELAY_HTTP_HOST/ESPRELAY_HTTP_PORT: cannot listen on"
                f" {settings.http_host}:{settings.http_port}: {exc.strerror or exc}"
            ) from None
        log.info(
            "http listening on %s:%d (admin api %s)",
            settings.http_host,
            self.http.port,
            "on" if self.http.admin_token else "off: no ESPRELAY_ADMIN_TOKEN",
        )

    async def _check_smtp(self) -> str | None:
        if self.intake_state.draining:
            return "shutting down"
        if self.server is None or not self.server.is_serving():
            return "not listening"
        return None

    async def _check_spool(self) -> str | None:
        if self.spool is None:
            return None  # passthrough mode: no spool
        await self.spool.stats()  # raises SpoolError if unreadable
        path = getattr(self.spool, "path", None)  # file-backed spools (SQLite)
        if path is None:
            return None
        return await asyncio.to_thread(_file_writable, str(path))

    async def _check_providers(self) -> str | None:
        if self.providers is not None and self.providers.all_open():
            return "every provider's circuit breaker is open"
        return None

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
            except ConfigError as exc:
                failures += 1
                log.error("reload: %s", exc)
            except Exception:
                failures += 1
                log.exception("reload callback %r failed", callback)
        log.info("reload done%s", f" ({failures} callback(s) failed)" if failures else "")

    def _reload_routes(self, fresh: Settings) -> None:
        """Re-read ESPRELAY_ROUTES_FILE; routes change in place, providers need a restart.

        New sessions and messages use the new routes at once; messages already in the
        spool keep the provider chain they were accepted with.
        """
        if fresh.routes_file is None and self.settings.routes_file is None:
            return
        routing = load_routing(fresh)  # a ConfigError keeps the running routes
        if _provider_fingerprints(routing) != _provider_fingerprints(self.routing):
            raise ConfigError(
                "ESPRELAY_ROUTES_FILE: providers were added, removed or changed;"
                " the routes are kept as they were: restart to apply"
            )
        self.routing = routing
        if self.intake is not None:
            self.intake.routing = routing
        if self.deliverer is not None:
            self.deliverer.set_default_chain(routing.default.providers)
        self.settings = self.settings.model_copy(update={"routes_file": fresh.routes_file})
        log.info(
            "routes reloaded: %d route(s), default -> %s",
            len(routing.routes),
            ",".join(routing.default.providers),
        )

    def _reload_users(self, fresh: Settings) -> None:
        """Re-read ESPRELAY_AUTH_FILE (or the AUTH_USER pair); open sessions keep theirs."""
        if self.users is None:
            return
        users = UserDB.load(  # a ConfigError keeps the running users
            fresh.auth_file,
            fresh.auth_user,
            fresh.auth_password.get_secret_value() if fresh.auth_password else None,
        )
        self.users.replace_with(users)
        self.settings = self.settings.model_copy(
            update={n: getattr(fresh, n) for n in ("auth_file", "auth_user", "auth_password")}
        )
        log.info("AUTH users reloaded: %d user(s)", len(users))

    def _reload_certificates(self, fresh: Settings) -> None:
        """Pick up rotated certificate files now rather than at the next check."""
        del fresh  # the certificate paths themselves need a restart
        if self.tls is not None:
            self.tls.check_now()

    def _reload_settings(self, fresh: Settings) -> None:
        current = self.settings
        changed = [
            name
            for name in type(current).model_fields
            if getattr(current, name) != getattr(fresh, name)
        ]
        pending = sorted(
            f"ESPRELAY_{n.upper()}"
            for n in changed
            if n not in RELOADABLE | {"routes_file", "auth_file", "auth_user", "auth_password"}
        )
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
            tune_for_serving()
            return_large_blocks_to_the_system()
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
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
        if self._background:
            await asyncio.wait(set(self._background), timeout=grace or 1.0)
        if self.http is not None:
            await self.http.close()
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


def _file_writable(path: str) -> str | None:
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"spool file {path} is not writable"
    if not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
        return "spool directory is not writable"
    return None


def _secret(settings: Settings) -> str | None:
    token = settings.admin_token
    return None if token is None else token.get_secret_value()


def _provider_hosts(providers: Mapping[str, Settings], webhook_url: str | None) -> dict[str, str]:
    """API host -> provider name (as routed), for the HTTP status metrics' label."""
    hosts: dict[str, str] = {}
    for name, settings in providers.items():
        kind = settings.provider
        url: str | None = getattr(settings, f"{kind}_api_url", None)
        if kind == "ses":
            url = settings.ses_endpoint_url or (
                f"https://email.{settings.ses_region}.amazonaws.com"
                if settings.ses_region
                else None
            )
        host = urlsplit(url).hostname if url else None
        if host:
            hosts.setdefault(host, name)
    if webhook_url:
        host = urlsplit(webhook_url).hostname
        if host:
            hosts.setdefault(host, "failure_webhook")
    return hosts


def _provider_fingerprints(routing: RoutingTable) -> dict[str, tuple[str, dict[str, object]]]:
    """What defines each provider (kind and its own settings), to detect a change.

    SecretStr compares by value, so a rotated key counts as a change.
    """
    prints: dict[str, tuple[str, dict[str, object]]] = {}
    for name, settings in routing.providers.items():
        kind = settings.provider
        own: dict[str, object] = {
            k: getattr(settings, k)
            for k in type(settings).model_fields
            if k.startswith(f"{kind}_") or k == "provider_timeout"
        }
        prints[name] = (kind, own)
    return prints
