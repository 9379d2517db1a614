"""ESP event webhooks: verified, normalised events kept in a durable inbox.

:mod:`esprelay.events.model` holds the types (and imports nothing of esprelay's, so
the spools can store events); one module per ESP verifies and normalises its
requests (:mod:`~esprelay.events.sendgrid`, :mod:`~esprelay.events.mailgun`,
:mod:`~esprelay.events.ses`, :mod:`~esprelay.events.postmark`);
:mod:`esprelay.events.listener` is the HTTP listener that stores them before it
answers, and :mod:`esprelay.events.service` builds it from the settings.
"""

from esprelay.events.model import (
    KINDS,
    Event,
    EventInbox,
    EventKind,
    EventSource,
    InboxResult,
    Rejected,
    StoredEvent,
    WebhookRequest,
)

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
