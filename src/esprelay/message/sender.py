"""Whom a message is sent as, read the way the providers will send it.

The SMTP sender rules (:mod:`esprelay.smtp.policy`) check these addresses on the
message as it leaves the intake (after every repair), so the From that a rule approved
is the From a provider puts in its request: the JSON providers send the first From
address of :func:`esprelay.message.mime.parse` (or the envelope sender when there is
none), the raw providers send the From fields as they are, and both are read here by
the same reader and address parser.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.utils import getaddresses

from esprelay.message.header import unfolded
from esprelay.message.mime import Index, header_index, mailboxes


@dataclass(frozen=True, slots=True)
class SentAs:
    #: Every From address (with an "@"); the JSON providers send the first one.
    from_: tuple[str, ...]
    #: Every Sender address (with an "@").
    sender: tuple[str, ...]
    #: The message has a From field, whether or not an address could be read from it.
    has_from_field: bool


def sent_as(raw: bytes) -> SentAs:
    """The From and Sender addresses of ``raw`` (a CRLF message)."""
    index = header_index(raw)
    return SentAs(
        from_=_addresses(index, "from"),
        sender=_addresses(index, "sender"),
        has_from_field="from" in index,
    )


def _addresses(index: Index, name: str) -> tuple[str, ...]:
    """The addresses of the ``name`` fields as the JSON providers read them (in order),
    then any other that a lenient reader (``email.utils.getaddresses``, as an ESP given
    the raw message might be) finds in the same values: a value that the two read
    differently has every reading checked."""
    found = [box.addr for box in mailboxes(index, name) if "@" in box.addr]
    values = [unfolded(value) for value in index.get(name, ())]
    for _, address in getaddresses(values):
        if "@" in address and address not in found:
            found.append(address)
    return tuple(found)
