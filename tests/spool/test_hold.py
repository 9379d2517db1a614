"""Hold, release and flush (``esprelay queue hold|release|flush``), on every backend: a
held message is never leased, whatever its due time, until it is released."""

from __future__ import annotations

from esprelay.models import MessageState
from esprelay.spool import Spool
from tests.spool.conftest import SpoolClock, SpoolFactory
from tests.spool.test_conformance import put


async def test_a_held_message_is_never_leased_until_released(
    spool: Spool, spool_clock: SpoolClock
) -> None:
    held, other = await put(spool), await put(spool)
    assert await spool.hold([held, "00000000000ffffffffff"]) == (held,)
    assert await spool.held_ids() == {held}
    assert [m.id for m in await spool.lease("w1", 10, 60)] == [other]
    await spool.mark_delivered(other, owner="w1", provider="p", provider_message_id=None)
    assert await spool.retry_now(held)  # due now, and still held
    await spool_clock.advance(3600)
    assert await spool.lease("w1", 10, 60) == []
    message = await spool.get(held)
    assert message is not None and message.state is MessageState.QUEUED
    assert await spool.release([held]) == (held,)
    assert await spool.release([held]) == ()  # no longer held
    assert await spool.held_ids() == set()
    assert [m.id for m in await spool.lease("w1", 10, 60)] == [held]


async def test_hold_in_flight_waits_for_the_attempt_and_a_deferral_stays_held(
    spool: Spool, spool_clock: SpoolClock
) -> None:
    message_id = await put(spool)
    [leased] = await spool.lease("w1", 1, 60)
    assert await spool.hold(None) == (message_id,)  # ALL
    await spool_clock.advance(120)  # the lease expired: still not taken again
    assert await spool.lease("w2", 1, 60) == []
    assert await spool.mark_retry(
        message_id, owner="w1", provider="p", error="e", next_attempt_at=spool_clock.time()
    )
    assert await spool.lease("w2", 1, 60) == []
    assert await spool.release(None) == (message_id,)
    assert [m.id for m in await spool.lease("w2", 1, 60)] == [leased.id]


async def test_release_makes_due_now(spool: Spool, spool_clock: SpoolClock) -> None:
    message_id = await put(spool)
    await spool.lease("w1", 1, 60)
    later = spool_clock.time() + 3600
    await spool.mark_retry(message_id, owner="w1", provider="p", error="e", next_attempt_at=later)
    await spool.hold([message_id])
    assert await spool.release([message_id]) == (message_id,)
    assert [m.id for m in await spool.lease("w1", 1, 60)] == [message_id]


async def test_flush_makes_every_deferred_message_due_but_not_the_held(
    spool: Spool, spool_clock: SpoolClock
) -> None:
    ids = [await put(spool) for _ in range(3)]
    await spool.lease("w1", 3, 60)
    later = spool_clock.time() + 3600
    for message_id in ids:
        await spool.mark_retry(
            message_id, owner="w1", provider="p", error="e", next_attempt_at=later
        )
    await spool.hold([ids[0]])
    assert await spool.lease("w1", 3, 60) == []
    assert await spool.flush() == 2
    assert sorted(m.id for m in await spool.lease("w1", 3, 60)) == sorted(ids[1:])
    assert await spool.flush() == 0


async def test_finished_messages_cannot_be_held(spool: Spool, spool_factory: SpoolFactory) -> None:
    message_id = await put(spool)
    await spool.lease("w1", 1, 60)
    await spool.mark_delivered(message_id, owner="w1", provider="p", provider_message_id=None)
    assert await spool.hold([message_id]) == ()
    # Another process (the CLI) sees what this one holds.
    other = await spool_factory()
    second = await put(spool)
    assert await other.hold([second]) == (second,)
    assert await spool.held_ids() == {second}
