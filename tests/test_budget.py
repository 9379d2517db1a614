"""The byte budget that keeps large messages from being built all at once."""

from __future__ import annotations

import asyncio

import pytest

from esprelay.budget import ByteBudget


async def test_holds_within_capacity_and_queues_the_rest_in_order() -> None:
    budget = ByteBudget(100)
    order: list[str] = []
    release = {name: asyncio.Event() for name in "abcd"}

    async def deliver(name: str, size: int) -> None:
        async with budget.hold(size):
            order.append(name)
            assert budget.in_use <= budget.capacity
            await release[name].wait()

    tasks = [
        asyncio.create_task(deliver(name, size))
        for name, size in (("a", 60), ("b", 40), ("c", 50), ("d", 10))
    ]
    await asyncio.sleep(0)
    assert order == ["a", "b"] and budget.in_use == 100
    assert budget.waiting == 2  # d would fit after c, but waits its turn
    release["a"].set()
    await asyncio.sleep(0.01)
    assert order == ["a", "b", "c", "d"] and budget.in_use == 100
    for event in release.values():
        event.set()
    await asyncio.gather(*tasks)
    assert budget.in_use == 0 and budget.waiting == 0


async def test_a_message_above_the_budget_goes_alone() -> None:
    budget = ByteBudget(100)
    seen: list[int] = []
    async with budget.hold(10):
        waiter = asyncio.create_task(_hold(budget, 5000, seen))
        await asyncio.sleep(0.01)
        assert not waiter.done()
    await waiter
    assert seen == [100] and budget.in_use == 0


async def _hold(budget: ByteBudget, size: int, seen: list[int] | None = None) -> None:
    async with budget.hold(size):
        if seen is not None:
            seen.append(budget.in_use)


async def test_cancelled_waiter_frees_its_place() -> None:
    budget = ByteBudget(100)
    async with budget.hold(100):
        first = asyncio.create_task(_hold(budget, 80))
        second = asyncio.create_task(_hold(budget, 20))
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
    await second
    assert budget.in_use == 0 and budget.waiting == 0


async def test_cancelled_just_after_being_granted_gives_it_back() -> None:
    budget = ByteBudget(100)
    async with budget.hold(100):
        waiter = asyncio.create_task(_hold(budget, 50))
        await asyncio.sleep(0)
        assert budget.waiting == 1
    # Leaving the block granted the waiter's share; it is cancelled before it resumes.
    assert budget.in_use == 50
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert budget.in_use == 0


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ByteBudget(0)
