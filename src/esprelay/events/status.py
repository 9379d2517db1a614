"""What the ESP events say of a message: per-recipient status and a timeline.

The processor (:mod:`esprelay.events.processor`) applies each event of the inbox to
the message it names, through :class:`MessageStatusStore` (both spool backends): the
event joins the message's timeline (once: the key is the ESP's event id), and the
recipient's status becomes the event's kind when the event is at least as recent as
the status it replaces.  Only the kinds of :data:`STATUS_KINDS` change a status; the
others (opened, clicked, ...) are kept in the timeline only.

A recipient without a status row is ``accepted`` when the message is delivered (the
ESP's API took it): that is derived from the message, not written per recipient on the
delivery path (:func:`recipients_view`).

Like :mod:`esprelay.events.model`, this imports nothing of esprelay's outside the
events' types, so the spools can use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from esprelay.events.model import Event

__all__ = [
    "DSN_KINDS",
    "STATUS_KINDS",
    "Application",
    "Applied",
    "MessageStatus",
    "MessageStatusStore",
    "RecipientStatus",
    "StatusEntry",
]

#: The event kinds that change a recipient's status.
STATUS_KINDS = frozenset({"delivered", "deferred", "bounced", "dropped", "complained"})
#: The kinds of delivery status notification sent from events.
DSN_KINDS = ("failure", "success", "delay")


@dataclass(frozen=True, slots=True)
class StatusEntry:
    """One event of a message as kept with it: in its timeline, or a recipient's status."""

    recipient: str
    kind: str
    at: float
    smtp_status: str | None
    diagnostic: str | None
    remote_mta: str | None
    provider: str
    event_id: str


@dataclass(frozen=True, slots=True)
class RecipientStatus:
    """A recipient's latest status, and the DSN kinds already sent for it."""

    status: StatusEntry
    dsn_sent: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MessageStatus:
    """Everything the events said of one message."""

    recipients: tuple[RecipientStatus, ...] = ()
    timeline: tuple[StatusEntry, ...] = ()


class Applied(NamedTuple):
    """What applying one event did: ``new`` False when the timeline had it already (an
    event applied again after a crash); ``changed`` when the recipient's status changed;
    ``dsn`` True when the DSN asked for was claimed (none of its kind claimed before for
    this recipient, or given back since)."""

    new: bool
    changed: bool
    dsn: bool


class Application(NamedTuple):
    """One event to apply (:meth:`MessageStatusStore.apply_events`): the message and
    recipient it is about, and the DSN kind to claim for that recipient, if any."""

    message_id: str
    recipient: str
    event: Event
    dsn: str | None = None


@runtime_checkable
class MessageStatusStore(Protocol):
    """The status of spooled messages as the ESP events tell it (both spool backends)."""

    async def apply_event(
        self, message_id: str, recipient: str, event: Event, *, dsn: str | None = None
    ) -> Applied | None:
        """Add ``event`` to the message's timeline and the recipient's status, in one
        transaction; with ``dsn`` (a :data:`DSN_KINDS` word) also claim that DSN for the
        recipient, unless one of that kind was claimed before.  None when the message
        is not in the spool."""
        ...

    async def apply_events(self, batch: Sequence[Application]) -> list[Applied | None]:
        """:meth:`apply_event` for each of ``batch``, in order, in one transaction: the
        same results, and the same statuses, timelines and claims, as one call after
        the other (an event twice in a batch is new once; a later event of a recipient
        sees the status and the claims of the earlier ones)."""
        ...

    async def release_dsn(self, message_id: str, recipient: str, kind: str) -> None:
        """Give back a claimed DSN that could not be queued."""
        ...

    async def message_status(self, message_id: str) -> MessageStatus: ...

    async def get_messages(self, ids: Sequence[str], *, with_body: bool = False) -> Any:
        """The spooled messages of ``ids`` still in the spool, by id (a dict), read at
        once: without their attempts' history, with their bodies if asked."""
        ...

    async def find_by_provider_message_id(self, provider: str, provider_message_id: str) -> Any:
        """The spooled message (without its body) that ``provider`` accepted as this id,
        or None."""
        ...

    async def search_messages(
        self,
        *,
        header_message_id: str | None = None,
        recipient: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
    ) -> Sequence[Any]:
        """Messages (without bodies) by Message-ID header, recipient and creation time."""
        ...


