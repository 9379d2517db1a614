"""Where the spool, delivery and the circuit breakers get the time from.

Everything that reads the time or waits for some to pass takes a :class:`Clock`
(:data:`SYSTEM_CLOCK` by default): wall time for what is stored (a message's due
time, a lease's expiry), monotonic time for what is measured (an attempt's duration,
a breaker's cool-down), and the waits themselves (``sleep``, and ``timeout`` around
a wait for something else).  Tests give them a fake one (``tests/fakeclock.py``)
and move time on by hand, so a lease expires or a retry comes due at once, and
nothing depends on how busy the machine is.

A caller on a hot path stores the bound method once (``self._time = clock.time``):
for the system clock that is :func:`time.time` itself, no wrapper in between.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from time import monotonic as _monotonic
from time import time as _time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds since the epoch, as stored in the spool."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back, for durations."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return once ``seconds`` have passed on this clock."""
        ...

    def timeout(self, seconds: float | None) -> AbstractAsyncContextManager[object]:
        """Like :func:`asyncio.timeout`: cancel the block after ``seconds`` on this
        clock and raise :class:`TimeoutError` instead (``None``: no limit)."""
        ...


class SystemClock:
    """The real clocks and the event loop's own timers."""

    time = staticmethod(_time)
    monotonic = staticmethod(_monotonic)
    sleep = staticmethod(asyncio.sleep)

    @staticmethod
    def timeout(seconds: float | None) -> AbstractAsyncContextManager[object]:
        return asyncio.timeout(seconds)


#: The clock everything uses unless given another.
SYSTEM_CLOCK: Clock = SystemClock()
