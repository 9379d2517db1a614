"""The token bucket keeps the rate, serves waiters in turn, and holds after a 429."""

from __future__ import annotations

import asyncio

import pytest

from esprelay.ratelimit import RateLimit
from tests.fakeclock import FakeClock


async def test_bursts_then_paces() -> None:
    clock = FakeClock()
    limit = RateLimit(2.0, burst=2, clock=clock)
    sent: list[float] = []

    async def send() -> None:
        await limit.acquire()
        sent.append(clock.monotonic())

    tasks = [asyncio.create_task(send()) for _ in range(5)]
    for _ in range(10):
        await asyncio.sleep(0)
        clock.advance(0.25)
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    start = sent[0]
    assert [round(t - start, 2) for t in sent] == [0.0, 0.0, 0.5, 1.0, 1.5]


async def test_hold_until_stops_every_request() -> None:
    clock = FakeClock()
    limit = RateLimit(100.0, burst=10, clock=clock)
    await limit.acquire()
    limit.hold_until(3.0)
    task = asyncio.create_task(limit.acquire())
    await clock.waiting(1)
    clock.advance(2.9)
    await asyncio.sleep(0)
    assert not task.done()
    clock.advance(0.2)
    await asyncio.wait_for(task, 1)


def test_nonsense_is_refused() -> None:
    with pytest.raises(ValueError):
        RateLimit(0)
