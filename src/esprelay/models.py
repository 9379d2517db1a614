"""Plain data that travels between the SMTP side, the spool and the providers."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from esprelay.errors import DeliveryError


class MessageState(enum.StrEnum):
    QUEUED = "queued"
    IN_FLIGHT = "in_flight"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Envelope:
    """The SMTP envelope: authoritative for who receives the message."""

    mail_from: str
    rcpt_tos: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Attempt:
    """One delivery attempt as the spool recorded it."""

    number: int
    at: float
    provider: str
    outcome: str
    error: str | None = None
    provider_message_id: str | None = None


@dataclass(frozen=True, slots=True)
class SpooledMessage:
    """A message as the spool keeps it.  ``raw`` is None when not loaded."""

    id: str
    envelope: Envelope
    size: int
    state: MessageState
    attempts: int
    created_at: float
    next_attempt_at: float
    provider: str
    raw: bytes | None = None
    last_error: str | None = None
    provider_message_id: str | None = None
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    updated_at: float = 0.0
    history: tuple[Attempt, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SendResult:
    """A provider accepted the message: for every recipient, or all but ``rejected``."""

    provider_message_id: str | None
    warnings: tuple[str, ...] = ()
    #: Recipients the provider refused while it accepted the message for the others
    #: (a per-recipient result, as SparkPost and Mailjet give), each with the error
    #: that decides its fate: a transient one is retried for that recipient alone,
    #: a permanent one is bounced.  Empty: every envelope recipient was accepted.
    rejected: tuple[tuple[str, DeliveryError], ...] = ()


class OutboundMessage:
    """What a provider is asked to send: the exact bytes plus the envelope.

    The JSON providers read it through :func:`esprelay.message.mime.parse`; the raw
    providers send ``raw`` (see :mod:`esprelay.message`).
    """

    __slots__ = ("envelope", "id", "raw")

    def __init__(self, id: str, envelope: Envelope, raw: bytes) -> None:
        self.id = id
        self.envelope = envelope
        self.raw = raw

    def __repr__(self) -> str:
        rcpts = len(self.envelope.rcpt_tos)
        return f"OutboundMessage(id={self.id!r}, size={len(self.raw)}, rcpts={rcpts})"
