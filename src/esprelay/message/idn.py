"""Envelope addresses for ESPs that need ASCII: internationalised domains as Punycode.

A provider whose ``smtputf8`` is False (its ESP takes 7-bit ASCII addresses only) gets
the envelope with every domain converted to A-labels by IDNA 2008 with the UTS 46
mapping (the ``idna`` package: Python's ``encodings.idna`` is IDNA 2003, which maps
``straße.de`` to another domain, ``strasse.de``).  A UTF-8 local part has no ASCII form:
such an address is never rewritten, the message is refused for that provider
(:class:`~esprelay.errors.MessageRejected`, permanent: it bounces naming every
recipient) instead of being garbled, lost or failing the adapter.  The SMTP side
refuses such an address at MAIL/RCPT already (``553 5.6.7``); this covers messages
spooled otherwise (the HTTP API, older versions).
"""

from __future__ import annotations

import idna

from esprelay.errors import MessageRejected
from esprelay.models import Envelope, OutboundMessage


def ascii_address(address: str) -> str | None:
    """``address`` with its domain in A-labels, or None if it has no ASCII form."""
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii() or domain.startswith("["):
        return None
    try:
        return f"{local}@{idna.encode(domain, uts46=True, transitional=False).decode('ascii')}"
    except (idna.IDNAError, UnicodeError):
        return None


def ascii_message(message: OutboundMessage, provider: str) -> OutboundMessage:
    """``message`` with an ASCII envelope, or MessageRejected naming what cannot be."""
    envelope = message.envelope
    if envelope.mail_from.isascii() and all(r.isascii() for r in envelope.rcpt_tos):
        return message
    converted: list[str] = []
    for address in (envelope.mail_from, *envelope.rcpt_tos):
        ascii_form = ascii_address(address)
        if ascii_form is None:
            raise MessageRejected(
                f"cannot carry the non-ASCII address <{address}>: this ESP takes ASCII"
                " addresses only, and it has none (a UTF-8 local part, or a domain that"
                " IDNA 2008 refuses)",
                provider=provider,
            )
        converted.append(ascii_form)
    return OutboundMessage(message.id, Envelope(converted[0], tuple(converted[1:])), message.raw)