def entry_row(recipient: str, event: Event) -> tuple[Any, ...]:
    """(provider, event_id, recipient, kind, at, smtp_status, diagnostic, remote_mta)."""
    return (
        event.provider,
        event.provider_event_id,
        recipient,
        event.kind,
        event.at,
        event.smtp_status,
        event.diagnostic,
        event.remote_mta,
    )


#: The columns :func:`entry` reads, in the order it reads them.
ENTRY_COLUMNS = "recipient, kind, at, smtp_status, diagnostic, remote_mta, provider, event_id"


def entry(row: Sequence[Any]) -> StatusEntry:
    return StatusEntry(
        recipient=row[0],
        kind=row[1],
        at=float(row[2]),
        smtp_status=row[3],
        diagnostic=row[4],
        remote_mta=row[5],
        provider=row[6],
        event_id=row[7],
    )


def dsn_words(value: str | None) -> tuple[str, ...]:
    return tuple(word for word in (value or "").split(",") if word)


@dataclass(slots=True)
class _Recipient:
    at: float
    dsn: tuple[str, ...]


@dataclass(slots=True)
class BatchPlan:
    """What a batch of events writes, worked out from the rows it finds
    (:func:`plan_batch`): each event's :class:`Applied` (None: no such message), the
    new timeline rows, each recipient's new status row (the last event that changed
    it), and the DSN kinds claimed per recipient, in order."""

    results: list[Applied | None] = field(default_factory=list)
    timeline: list[tuple[Any, ...]] = field(default_factory=list)
    statuses: dict[tuple[str, str], tuple[Any, ...]] = field(default_factory=dict)
    claims: dict[tuple[str, str], list[str]] = field(default_factory=dict)


def plan_batch(
    batch: Iterable[Application],
    *,
    messages: Iterable[str],
    timeline: Iterable[tuple[str, str, str]],
    recipients: Mapping[tuple[str, str], tuple[float, Sequence[str]]],
) -> BatchPlan:
    """Apply ``batch`` one event after the other to what the spool holds, in memory.

    ``messages``: the ids of the batch's messages in the spool; ``timeline``: the
    ``(message_id, provider, event_id)`` of the batch's events its timelines hold;
    ``recipients``: ``(message_id, recipient) -> (at, dsn kinds)`` of the batch's
    recipients that have a status.  The rules are those of the single-event
    statements: a timeline holds an event once; a status event replaces a status no
    more recent than itself; a DSN kind is claimed once per recipient, and only for
    a recipient with a status.
    """
    present = set(messages)
    seen = set(timeline)
    state = {key: _Recipient(at, tuple(dsn)) for key, (at, dsn) in recipients.items()}
    plan = BatchPlan()
    for message_id, recipient, event, dsn in batch:
        if message_id not in present:
            plan.results.append(None)
            continue
        row = (message_id, *entry_row(recipient, event))
        key = (message_id, recipient)
        new = (message_id, event.provider, event.provider_event_id) not in seen
        changed = False
        if new:
            seen.add((message_id, event.provider, event.provider_event_id))
            plan.timeline.append(row)
            current = state.get(key)
            if event.kind in STATUS_KINDS and (current is None or event.at >= current.at):
                changed = True
                plan.statuses[key] = row
                if current is None:
                    state[key] = _Recipient(event.at, ())
                else:
                    current.at = event.at
        claimed = False
        current = state.get(key)
        if dsn is not None and current is not None and dsn not in current.dsn:
            claimed = True
            current.dsn = (*current.dsn, dsn)
            plan.claims.setdefault(key, []).append(dsn)
        plan.results.append(Applied(new, changed, claimed))
    return plan
