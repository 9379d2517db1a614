"""The SMTP listeners: the SMTP port (plain, STARTTLS) and the SMTPS port (implicit TLS).

:class:`Listeners` builds the relay policy, the handler and the session limits from the
settings, opens both ports over the same handler and set of sessions, and at shutdown
lets the transactions under way finish before it closes them (see :mod:`esprelay.app`).
The message size and recipient limits are the lowest of the relay's and its providers'.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import time
from collections.abc import Iterable
from typing import Any

from esprelay.config import Settings
from esprelay.errors import ConfigError
from esprelay.intake import Intake, IntakeState
from esprelay.providers import Provider
from esprelay.smtp.auth import FailureLimiter, UserDB
from esprelay.smtp.guards import Guards
from esprelay.smtp.handler import RelayHandler
from esprelay.smtp.policy import RelayPolicy, parse_networks
from esprelay.smtp.proxy import ProxyConfig
from esprelay.smtp.replies import AUTH_REQUIRED, STARTTLS_AND_AUTH_REQUIRED
from esprelay.smtp.server import smtp_factory
from esprelay.smtp.tls import TLSContextSource

log = logging.getLogger("esprelay")

# asyncio's default listen backlog is 100: a burst of more new connections than that
# (200 sessions of a batch job) overflows it and the kernel drops SYNs, which clients
# retry only after a second. The kernel caps this at net.core.somaxconn.
LISTEN_BACKLOG = 1024


class ListenError(ConfigError):
    """A port could not be opened.  ``temporary`` when another process holds it (the
    CLI then exits 75, not 78: a restart may find it free, an old instance gone)."""

    def __init__(self, message: str, *, temporary: bool) -> None:
        super().__init__(message)
        self.temporary = temporary


def listen_error(variable: str, host: str, port: int, exc: OSError) -> ConfigError:
    """Why a port could not be opened, naming ESPRELAY_<variable>_HOST and _PORT."""
    return ListenError(
        f"ESPRELAY_{variable}_HOST/ESPRELAY_{variable}_PORT: cannot listen on"
        f" {host}:{port}: {exc.strerror or exc}",
        temporary=exc.errno == errno.EADDRINUSE,
    )


def tls_source(settings: Settings) -> TLSContextSource | None:
    """The certificates for STARTTLS and SMTPS, or None without ESPRELAY_TLS_CERT_FILE."""
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


def load_users(settings: Settings) -> UserDB:
    """The AUTH users: ESPRELAY_AUTH_FILE and the ESPRELAY_AUTH_USER pair."""
    return UserDB.load(
        settings.auth_file,
        settings.auth_user,
        settings.auth_password.get_secret_value() if settings.auth_password else None,
    )


def proxy_config(settings: Settings) -> ProxyConfig | None:
    """The PROXY protocol gate's settings, or None when ESPRELAY_PROXY_PROTOCOL is off."""
    if not settings.proxy_protocol:
        return None
    return ProxyConfig(
        trusted=parse_networks(settings.proxy_trusted),
        timeout=settings.proxy_protocol_timeout,
    )


def exposure_warnings(
    settings: Settings,
    addresses: Iterable[str],
    *,
    auth_users: int,
    provider_kinds: Iterable[str],
) -> list[str]:
    """What an operator must hear at start-up about the listeners bound to ``addresses``.

    - Listening beyond loopback while trusting only loopback, without AUTH users: every
      client elsewhere (another container, another pod, another host) is refused with
      ``530``, and nothing else would say why.  (An open relay is refused before this:
      :class:`esprelay.config.Settings`.)
    - The ``outbox`` provider with a listener beyond loopback: the clients believe their
      mail goes out, and it only lands in a folder.
    """
    exposed = sorted({a for a in addresses if not _is_loopback(a)})
    if not exposed:
        return []
    where = ", ".join(exposed)
    warnings = []
    trusted = parse_networks(settings.trusted_networks)
    if auth_users == 0 and all(network.is_loopback for network in trusted):
        refusal = (
            STARTTLS_AND_AUTH_REQUIRED
            if settings.tls_cert_file is not None and not settings.plaintext_auth_networks
            else AUTH_REQUIRED
        )
        warnings.append(
            f"SMTP listens on {where} (ESPRELAY_SMTP_HOST), beyond loopback, but trusts only"
            f" loopback (ESPRELAY_TRUSTED_NETWORKS={','.join(settings.trusted_networks) or '-'})"
            " and has no AUTH user (ESPRELAY_AUTH_FILE, ESPRELAY_AUTH_USER): every client"
            f" on another host, container or pod will be refused with '{refusal}'."
            " Configure SMTP AUTH, or trust the clients' own subnet by name"
            " (ESPRELAY_TRUSTED_NETWORKS=10.0.5.0/24), never every address"
        )
    if "outbox" in provider_kinds:
        warnings.append(
            f"the outbox provider is in use while SMTP listens on {where}, beyond loopback:"
            " messages are written to ESPRELAY_OUTBOX_DIR and NOT delivered to anyone."
            " Set ESPRELAY_PROVIDER to your ESP (sendgrid, mailgun, ses, ...) unless this is"
            " a development setup"
        )
    return warnings


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return address == "localhost"


