"""A clock for tests that stands still until the test moves it (see esprelay.clock)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol


class FakeClock:
    """A clock that stands still until :meth:`advance` moves it, for tests.

    Sleepers and timeouts are woken by ``advance`` in the order of their deadlines,
    each once its deadline is reached; a woken coroutine runs at the event loop's
    next turn.  :meth:`waiting` lets a test wait until the code under test has got
    as far as waiting on the clock.  ``time`` and ``monotonic`` may be read from any
    thread (the SQLite spool's writer reads the time); the rest belongs to one event
    loop.
    """

    def __init__(self, start: float = 1_700_000_000.0, *, monotonic: float = 1_000.0) -> None:
        self._wall = start
        self._mono = monotonic
        self._order = itertools.count()
        # (deadline on the monotonic clock, order of arrival, the sleep or timeout)
        self._timers: list[tuple[float, int, _Timer]] = []
        # The sleeps and timeouts still waiting, with their deadlines.
        self._waiting: dict[_Timer, float] = {}
        self._changed: asyncio.Event | None = None

    def time(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    @property
    def sleepers(self) -> int:
        """Sleeps and timeouts waiting on this clock."""
        return len(self._waiting)

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        sleep = _Sleep()
        self._add(seconds, sleep)
        try:
            await sleep.future
        finally:
            self._waiting.pop(sleep, None)

    def timeout(self, seconds: float | None) -> AbstractAsyncContextManager[object]:
        if seconds is not None and seconds <= 0:
            return asyncio.timeout(0)
        return _Timeout(self, seconds)

    def advance(self, seconds: float) -> None:
        """Move both clocks on by ``seconds``; wake every sleeper and expire every
        timeout whose deadline that reaches, earliest first."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._wall += seconds
        self._mono += seconds
        while self._timers and self._timers[0][0] <= self._mono:
            _, _, timer = heapq.heappop(self._timers)
            if self._waiting.pop(timer, None) is not None:
                timer.fire()

    async def waiting(self, count: int = 1, *, seconds: float | None = None) -> None:
        """Return once at least ``count`` sleeps or timeouts wait on this clock; with
        ``seconds``, only those that end that long from now count."""
        while self._count(seconds) < count:
            if self._changed is None:
                self._changed = asyncio.Event()
            self._changed.clear()
            await self._changed.wait()

    def _count(self, seconds: float | None) -> int:
        if seconds is None:
            return len(self._waiting)
        return sum(1 for end in self._waiting.values() if abs(end - self._mono - seconds) < 1e-6)

    def _add(self, seconds: float, timer: _Timer) -> None:
        deadline = self._mono + seconds
        heapq.heappush(self._timers, (deadline, next(self._order), timer))
        self._waiting[timer] = deadline
        if self._changed is not None:
            self._changed.set()


class _Timer(Protocol):
    def fire(self) -> None: ...


class _Sleep:
    def __init__(self) -> None:
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def fire(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


class _Timeout:
    """asyncio's own Timeout, without a deadline of its own: the fake clock makes it
    expire (``reschedule`` to the loop's now) once it reaches the deadline."""

    def __init__(self, clock: FakeClock, seconds: float | None) -> None:
        self._clock = clock
        self._seconds = seconds
        self._inner = asyncio.timeout(None)

    async def __aenter__(self) -> _Timeout:
        await self._inner.__aenter__()
        if self._seconds is not None:
            self._clock._add(self._seconds, self)
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self._clock._waiting.pop(self, None)
        await self._inner.__aexit__(*exc_info)

    def fire(self) -> None:
        self._inner.reschedule(asyncio.get_running_loop().time())
