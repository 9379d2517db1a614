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

from esprelay.message.sender import sent_as

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

    def message_sender_error(
        self,
        raw: bytes,
        *,
        mail_from: str,
        user_rules: tuple[str, ...] | None,
        force_from: str | None = None,
    ) -> str | None:
        """Why the message ``raw``, as it leaves the intake, may not be sent; or None.

        Checks the From and Sender addresses that the providers will send (see
        :mod:`esprelay.message.sender`): every one of them must satisfy the sender
        rules.  A message without a From address is sent as its envelope sender, which
        MAIL has checked; with the null sender (``MAIL FROM:<>``) it needs a From the
        rules allow.  With ``ESPRELAY_FORCE_FROM`` the From must be the forced address
        alone (a second From field would otherwise slip past the rewrite).
        """
        rules = bool(user_rules) or bool(self.allowed_sender_domains)
        if not rules and force_from is None:
            return None
        senders = sent_as(raw)
        if force_from is not None:
            if any(a.lower() != force_from.lower() for a in senders.from_):
                return "more than one From address (only ESPRELAY_FORCE_FROM may be sent)"
        elif senders.from_:
            for address in senders.from_:
                why = self.sender_error(address, user_rules)
                if why:
                    return f"From address not allowed: {why}"
        elif rules and senders.has_from_field:
            return "From header not understood"
        elif rules and not mail_from:
            return "a From header is required with a null sender on this relay"
        if rules:
            for address in senders.sender:
                why = self.sender_error(address, user_rules)
                if why:
                    return f"Sender address not allowed: {why}"
        return None
