"""What every ESP's event webhook comes down to: verified, normalised :class:`Event` s.

A *source* (one per configured provider with events, :class:`EventSource`) takes the
raw request (:class:`WebhookRequest`: method, headers, body bytes, peer address), checks
that the ESP sent it, and either raises :class:`Rejected` (answered 400/401/403, logged,
counted, nothing stored) or returns the request's events, each normalised to
:class:`Event`.  A request may carry none (an SNS subscription confirmation) or many (a
SendGrid batch).

This module imports nothing of esprelay's own, so the spool backends can store events
without importing the webhook machinery.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

__all__ = [
    "KINDS",
    "Event",
    "EventInbox",
    "EventKind",
    "EventSource",
    "InboxResult",
    "Rejected",
    "StoredEvent",
    "WebhookRequest",
]

#: The normalised kinds.  The first five change what esprelay knows of a recipient's
#: mail; the others are kept for the record.
EventKind = Literal[
    "delivered",  # the recipient's server accepted it
    "deferred",  # a temporary failure; the ESP tries again (or gave up softly, see sources)
    "bounced",  # the recipient's server refused it, or the ESP gave up
    "dropped",  # the ESP did not try (suppression list, rejected, invalid)
    "complained",  # the recipient marked it as spam
    "processed",  # the ESP accepted it for delivery (nothing new for a sender)
    "unsubscribed",
    "opened",
    "clicked",
    "other",
]
KINDS: tuple[EventKind, ...] = (
    "delivered",
    "deferred",
    "bounced",
    "dropped",
    "complained",
    "processed",
    "unsubscribed",
    "opened",
    "clicked",
    "other",
)


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened to one recipient of one message, as an ESP reported it.

    ``provider`` is the configured provider's name (``sendgrid``, or a named provider of
    the routes file), ``provider_event_id`` the ESP's id of the event (the key that makes
    a webhook retried by the ESP change nothing), ``at`` seconds since the epoch.
    ``smtp_status`` is an RFC 3463 enhanced status code (``5.1.1``) when the ESP gives
    one or its reply code says which class (``5.0.0``); ``diagnostic`` the remote server's
    text or the ESP's reason.  ``esp_message_id`` is the ESP's id of the message as its
    send API answered it; ``esprelay_id`` the spool id esprelay sent along, when the
    ESP echoes it.  ``raw`` is the ESP's own JSON for this event.
    """

    provider: str
    provider_event_id: str
    kind: EventKind
    recipient: str | None
    at: float
    smtp_status: str | None = None
    diagnostic: str | None = None
    esp_message_id: str | None = None
    esprelay_id: str | None = None
    remote_mta: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as the inbox keeps it: its place in the inbox (``seq``, increasing), when
    it arrived, and the spool message it belongs to when esprelay's id was echoed and
    names a message still in the spool."""

    seq: int
    event: Event
    received_at: float
    message_id: str | None
    processed_at: float | None = None


class InboxResult(NamedTuple):
    """What storing one event did: ``stored`` False for an event the inbox had already
    (an ESP's retry); ``message_id`` the spool message it names (esprelay's echoed id,
    when that message is in the spool), else None."""

    stored: bool
    message_id: str | None


@runtime_checkable
class EventInbox(Protocol):
    """The durable inbox of verified events, kept in the spool's database.

    Implemented by the SQLite and PostgreSQL spools.  An event is stored once per
    ``(provider, provider_event_id)``; :meth:`put_events` returns only once its events
    are committed to stable storage, so a webhook is acknowledged only after that.
    """

    async def put_events(self, events: Sequence[Event]) -> list[InboxResult]: ...

    async def pending_events(self, limit: int = 100) -> list[StoredEvent]:
        """Events not yet processed, oldest (lowest ``seq``) first."""
        ...

    async def finish_events(self, seqs: Sequence[int]) -> int:
        """Mark events processed; return how many were pending."""
        ...

    async def purge_events(self, *, processed_before: float) -> int:
        """Forget processed events older than ``processed_before``."""
        ...


@dataclass(frozen=True, slots=True)
class WebhookRequest:
    """An HTTP request as it arrived: nothing parsed, nothing trusted."""

    method: str
    headers: Mapping[str, str]  # case-insensitive (aiohttp's CIMultiDictProxy)
    body: bytes
    peer: str | None
    query: Mapping[str, str] = field(default_factory=dict)


class Rejected(Exception):
    """A request that is not a genuine event of this ESP: refused and not stored.

    ``status`` is the HTTP answer (400 malformed, 401 no or bad credentials, 403 a
    signature, timestamp, token or topic refused); ``reason`` a short fixed word for
    the metrics label and the log (``signature``, ``stale``, ``replayed``, ...);
    ``detail`` more words for the log, never a secret.
    """

    def __init__(
        self,
        status: int,
        reason: str,
        detail: str = "",
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.headers = dict(headers or {})


def malformed(detail: str) -> Rejected:
    return Rejected(400, "malformed", detail)


class EventSource(Protocol):
    """The events of one configured provider: verify a request, normalise its events."""

    #: The configured provider's name: the ``<name>`` of ``/webhooks/<name>``.
    provider: str
    #: The kind of ESP (``sendgrid``, ``mailgun``, ``ses``, ``postmark``).
    kind: str

    async def receive(self, request: WebhookRequest) -> list[Event]:
        """The request's events; :class:`Rejected` when it is not genuine or not readable."""
        ...

    async def aclose(self) -> None: ...