class Listeners:
    """The relay's SMTP and SMTPS listeners and their sessions."""

    def __init__(
        self,
        settings: Settings,
        intake: Intake,
        state: IntakeState,
        *,
        users: UserDB,
        tls: TLSContextSource | None,
        providers: Iterable[Provider],
    ) -> None:
        self._settings = settings
        self._state = state
        self._users = users
        self._tls = tls
        providers = list(providers)
        self._provider_kinds = sorted({p.kind for p in providers})
        self.size_limit = min(
            [settings.max_message_size]
            + [p.max_message_size for p in providers if p.max_message_size]
        )
        max_recipients = min(
            [settings.max_recipients] + [p.max_recipients for p in providers if p.max_recipients]
        )
        policy = RelayPolicy(
            trusted_networks=parse_networks(settings.trusted_networks),
            plaintext_auth_networks=parse_networks(settings.plaintext_auth_networks),
            allowed_sender_domains=tuple(
                d.lower().lstrip("@") for d in settings.allowed_sender_domains
            ),
        )
        self._handler = RelayHandler(
            intake,
            max_recipients=max_recipients,
            policy=policy,
            hostname=settings.hostname,
            repair_headers=settings.repair_headers,
            force_from=settings.force_from,
        )
        self._options = {
            "hostname": settings.hostname,
            "data_size_limit": self.size_limit,
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
            "proxy": proxy_config(settings),
        }
        self.sessions: set[Any] = set()
        self.server: asyncio.Server | None = None
        self.port: int | None = None
        self.smtps_server: asyncio.Server | None = None
        self.smtps_port: int | None = None

    async def open(self) -> None:
        """Listen on ESPRELAY_SMTP_PORT, and on ESPRELAY_SMTPS_PORT when TLS is set up."""
        settings = self._settings
        factory, self.sessions = smtp_factory(self._handler, self._state, **self._options)  # type: ignore[arg-type]
        try:
            self.server = await self._bind(factory, settings.smtp_port)
        except OSError as exc:
            raise listen_error("SMTP", settings.smtp_host, settings.smtp_port, exc) from None
        self.port = self.server.sockets[0].getsockname()[1]
        tls = self._tls
        if tls is not None and settings.smtps_port is not None:
            smtps_factory, _ = smtp_factory(
                self._handler,
                self._state,
                **self._options,  # type: ignore[arg-type]
                implicit_tls=True,
                sessions=self.sessions,
            )
            # Behind a PROXY protocol balancer the header comes before TLS: the gate
            # (esprelay.smtp.proxy) starts TLS after it, on a plain TCP listener.
            tls_options: dict[str, Any] = {}
            if not settings.proxy_protocol:
                tls_options["ssl"] = tls.listener_context()
                tls_options["ssl_handshake_timeout"] = min(60.0, settings.smtp_timeout or 60.0)
            try:
                self.smtps_server = await self._bind(
                    smtps_factory, settings.smtps_port, **tls_options
                )
            except OSError as exc:
                self.server.close()
                raise ListenError(
                    f"ESPRELAY_SMTP_HOST/ESPRELAY_SMTPS_PORT: cannot listen on"
                    f" {settings.smtp_host}:{settings.smtps_port}: {exc.strerror or exc}",
                    temporary=exc.errno == errno.EADDRINUSE,
                ) from None
            self.smtps_port = self.smtps_server.sockets[0].getsockname()[1]
            log.info("smtps listening on %s:%d", settings.smtp_host, self.smtps_port)
        log.info(
            "security: trusted_networks=%s auth_users=%d starttls=%s",
            ",".join(settings.trusted_networks) or "-",
            len(self._users),
            "on" if tls is not None else "off",
        )
        if settings.proxy_protocol:
            log.info(
                "PROXY protocol on: connections only from proxy_trusted=%s",
                ",".join(settings.proxy_trusted),
            )
        for warning in exposure_warnings(
            settings,
            [s.getsockname()[0] for server in self._servers() for s in server.sockets],
            auth_users=len(self._users),
            provider_kinds=self._provider_kinds,
        ):
            log.warning("%s", warning)

    def _servers(self) -> list[asyncio.Server]:
        return [s for s in (self.server, self.smtps_server) if s is not None]

    async def _bind(self, factory: Any, port: int, **tls: Any) -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(
            factory,
            host=self._settings.smtp_host,
            port=port,
            reuse_address=True,
            backlog=LISTEN_BACKLOG,
            **tls,
        )

    def is_serving(self) -> bool:
        """Whether the SMTP port takes connections (for ``/readyz``)."""
        return self.server is not None and self.server.is_serving()

    async def close(self, grace: float) -> None:
        """Let transactions under way finish (up to ``grace`` seconds), then close all.

        The caller has set the intake draining: new sessions and new MAILs get ``421``.
        """
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
