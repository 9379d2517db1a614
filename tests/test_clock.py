"""The system clock is the real one, unwrapped; the fake one moves only when told."""

from __future__ import annotations

import asyncio
import time

import pytest

from esprelay.clock import SYSTEM_CLOCK
from tests.fakeclock import FakeClock


def test_system_clock_is_the_real_one_without_a_wrapper() -> None:
    assert SYSTEM_CLOCK.time is time.time
    assert SYSTEM_CLOCK.monotonic is time.monotonic


async def test_system_clock_waits_with_the_event_loop() -> None:
    assert SYSTEM_CLOCK.sleep is asyncio.sleep
    with pytest.raises(TimeoutError):
        async with SYSTEM_CLOCK.timeout(0):
            await asyncio.Event().wait()


async def test_sleepers_wake_in_deadline_order_once_time_reaches_them() -> None:
    clock = FakeClock(start=5000.0, monotonic=10.0)
    woken: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woken.append(name)

    tasks = [
        asyncio.create_task(sleeper(name, seconds))
        for name, seconds in (("late", 30), ("early", 10), ("middle", 20))
    ]
    await clock.waiting(3)
    clock.advance(9.5)
    assert clock.sleepers == 3
    clock.advance(15)
    assert clock.sleepers == 1  # early and middle are woken, late still sleeps
    assert clock.time() == 5024.5 and clock.monotonic() == 34.5
    clock.advance(100)
    await asyncio.gather(*tasks)
    assert woken == ["early", "middle", "late"] and clock.sleepers == 0


async def test_a_cancelled_sleeper_no_longer_waits() -> None:
    clock = FakeClock()
    task = asyncio.create_task(clock.sleep(10))
    await clock.waiting()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert clock.sleepers == 0
    clock.advance(20)  # nothing left to wake


async def test_timeout_expires_only_when_the_clock_reaches_it() -> None:
    clock = FakeClock()
    event = asyncio.Event()

    async def wait() -> bool:
        try:
            async with clock.timeout(5):
                await event.wait()
        except TimeoutError:
            return False
        return True

    expiring = asyncio.create_task(wait())
    await clock.waiting()
    clock.advance(4.9)
    assert clock.sleepers == 1
    clock.advance(0.1)
    assert await expiring is False

    answered = asyncio.create_task(wait())
    await clock.waiting()
    event.set()
    assert await answered is True
    assert clock.sleepers == 0  # the block ended: its deadline is forgotten
    clock.advance(10)


async def test_no_timeout_and_a_spent_one() -> None:
    clock = FakeClock()
    async with clock.timeout(None):
        assert clock.sleepers == 0
    with pytest.raises(TimeoutError):
        async with clock.timeout(0):
            await asyncio.Event().wait()


async def test_waiting_for_a_deadline_that_far_ahead() -> None:
    clock = FakeClock()
    first = asyncio.create_task(clock.sleep(30))
    await clock.waiting(seconds=30)
    clock.advance(10)
    second = asyncio.create_task(clock.sleep(30))
    await clock.waiting(seconds=30)  # the second one: the first ends in 20 s
    await clock.waiting(seconds=20)
    clock.advance(20)
    await first
    assert not second.done() and clock.sleepers == 1
    clock.advance(10)
    await second


def test_time_does_not_go_back() -> None:
    with pytest.raises(ValueError):
        FakeClock().advance(-1)
