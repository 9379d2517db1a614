"""Several named providers, and routes that choose among them per message.

The simple case needs no file: ``ESPRELAY_PROVIDER`` and its variables make one
provider, named after its kind, and one default route to it.  Anything more goes
in a TOML file named by ``ESPRELAY_ROUTES_FILE``::

    [providers.brand-a]            # a name of your choice
    kind = "mailgun"               # any registered kind: outbox, sendgrid, mailgun, ...
    domain = "mg.brand-a.example"  # the kind's ESPRELAY_<KIND>_* settings, without the prefix
    api_key_env = "BRAND_A_KEY"    # any setting can come from another variable with _env

    [providers.backup]
    kind = "sendgrid"
    api_key_env = "SENDGRID_KEY"

    [[routes]]                     # first match wins
    sender_domains = ["brand-a.example", "*.brand-a.example"]
    providers = ["brand-a", "backup"]   # in order: failover to the next

    [[routes]]
    recipient_domains = ["partner.example"]
    auth_users = ["printer"]       # every criterion given must match
    providers = ["backup"]

    [default]
    providers = ["brand-a"]

A route matches a *recipient* when all of its criteria hold: the envelope sender's
domain, the authenticated SMTP user, the recipient's domain.  Recipients of one
message that need different routes are split into parts, each spooled and tracked
on its own; together the parts hold every envelope recipient exactly once.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from esprelay.config import Settings
from esprelay.errors import ConfigError
from esprelay.models import Envelope
from esprelay.providers.registry import ProviderConfig, configure, env_values, get_kind

DEFAULT_ROUTE = "default"


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    providers: tuple[str, ...]
    sender_domains: tuple[str, ...] = ()
    recipient_domains: tuple[str, ...] = ()
    auth_users: tuple[str, ...] = ()

    def matches(self, sender: str, recipient: str, auth_user: str | None) -> bool:
        if self.sender_domains and not _domain_in(sender, self.sender_domains):
            return False
        if self.recipient_domains and not _domain_in(recipient, self.recipient_domains):
            return False
        return not self.auth_users or (auth_user is not None and auth_user in self.auth_users)


@dataclass(frozen=True, slots=True)
class Part:
    """The recipients of one message that go one way."""

    route: str
    providers: tuple[str, ...]
    envelope: Envelope


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """Providers by name, and the ordered routes over them."""

    providers: Mapping[str, ProviderConfig]
    routes: tuple[Route, ...]
    default: Route

    def plan(self, envelope: Envelope, auth_user: str | None = None) -> list[Part]:
        """Split ``envelope`` into parts by route, keeping recipient order."""
        by_route: dict[str, list[str]] = {}
        chosen: dict[str, Route] = {}
        for recipient in envelope.rcpt_tos:
            route = next(
                (r for r in self.routes if r.matches(envelope.mail_from, recipient, auth_user)),
                self.default,
            )
            by_route.setdefault(route.name, []).append(recipient)
            chosen[route.name] = route
        return [
            Part(
                route=name,
                providers=chosen[name].providers,
                envelope=Envelope(envelope.mail_from, tuple(recipients)),
            )
            for name, recipients in by_route.items()
        ]

    def route_for_sender(self, mail_from: str, auth_user: str | None = None) -> Route:
        """The route a message with no recipient-specific rule would take."""
        return next(
            (
                r
                for r in self.routes
                if not r.recipient_domains and r.matches(mail_from, "", auth_user)
            ),
            self.default,
        )


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def _domain_in(address: str, patterns: Iterable[str]) -> bool:
    domain = _domain_of(address)
    if not domain:
        return False
    for pattern in patterns:
        if pattern.startswith("*."):
            if domain.endswith(pattern[1:]):
                return True
        elif domain == pattern:
            return True
    return False


def default_provider(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> ProviderConfig:
    """The provider of ``ESPRELAY_PROVIDER`` with its ``ESPRELAY_<KIND>_*`` settings."""
    kind = get_kind(settings.provider)
    return configure(kind, env_values(kind, settings.environ if environ is None else environ))


def load_routing(settings: Settings, environ: Mapping[str, str] | None = None) -> RoutingTable:
    """The routing table for ``settings``: from ESPRELAY_ROUTES_FILE, or the single provider."""
    environ = settings.environ if environ is None else environ
    if settings.routes_file is None:
        route = Route(DEFAULT_ROUTE, (settings.provider,))
        return RoutingTable({settings.provider: default_provider(settings, environ)}, (), route)
    try:
        data = tomllib.loads(settings.routes_file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"ESPRELAY_ROUTES_FILE: cannot read it: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"ESPRELAY_ROUTES_FILE: not valid TOML: {exc}") from None
    return parse_routing(data, settings, environ)


def parse_routing(
    data: Mapping[str, Any], settings: Settings, environ: Mapping[str, str]
) -> RoutingTable:
    where = "ESPRELAY_ROUTES_FILE"
    unknown = set(data) - {"providers", "routes", "default"}
    if unknown:
        raise ConfigError(f"{where}: unknown section(s): {', '.join(sorted(unknown))}")
    raw_providers = data.get("providers") or {}
    if not isinstance(raw_providers, dict) or not raw_providers:
        raise ConfigError(f"{where}: define at least one [providers.NAME] table")
    providers = {name: _provider(name, table, environ) for name, table in raw_providers.items()}

    def route(name: str, table: Any) -> Route:
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: {name} must be a table")
        allowed = {"providers", "sender_domains", "recipient_domains", "auth_users", "name"}
        extra = set(table) - allowed
        if extra:
            raise ConfigError(f"{where}: {name}: unknown key(s): {', '.join(sorted(extra))}")
        chain = tuple(_strings(table.get("providers"), f"{where}: {name}.providers"))
        if not chain:
            raise ConfigError(f"{where}: {name}.providers must name at least one provider")
        for provider in chain:
            if provider not in providers:
                raise ConfigError(f"{where}: {name}.providers: no provider named {provider!r}")
        return Route(
            name=str(table.get("name", name)),
            providers=chain,
            sender_domains=tuple(
                d.lower() for d in _strings(table.get("sender_domains"), f"{where}: {name}")
            ),
            recipient_domains=tuple(
                d.lower() for d in _strings(table.get("recipient_domains"), f"{where}: {name}")
            ),
            auth_users=tuple(_strings(table.get("auth_users"), f"{where}: {name}")),
        )

    raw_routes = data.get("routes") or []
    if not isinstance(raw_routes, list):
        raise ConfigError(f"{where}: routes must be an array of tables ([[routes]])")
    routes = tuple(route(f"routes[{i}]", table) for i, table in enumerate(raw_routes))
    for r in routes:
        if not (r.sender_domains or r.recipient_domains or r.auth_users):
            raise ConfigError(f"{where}: {r.name} has no criterion; use [default] instead")
    if "default" in data:
        default = route(DEFAULT_ROUTE, data["default"])
    else:
        default = Route(DEFAULT_ROUTE, (next(iter(providers)),))
    return RoutingTable(providers, routes, default)


def _strings(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{where}: expected a string or a list of strings")


def _provider(name: str, table: Any, environ: Mapping[str, str]) -> ProviderConfig:
    where = f"ESPRELAY_ROUTES_FILE: providers.{name}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    kind_name = table.get("kind")
    if not isinstance(kind_name, str):
        raise ConfigError(f"{where}.kind is required (a registered provider, such as sendgrid)")
    kind = get_kind(kind_name, where=f"{where}.kind")
    values: dict[str, Any] = env_values(kind, environ)
    for key, value in table.items():
        if key == "kind":
            continue
        if key.endswith("_env"):
            variable = str(value)
            if variable not in environ:
                raise ConfigError(f"{where}.{key}: environment variable {variable} is not set")
            key, value = key.removesuffix("_env"), environ[variable]
        values[key] = value
    return configure(kind, values, where=where)
