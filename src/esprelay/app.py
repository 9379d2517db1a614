"""Wiring and lifecycle: settings -> spool -> provider -> workers -> SMTP listener.

Each job has its own module; :class:`Relay` builds them in order and takes them down:

- :mod:`esprelay.outbound`: the shared HTTP client and the routed providers;
- :mod:`esprelay.failures`: bounces and the failure webhook (queue mode);
- :mod:`esprelay.listeners`: the SMTP and SMTPS listeners and their sessions;
- :mod:`esprelay.readiness`: the checks behind ``/readyz``;
- :mod:`esprelay.reload`: SIGHUP.

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
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from esprelay.config import Settings, load_settings
from esprelay.delivery import Deliverer
from esprelay.dispatch import ProviderSet
from esprelay.errors import ConfigError
from esprelay.gctune import return_large_blocks_to_the_system, tune_for_serving
from esprelay.httpapi import OpsServer, ReadinessCheck
from esprelay.intake import Intake, IntakeState
from esprelay.listeners import Listeners, load_users, tls_source
from esprelay.logsetup import apply_level
from esprelay.metrics import RelayMetrics
from esprelay.ops import admin_secret, start_ops
from esprelay.outbound import outbound_client, routed_providers
from esprelay.queuemode import QueueMode
from esprelay.routing import RoutingTable, load_routing
from esprelay.smtp.auth import UserDB
from esprelay.smtp.tls import TLSContextSource
from esprelay.spool import Spool

log = logging.getLogger("esprelay")

#: Called on SIGHUP with freshly loaded settings; may be sync or async.  A callback
#: that raises is logged and the others still run.
ReloadCallback = Callable[[Settings], Awaitable[None] | None]

#: Settings a SIGHUP applies at once; a change to any other is logged as needing a restart.
RELOADABLE = frozenset(
    {"log_level", "admin_token", "shutdown_grace", "delivered_retention", "failed_retention"}
)


class Relay:
    """One bridge: :meth:`start` builds and opens it, :meth:`shutdown` takes it down."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.intake_state = IntakeState()
        self.routing = load_routing(settings)
        self.tls: TLSContextSource | None = None
        self.users: UserDB | None = None
        self.metrics = RelayMetrics()
        self.client: httpx.AsyncClient | None = None
        self.providers: ProviderSet | None = None
        self.queue: QueueMode | None = None
        self.intake: Intake | None = None
        self.listeners: Listeners | None = None
        self.http: OpsServer | None = None
        self._stop = asyncio.Event()
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
        self._reloading: asyncio.Task[None] | None = None

    @property
    def sessions(self) -> set[Any]:
        return self.listeners.sessions if self.listeners is not None else set()

    @property
    def smtp_port(self) -> int | None:
        return self.listeners.port if self.listeners is not None else None

    def add_reload_callback(self, callback: ReloadCallback) -> None:
        self.reloaders.append(callback)

    def add_readiness_check(self, name: str, check: ReadinessCheck) -> None:
        self.readiness.append((name, check))

    @property
    def spool(self) -> Spool | None:
        return self.queue.spool if self.queue is not None else None

    @property
    def deliverer(self) -> Deliverer | None:
        return self.queue.deliverer if self.queue is not None else None

    async def start(self) -> None:
        """Open the parts in order; the delivery workers start last."""
        # Certificates and users first: a mistake there stops start-up before anything runs.
        self.tls = tls_source(self.settings)
        self.users = load_users(self.settings)
        self.client = outbound_client(self.settings, self.routing, self.metrics)
        self.providers = routed_providers(self.settings, self.routing, self.client)
        if self.settings.delivery_mode == "queue":
            await self._open_queue(self.client, self.providers)
        self._open_intake(self.providers)
        await self._listen(self.providers)
        self.http = await start_ops(
            self.settings,
            spool=self.spool,
            metrics=self.metrics,
            readiness=self.readiness,
            on_retry=self.deliverer.wake if self.deliverer is not None else None,
        )
        if self.queue is not None:
            self.queue.start()
        self._log_started()

    async def _open_queue(self, client: httpx.AsyncClient, providers: ProviderSet) -> None:
        self.queue = QueueMode(
            self.settings,
            owner=self.owner,
            client=client,
            providers=providers,
            default_chain=self.routing.default.providers,
            retention=self._retention,
            on_outcome=self.metrics.delivery_outcome,
        )
        await self.queue.open()

    def _open_intake(self, providers: ProviderSet) -> None:
        self.intake_state.on_accepted.append(self.metrics.message_accepted)
        self.intake_state.on_reply.append(self.metrics.smtp_reply)
        self.intake = Intake(
            mode=self.settings.delivery_mode,
            routing=self.routing,
            providers=providers,
            state=self.intake_state,
            spool=self.spool,
            deliverer=self.deliverer,
            inline_seconds=self.settings.inline_attempt_seconds,
        )

    async def _listen(self, providers: ProviderSet) -> None:
        assert self.intake is not None and self.users is not None
        self.listeners = Listeners(
            self.settings,
            self.intake,
            self.intake_state,
            users=self.users,
            tls=self.tls,
            providers=providers.providers.values(),
        )
        await self.listeners.open()
        self.metrics.smtp_sessions.set_function(lambda: len(self.sessions))

    async def _check_smtp(self) -> str | None:
        if self.intake_state.draining:
            return "shutting down"
        if self.listeners is None or not self.listeners.is_serving():
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

    def _log_started(self) -> None:
        settings = self.settings
        assert self.listeners is not None and self.providers is not None
        log.info(
            "smtp listening on %s:%d mode=%s providers=%s spool=%s max_size=%d",
            settings.smtp_host,
            self.listeners.port,
            settings.delivery_mode,
            ",".join(f"{name}({p.kind})" for name, p in self.providers.providers.items()),
            settings.spool_url.split("://", 1)[0] if self.spool else "none",
            self.listeners.size_limit,
        )

    def _use_routing(self, routing: RoutingTable) -> None:
        """Routes reloaded: new sessions and messages use them at once."""
        self.routing = routing
        if self.intake is not None:
            self.intake.routing = routing
        if self.queue is not None:
            self.queue.set_default_chain(routing.default.providers)

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
        self._use_routing(routing)
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
        users = load_users(fresh)  # a ConfigError keeps the running users
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
            self.http.admin_token = admin_secret(self.settings)
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
        if self.listeners is not None:
            await self.listeners.close(grace)
        if self.queue is not None:
            await self.queue.stop(grace)
        if self.http is not None:
            await self.http.close()
        if self.providers is not None:
            for provider in self.providers.providers.values():
                await provider.aclose()
        if self.queue is not None:
            await self.queue.close()
        if self.client is not None:
            await self.client.aclose()
        if self.listeners is not None and self.listeners.server is not None:
            log.info("stopped")

    def _retention(self) -> tuple[float, float]:
        return self.settings.delivered_retention, self.settings.failed_retention


def _file_writable(path: str) -> str | None:
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"spool file {path} is not writable"
    if not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
        return "spool directory is not writable"
    return None


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
