"""Staying under an ESP's request rate, instead of collecting its 429s.

A :class:`RateLimit` is a token bucket: ``rate`` requests a second on average, bursts
of up to ``burst``.  ``await limit.acquire()`` returns at once while tokens are left,
else waits (on the given clock) until one is due; waiters are served in turn.  A 429
or a rate-limit header that says the ESP's window is spent moves the bucket's next
token to when the ESP says (:meth:`RateLimit.hold_until`), so every request of that
provider waits, not only the one that got the 429.

An HTTP provider that has one (``HttpProvider.rate_limit``) takes a token before each
request.
"""

from __future__ import annotations

import asyncio

from esprelay.clock import SYSTEM_CLOCK, Clock


class RateLimit:
    def __init__(self, rate: float, burst: int = 1, *, clock: Clock = SYSTEM_CLOCK) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock.monotonic()
        self._held_until = 0.0
        self._lock = asyncio.Lock()

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    async def acquire(self) -> None:
        """Wait until a request may be sent, then count it."""
        async with self._lock:  # one waiter at a time: served in turn
            while True:
                now = self._clock.monotonic()
                if now < self._held_until:
                    await self._clock.sleep(self._held_until - now)
                    continue
                self._refill(now)
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await self._clock.sleep((1 - self._tokens) / self.rate)

    def hold_until(self, seconds_from_now: float) -> None:
        """The ESP says its window is spent: send nothing for ``seconds_from_now``."""
        until = self._clock.monotonic() + max(0.0, seconds_from_now)
        self._held_until = max(self._held_until, until)
        self._tokens = 0.0

    def try_acquire(self) -> bool:
        """Count a request if a token is left now, else refuse it (False) without waiting:
        for a server that answers 429 rather than queue a flood (esprelay.events)."""
        now = self._clock.monotonic()
        if now < self._held_until:
            return False
        self._refill(now)
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False
