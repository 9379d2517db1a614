"""The spool interface every backend implements, and helpers they share.

The spool owns the one retry mechanism: a message is ``queued`` with a
``next_attempt_at``; a worker *leases* due messages (``in_flight`` with an owner and
an expiry), then records the outcome: ``delivered``, back to ``queued`` with a later
``next_attempt_at``, or ``failed``; or, when the provider accepted the message for
some recipients only, back to ``queued`` for the others alone (``mark_partial``).  A
lease that expires (its worker died) makes the message due again, so nothing in
flight is lost with a process.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from esprelay.models import Envelope, MessageState, SpooledMessage
from esprelay.spill import Spilled

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class NewPart:
    """One spool entry to create: who receives it and how it is to be delivered."""

    envelope: Envelope
    provider: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SpoolStats:
    counts: dict[MessageState, int]
    oldest_queued_at: float | None

    @property
    def depth(self) -> int:
        """Messages not yet finished: queued plus in flight."""
        return self.counts.get(MessageState.QUEUED, 0) + self.counts.get(MessageState.IN_FLIGHT, 0)


class Spool(Protocol):
    """Durable queue of messages.  Every method is safe to call concurrently."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    @property
    def body_directory(self) -> Path | None:
        """The folder a :class:`~esprelay.spill.Spilled` message's file must be in for
        :meth:`put_parts` to keep that file as the message's body (no copy); None if
        this spool keeps bodies elsewhere (it then reads such a file back)."""
        ...

    async def put(
        self,
        envelope: Envelope,
        raw: bytes,
        *,
        provider: str,
        meta: dict[str, Any] | None = None,
    ) -> str:
        """Store a message; return its id only once it is committed to stable storage."""
        ...

    async def put_parts(
        self,
        raw: bytes | Spilled,
        parts: Sequence[NewPart],
        *,
        lease_owner: str | None = None,
        lease_time: float = 0.0,
    ) -> list[str]:
        """Store one message as several entries (a split by route) in one commit.

        With ``lease_owner`` the entries are created already leased to it, so the
        caller may deliver them at once (an inline attempt) without a second write.
        A :class:`~esprelay.spill.Spilled` message in :attr:`body_directory` is kept
        as its file (linked under each entry's name); any other is read back.  The
        caller still discards it afterwards.
        """
        ...

    async def lease(
        self, owner: str, limit: int, lease_time: float, *, max_bytes: int | None = None
    ) -> list[SpooledMessage]:
        """Claim up to ``limit`` due messages (with their bytes) for ``lease_time`` seconds.

        With ``max_bytes``, the messages claimed, in their order, stop before the one
        that would bring their total size over it; the first is claimed whatever its
        size (a message larger than ``max_bytes`` is delivered alone).  Only the bodies
        claimed are read.
        """
        ...

    async def mark_delivered(
        self, id: str, *, owner: str, provider: str, provider_message_id: str | None
    ) -> bool: ...

    async def mark_retry(
        self, id: str, *, owner: str, provider: str, error: str, next_attempt_at: float
    ) -> bool: ...

    async def mark_failed(self, id: str, *, owner: str, provider: str, error: str) -> bool: ...

    async def mark_partial(
        self,
        id: str,
        *,
        owner: str,
        provider: str,
        provider_message_id: str | None,
        note: str,
        rcpt_tos: Sequence[str],
        next_attempt_at: float | None,
    ) -> bool:
        """Record an attempt the provider accepted for some recipients only, in one write.

        The attempt goes into the history as ``partial`` with ``provider_message_id``
        and ``note`` (which recipients were accepted, bounced and retried; also the
        ``last_error``).  ``rcpt_tos`` are the recipients still to be tried: the
        message's envelope is narrowed to them and it is queued again for
        ``next_attempt_at``, so the accepted ones are never sent to again.  Without
        any (the rest were bounced), the message is delivered and keeps its envelope.

        False, and nothing written, if ``owner`` no longer holds the lease: the
        message is then tried again whole, as after a crash (at least once).
        """
        ...

    async def get(self, id: str, *, with_body: bool = False) -> SpooledMessage | None: ...

    async def list(
        self, *, state: MessageState | None = None, limit: int = 100
    ) -> list[SpooledMessage]: ...

    async def retry_now(self, id: str) -> bool:
        """Make a queued or failed message due now; False if there is no such message."""
        ...

    async def delete(self, id: str) -> bool: ...

    async def hold(self, ids: Sequence[str] | None) -> tuple[str, ...]:
        """Hold queued and in-flight messages (every one with ``ids`` None): a held
        message is never leased (one in flight finishes its attempt, and a deferral
        leaves it held).  Returns the ids now held (``esprelay queue hold``)."""
        ...

    async def release(self, ids: Sequence[str] | None) -> tuple[str, ...]:
        """Release held messages (every one with ``ids`` None) and make them due now;
        return their ids (``esprelay queue release``)."""
        ...

    async def flush(self) -> int:
        """Make every queued message that is not held due now; return how many
        (``esprelay queue flush``)."""
        ...

    async def held_ids(self) -> set[str]:
        """The ids of the held messages."""
        ...

    async def stats(self) -> SpoolStats: ...

    async def next_due(self) -> float | None:
        """When the earliest queued message becomes due (or a lease expires)."""
        ...

    async def purge(self, *, delivered_before: float, failed_before: float) -> int:
        """Forget delivered and failed messages older than the given times."""
        ...

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the event loop) when new due work may have been
        committed by *another* process sharing this spool, so idle workers wake
        without polling.  A spool only one process writes may ignore it: that
        process's own SMTP intake wakes its workers directly.
        """
        ...


# The random part of message ids.  Ids need to be unique, not secret (the admin API
# has its own token), so a generator seeded from the OS (again in a forked child)
# serves: os.urandom per id was a system call per message.
_id_bits = random.Random()
os.register_at_fork(after_in_child=_id_bits.seed)


def new_message_id(now: float | None = None) -> str:
    """A unique, time-ordered id: 11 hex digits of milliseconds, 10 random."""
    millis = int((time.time() if now is None else now) * 1000)
    return f"{millis:011x}{_id_bits.getrandbits(40):010x}"


def within_bytes(rows: Sequence[T], max_bytes: int, *, size: Callable[[T], int]) -> list[T]:
    """The first of ``rows`` whose sizes add up to at most ``max_bytes``; the first row
    whatever its size (``Spool.lease``'s rule)."""
    kept: list[T] = []
    total = 0
    for row in rows:
        total += size(row)
        if kept and total > max_bytes:
            break
        kept.append(row)
    return kept


class OnePartPut:
    """``Spool.put`` as a one-part ``put_parts``, shared by the backends."""

    async def put_parts(
        self,
        raw: bytes | Spilled,
        parts: Sequence[NewPart],
        *,
        lease_owner: str | None = None,
        lease_time: float = 0.0,
    ) -> list[str]:
        raise NotImplementedError

    async def put(
        self,
        envelope: Envelope,
        raw: bytes,
        *,
        provider: str,
        meta: dict[str, Any] | None = None,
    ) -> str:
        [message_id] = await self.put_parts(raw, [NewPart(envelope, provider, meta or {})])
        return message_id
