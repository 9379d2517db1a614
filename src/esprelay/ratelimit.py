"""Staying under an ESP's quota, instead of collecting its 429s.

Two limits per provider, both optional and both kept by :mod:`esprelay.dispatch`
around each message a provider sends:

- :class:`RateLimit`, a token bucket: ``rate`` messages a second on average, bursts of
  up to ``burst``.  ``await limit.acquire()`` returns at once while tokens are left,
  else waits (on the given clock) until one is due; waiters are served in turn (each
  reserves the next free slot).  A 429 or a rate-limit header that says the ESP's
  window is spent moves the bucket's next token to when the ESP says
  (:meth:`RateLimit.hold_until`), so every message of that provider waits, not only
  the one that got the 429.
- :class:`ConcurrencyLimit`: at most ``limit`` messages in the provider's hands at once.

A wait never holds a delivery worker past its lease: given a ``deadline`` (on the
clock's monotonic time), a wait that would end after it raises :class:`Throttled`
at once, and the message is deferred (or tried on the route's next provider) instead.
Each limit counts what it did (waits, seconds waited, deferrals) for the metrics.

The dispatcher takes a message's first token itself, with the deadline
(:func:`prepaid`); an HTTP provider takes one before each of its requests
(``HttpProvider._exchange``) and spends that prepaid token on the first, so a message
of one request costs one token, one of several (Graph's uploads) a token each, and a
provider called directly (tests, ``doctor --send-test``) still keeps its rate.

Settings: every provider kind takes ``ESPRELAY_<KIND>_RATE`` (messages a second, or
``N/s``, ``N/min``, ``N/h``) and ``ESPRELAY_<KIND>_CONCURRENCY``; a named provider of
the routes file takes ``rate`` and ``concurrency`` (:func:`apply_limits`).
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BeforeValidator, Field

from esprelay.clock import SYSTEM_CLOCK, Clock

if TYPE_CHECKING:
    from esprelay.providers.base import Provider, ProviderSettings

__all__ = [
    "ConcurrencyLimit",
    "Rate",
    "RateLimit",
    "Throttled",
    "apply_limits",
    "parse_rate",
    "prepaid",
    "spend_prepaid",
]

_PER_SECONDS = {
    "": 1.0,
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
}
_RATE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:/\s*([a-z]*)\s*)?$", re.IGNORECASE)


def parse_rate(value: Any) -> Any:
    """Messages a second from ``2``, ``"0.5"``, ``"10/s"``, ``"600/min"`` or ``"3600/h"``;
    anything else is left for pydantic to refuse."""
    if not isinstance(value, str):
        return value
    match = _RATE.match(value)
    if match is None:
        raise ValueError(f"expected messages per second or N/s, N/min, N/h, not {value!r}")
    count, unit = match.groups()
    per = _PER_SECONDS.get((unit or "").lower())
    if per is None:
        raise ValueError(f"unknown unit {unit!r} in {value!r} (s, min or h)")
    return float(count) / per


#: A rate setting: messages a second, also written ``N/s``, ``N/min`` or ``N/h``.
Rate = Annotated[float, BeforeValidator(parse_rate), Field(gt=0, allow_inf_nan=False)]


class Throttled(Exception):
    """Waiting for a limit would end after the deadline: defer the message instead."""

    def __init__(self, limit: str, wait: float | None) -> None:
        #: "rate" or "concurrency".
        self.limit = limit
        #: Seconds until the rate would let the message through (None: unknown).
        self.wait = wait
        due = f"in {wait:.1f}s" if wait is not None else "not before the deadline"
        super().__init__(f"{limit} limit: the next slot is {due}, past the lease")


class RateLimit:
    def __init__(self, rate: float, burst: int = 1, *, clock: Clock = SYSTEM_CLOCK) -> None:
        if not rate > 0 or not math.isfinite(rate) or burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._interval = 1.0 / rate
        # The bucket as a schedule (GCRA): ``_next`` is when the bucket would be empty
        # again; a request may start once now >= _next - _tolerance.
        self._tolerance = (burst - 1) * self._interval
        self._next = clock.monotonic()
        self._held_until = 0.0
        #: Requests that had to wait for a token, the seconds they waited, and those
        #: refused because the wait would have passed their deadline.
        self.waits = 0
        self.waited_seconds = 0.0
        self.deferred = 0

    async def acquire(self, *, deadline: float | None = None) -> None:
        """Wait until a request may be sent, then count it.

        With a ``deadline`` (the clock's monotonic time), raise :class:`Throttled`
        without taking a token when the wait would end after it.
        """
        clock = self._clock
        now = clock.monotonic()
        start = max(now, self._held_until, self._next - self._tolerance)
        if deadline is not None and start > deadline:
            self.deferred += 1
            raise Throttled("rate", start - now)
        # Reserve the slot now: later callers queue behind it (served in turn).
        self._next = max(self._next, start) + self._interval
        if start <= now:
            return
        self.waits += 1
        began = now
        try:
            while True:
                now = clock.monotonic()
                due = max(start, self._held_until)  # a hold that came while we waited
                if now >= due:
                    return
                if deadline is not None and due > deadline:
                    self.deferred += 1
                    raise Throttled("rate", due - now)
                await clock.sleep(due - now)
        finally:
            self.waited_seconds += clock.monotonic() - began

    def hold_until(self, seconds_from_now: float) -> None:
        """The ESP says its window is spent: send nothing for ``seconds_from_now``,
        then start again from an empty bucket."""
        until = self._clock.monotonic() + max(0.0, seconds_from_now)
        self._held_until = max(self._held_until, until)
        self._next = max(self._next, self._held_until + self._tolerance)

    def try_acquire(self) -> bool:
        """Count a request if a token is left now, else refuse it (False) without waiting:
        for a server that answers 429 rather than queue a flood (esprelay.events)."""
        now = self._clock.monotonic()
        if max(self._held_until, self._next - self._tolerance) > now:
            return False
        self._next = max(self._next, now) + self._interval
        return True


class ConcurrencyLimit:
    """At most ``limit`` holders of :meth:`slot` at once."""

    def __init__(self, limit: int, *, clock: Clock = SYSTEM_CLOCK) -> None:
        if limit < 1:
            raise ValueError("a concurrency limit needs limit >= 1")
        self.limit = limit
        self._clock = clock
        self._slots = asyncio.Semaphore(limit)
        #: Holders now; waits for a slot, their seconds, and refusals at the deadline.
        self.in_flight = 0
        self.waits = 0
        self.waited_seconds = 0.0
        self.deferred = 0

    @asynccontextmanager
    async def slot(self, *, deadline: float | None = None) -> AsyncIterator[None]:
        """Hold one of the slots; raise :class:`Throttled` if none frees up by ``deadline``."""
        if self._slots.locked():
            clock = self._clock
            began = clock.monotonic()
            self.waits += 1
            try:
                if deadline is None:
                    await self._slots.acquire()
                else:
                    async with clock.timeout(max(0.0, deadline - began)):
                        await self._slots.acquire()
            except TimeoutError:
                self.deferred += 1
                raise Throttled("concurrency", None) from None
            finally:
                self.waited_seconds += clock.monotonic() - began
        else:
            await self._slots.acquire()
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._slots.release()


#: The token the dispatcher took for the message being sent in this task, if unspent.
_prepaid: ContextVar[list[RateLimit] | None] = ContextVar("esprelay_prepaid", default=None)


@contextmanager
def prepaid(limit: RateLimit) -> Iterator[None]:
    """Within the block, the first :func:`spend_prepaid` of ``limit`` finds its token
    taken (by the caller, who has just acquired it)."""
    reset = _prepaid.set([limit])
    try:
        yield
    finally:
        _prepaid.reset(reset)


def spend_prepaid(limit: RateLimit) -> bool:
    """True (once) if a token of ``limit`` was taken for this request already."""
    tokens = _prepaid.get()
    if tokens and tokens[0] is limit:
        tokens.clear()
        return True
    return False


def apply_limits(provider: Provider, settings: ProviderSettings) -> None:
    """Give ``provider`` the limits its settings ask for (``rate``, ``concurrency``).

    A configured rate replaces the kind's built-in bucket (the ESP's documented
    default, as Brevo's); one second's worth of messages may go in a burst.
    """
    rate = getattr(settings, "rate", None)
    if rate is not None:
        provider.rate_limit = RateLimit(rate, burst=max(1, math.ceil(rate)))
    concurrency = getattr(settings, "concurrency", None)
    if concurrency is not None:
        provider.concurrency = ConcurrencyLimit(concurrency)
