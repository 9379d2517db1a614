"""Who may relay, and as whom.

A client may submit mail when it has authenticated or its address is in
``ESPRELAY_TRUSTED_NETWORKS``.  The sender rules then limit which envelope senders and
From addresses it may use: ``ESPRELAY_ALLOWED_SENDER_DOMAINS`` for everyone, and an
authenticated user's own list from the users file.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(items: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(item, strict=False) for item in items)


def in_networks(address: str, networks: tuple[IPNetwork, ...]) -> bool:
    """True if the client ``address`` is in one of ``networks``; False if unparsable."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def sender_matches(address: str, rules: tuple[str, ...]) -> bool:
    """``rules`` holds lower-case addresses (``a@example.com``) and domains (``example.com``)."""
    address = address.lower()
    domain = _domain(address)
    return any(address == rule if "@" in rule else domain == rule for rule in rules)


@dataclass(frozen=True)
class RelayPolicy:
    trusted_networks: tuple[IPNetwork, ...]
    plaintext_auth_networks: tuple[IPNetwork, ...] = ()
    allowed_sender_domains: tuple[str, ...] = ()

    @classmethod
    def loopback(cls) -> RelayPolicy:
        return cls(parse_networks(("127.0.0.0/8", "::1/128")))

    def trusted(self, client: str) -> bool:
        return in_networks(client, self.trusted_networks)

    def plaintext_auth_allowed(self, client: str) -> bool:
        return self.trusted(client) or in_networks(client, self.plaintext_auth_networks)

    def sender_error(self, address: str, user_rules: tuple[str, ...] | None) -> str | None:
        """Why ``address`` may not be used as a sender, or None when it may."""
        if self.allowed_sender_domains and not sender_matches(address, self.allowed_sender_domains):
            return "sender domain not allowed on this relay"
        if user_rules and not sender_matches(address, user_rules):
            return "sender not allowed for this user"
        return None
