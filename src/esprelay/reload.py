"""SIGHUP: re-read the settings and apply, in place, what can change without a restart.

:class:`Reloader` keeps the running settings and runs the reload callbacks, one reload
at a time, with freshly loaded settings (environment and ``.env``).  The relay's own
steps (:func:`relay_steps`) come first, in this order:

- :class:`RoutesReload`: ``ESPRELAY_ROUTES_FILE`` (routes only; providers need a restart);
- :class:`UsersReload`: ``ESPRELAY_AUTH_FILE`` or the ``AUTH_USER`` pair;
- :func:`certificates_reload`: rotated certificate files, now rather than at the next check;
- :class:`SettingsReload`: :data:`RELOADABLE` settings; a change to any other is logged
  as needing a restart.

A callback that raises is logged and the others still run; a ``ConfigError`` keeps what
it would have replaced.  Open SMTP sessions are not touched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from esprelay.config import Settings, load_settings
from esprelay.errors import ConfigError
from esprelay.listeners import load_users
from esprelay.logsetup import apply_level
from esprelay.ops import admin_secret
from esprelay.routing import RoutingTable, load_routing
from esprelay.smtp.auth import UserDB
from esprelay.smtp.tls import TLSContextSource

log = logging.getLogger("esprelay")

#: Called on SIGHUP with freshly loaded settings; may be sync or async.  A callback
#: that raises is logged and the others still run.
ReloadCallback = Callable[[Settings], Awaitable[None] | None]

#: Settings a SIGHUP applies at once; a change to any other is logged as needing a restart.
RELOADABLE = frozenset(
    {"log_level", "admin_token", "shutdown_grace", "delivered_retention", "failed_retention"}
)
#: Settings their own reload step applies (routes and users).
_OWN_STEP = frozenset({"routes_file", "auth_file", "auth_user", "auth_password"})


class Reloader:
    """The running settings, and the callbacks a reload runs with fresh ones."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.callbacks: list[ReloadCallback] = []
        self._reloading: asyncio.Task[None] | None = None

    def add_callback(self, callback: ReloadCallback) -> None:
        self.callbacks.append(callback)

    def adopt(self, fresh: Settings, names: Iterable[str]) -> None:
        """Take these settings from ``fresh`` into the running settings."""
        self.settings = self.settings.model_copy(update={n: getattr(fresh, n) for n in names})

    def request(self) -> None:
        """SIGHUP: reload in a task, one at a time; sessions are not touched."""
        if self._reloading is not None and not self._reloading.done():
            log.info("reload already under way")
            return
        self._reloading = asyncio.create_task(self.reload(), name="esprelay-reload")

    async def reload(self) -> None:
        """Re-read the settings (environment and .env) and run every reload callback."""
        log.info("SIGHUP: reloading configuration")
        try:
            fresh = await asyncio.to_thread(load_settings, self.settings.env_file)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        failures = 0
        for callback in list(self.callbacks):
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


def relay_steps(
    reloader: Reloader,
    *,
    routing: RoutingTable,
    users: UserDB,
    tls: TLSContextSource | None,
    on_routing: Callable[[RoutingTable], None],
    on_admin_token: Callable[[str | None], None],
) -> list[ReloadCallback]:
    """The relay's own reload steps, in the order they run.

    ``on_routing`` hands reloaded routes to whatever routes; ``on_admin_token`` gets
    the admin token after every reload (the ops server's).
    """
    return [
        RoutesReload(reloader, routing, on_routing),
        UsersReload(reloader, users),
        certificates_reload(tls),
        SettingsReload(reloader, on_admin_token),
    ]


class RoutesReload:
    """Re-read ESPRELAY_ROUTES_FILE; routes change in place, providers need a restart.

    New sessions and messages use the new routes at once (``apply`` hands them to
    whatever routes); messages already in the spool keep the provider chain they were
    accepted with.
    """

    def __init__(
        self, reloader: Reloader, routing: RoutingTable, apply: Callable[[RoutingTable], None]
    ) -> None:
        self._reloader = reloader
        self._routing = routing
        self._apply = apply

    def __call__(self, fresh: Settings) -> None:
        if fresh.routes_file is None and self._reloader.settings.routes_file is None:
            return
        routing = load_routing(fresh)  # a ConfigError keeps the running routes
        if _provider_fingerprints(routing) != _provider_fingerprints(self._routing):
            raise ConfigError(
                "ESPRELAY_ROUTES_FILE: providers were added, removed or changed;"
                " the routes are kept as they were: restart to apply"
            )
        self._routing = routing
        self._apply(routing)
        self._reloader.adopt(fresh, ["routes_file"])
        log.info(
            "routes reloaded: %d route(s), default -> %s",
            len(routing.routes),
            ",".join(routing.default.providers),
        )


class UsersReload:
    """Re-read ESPRELAY_AUTH_FILE (or the AUTH_USER pair); open sessions keep theirs."""

    def __init__(self, reloader: Reloader, users: UserDB) -> None:
        self._reloader = reloader
        self._users = users

    def __call__(self, fresh: Settings) -> None:
        users = load_users(fresh)  # a ConfigError keeps the running users
        self._users.replace_with(users)
        self._reloader.adopt(fresh, ["auth_file", "auth_user", "auth_password"])
        log.info("AUTH users reloaded: %d user(s)", len(users))


def certificates_reload(tls: TLSContextSource | None) -> ReloadCallback:
    """Pick up rotated certificate files now rather than at the next check."""

    def check_now(fresh: Settings) -> None:
        del fresh  # the certificate paths themselves need a restart
        if tls is not None:
            tls.check_now()

    return check_now


class SettingsReload:
    """Apply the :data:`RELOADABLE` settings; log the other changes as needing a restart.

    ``on_admin_token`` gets the admin token after every reload (the ops server's).
    """

    def __init__(self, reloader: Reloader, on_admin_token: Callable[[str | None], None]) -> None:
        self._reloader = reloader
        self._on_admin_token = on_admin_token

    def __call__(self, fresh: Settings) -> None:
        current = self._reloader.settings
        changed = [
            name
            for name in type(current).model_fields
            if getattr(current, name) != getattr(fresh, name)
        ]
        pending = sorted(
            f"ESPRELAY_{n.upper()}" for n in changed if n not in RELOADABLE | _OWN_STEP
        )
        if pending:
            log.warning("changed but only applied after a restart: %s", ", ".join(pending))
        self._reloader.adopt(fresh, RELOADABLE)
        apply_level(self._reloader.settings.log_level)
        self._on_admin_token(admin_secret(self._reloader.settings))
        applied = sorted(f"ESPRELAY_{n.upper()}" for n in changed if n in RELOADABLE)
        if applied:
            log.info("applied: %s", ", ".join(applied))


def _provider_fingerprints(routing: RoutingTable) -> dict[str, tuple[str, object]]:
    """What defines each provider (kind and its own settings), to detect a change.

    The settings models are frozen and compare by value (SecretStr too), so a rotated
    key counts as a change.
    """
    return {name: (c.kind.name, c.settings) for name, c in routing.providers.items()}
