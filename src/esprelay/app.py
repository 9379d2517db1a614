"""Wiring and lifecycle: settings -> spool -> provider -> workers -> SMTP listener.

Each job has its own module; :class:`Relay` builds them in order and takes them down:

- :mod:`esprelay.outbound`: the shared HTTP client and the routed providers;
- :mod:`esprelay.queuemode`: the spool and its delivery workers, with bounces and the
  failure webhook (:mod:`esprelay.failures`) and retention (:mod:`esprelay.purge`);
- :mod:`esprelay.listeners`: the SMTP and SMTPS listeners and their sessions;
- :mod:`esprelay.ops`: the ops HTTP server, with the checks of :mod:`esprelay.readiness`;
- :mod:`esprelay.events`: the ESP event webhooks (``ESPRELAY_EVENTS_PORT``);
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
from typing import Any

import httpx

from esprelay.config import Settings
from esprelay.delivery import Deliverer
from esprelay.dispatch import ProviderSet
from esprelay.events.listener import EventsListener
from esprelay.events.service import start_events
from esprelay.gctune import return_large_blocks_to_the_system, tune_for_serving
from esprelay.httpapi import OpsServer, ReadinessCheck
from esprelay.intake import Intake, IntakeState
from esprelay.listeners import Listeners, load_users, tls_source
from esprelay.metrics import RelayMetrics
from esprelay.ops import start_ops
from esprelay.outbound import outbound_client, routed_providers
from esprelay.queuemode import QueueMode
from esprelay.readiness import relay_checks
from esprelay.reload import ReloadCallback, Reloader, relay_steps
from esprelay.routing import RoutingTable, load_routing
from esprelay.spill import spiller_for
from esprelay.spool import Spool

log = logging.getLogger("esprelay")


class Relay:
    """One bridge: :meth:`start` builds and opens it, :meth:`shutdown` takes it down."""

    def __init__(self, settings: Settings) -> None:
        self.reloader = Reloader(settings)
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.intake_state = IntakeState()
        self.routing = load_routing(settings)
        # Certificates and users too: a mistake there stops start-up before anything runs.
        self.tls = tls_source(settings)
        self.users = load_users(settings)
        self.metrics = RelayMetrics()
        self.metrics.set_build_info(settings.smtp_engine)
        self.client: httpx.AsyncClient | None = None
        self.providers: ProviderSet | None = None
        self.queue: QueueMode | None = None
        self.intake: Intake | None = None
        self.listeners: Listeners | None = None
        self.http: OpsServer | None = None
        self.events: EventsListener | None = None
        self._stop = asyncio.Event()
        #: Readiness checks for /readyz, by name; :meth:`start` puts the relay's own first.
        self.readiness: list[tuple[str, ReadinessCheck]] = []
        self.reloader.callbacks += relay_steps(
            self.reloader,
            routing=self.routing,
            users=self.users,
            tls=self.tls,
            on_routing=self._use_routing,
            on_admin_token=self._use_admin_token,
        )

    @property
    def settings(self) -> Settings:
        """The running settings: a SIGHUP changes the reloadable ones."""
        return self.reloader.settings

    @property
    def sessions(self) -> set[Any]:
        return self.listeners.sessions if self.listeners is not None else set()

    @property
    def smtp_port(self) -> int | None:
        return self.listeners.port if self.listeners is not None else None

    def add_reload_callback(self, callback: ReloadCallback) -> None:
        """Run ``callback`` with the fresh settings on SIGHUP, after the relay's own steps."""
        self.reloader.add_callback(callback)

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
        self.client = outbound_client(self.settings, self.routing, self.metrics)
        self.providers = routed_providers(self.settings, self.routing, self.client)
        self.metrics.watch_providers(self.providers)
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
            health=self._health,
        )
        self.events = await start_events(
            self.settings,
            routing=self.routing,
            spool=self.spool,
            metrics=self.metrics,
            process=True,
            wake_delivery=self.deliverer.wake if self.deliverer else None,
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
        self.queue.notifier.on_bounce.append(self.metrics.dsn_sent)

    def _open_intake(self, providers: ProviderSet) -> None:
        self.intake_state.on_accepted.append(self.metrics.message_accepted)
        self.intake_state.on_reply.append(self.metrics.smtp_reply)
        self.intake_state.on_auth_failure.append(self.metrics.auth_failed)
        self.intake = Intake(
            mode=self.settings.delivery_mode,
            routing=self.routing,
            providers=providers,
            state=self.intake_state,
            spool=self.spool,
            deliverer=self.deliverer,
            inline_seconds=self.settings.inline_attempt_seconds,
            signed_messages=self.settings.signed_messages,
            keep_headers=self.settings.events_port is not None,
            spiller=spiller_for(self.spool, self.settings.smtp_spill_size),
            memory=self.settings.intake_memory,
        )

    def _health(self) -> dict[str, Any]:
        """Provider health for ``/healthz?detail=1``: the breakers of the providers in use
        (after a routes reload, the new ones)."""
        return {"providers": self.providers.health() if self.providers is not None else {}}

    async def _listen(self, providers: ProviderSet) -> None:
        assert self.intake is not None
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
        self.readiness[:0] = relay_checks(
            state=self.intake_state,
            listening=self.listeners.is_serving,
            spool=self.spool,
            providers=providers,
        )

    def _log_started(self) -> None:
        settings = self.settings
        assert self.listeners is not None and self.providers is not None
        log.info(
            "smtp listening on %s:%d mode=%s providers=%s spool=%s max_size=%d",
            settings.smtp_host,
            self.listeners.port,
            settings.delivery_mode,
            ",".join(
                f"{name}({p.kind}{':sandbox' if getattr(p, 'sandbox', False) else ''})"
                for name, p in self.providers.providers.items()
            ),
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

    def _use_admin_token(self, token: str | None) -> None:
        if self.http is not None:
            self.http.admin_token = token

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reloader.request)
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
        if self.events is not None:
            await self.events.close()
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
