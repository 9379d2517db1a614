"""One suite, every backend: the SQLite and PostgreSQL spools must behave the same.

Each test runs twice (``spool_url`` is parametrized in conftest.py).  Under CI=true
the PostgreSQL half fails instead of skipping when the server is unreachable.
"""

from __future__ import annotations

import asyncio

import pytest

from esprelay.errors import SpoolError
from esprelay.models import Envelope, MessageState
from esprelay.spool import NewPart, Spool
from esprelay.spool.postgres import BODY_CHUNK
from tests.spool.conftest import SpoolClock, SpoolFactory

ENVELOPE = Envelope(mail_from="app@example.com", rcpt_tos=("a@example.org", "b@example.net"))
RAW = b"From: app@example.com\r\nSubject: hi\r\n\r\nbody \xff\x00 bytes\r\n"


async def put(spool: Spool, raw: bytes = RAW, **meta: object) -> str:
    return await spool.put(ENVELOPE, raw, provider="outbox", meta=dict(meta))


async def test_put_then_get_round_trips_everything(spool: Spool, spool_clock: SpoolClock) -> None:
    before = spool_clock.time()
    message_id = await put(spool, client="127.0.0.1", helo="client.test")
    message = await spool.get(message_id, with_body=True)
    assert message is not None
    assert message.id == message_id
    assert message.envelope == ENVELOPE
    assert message.raw == RAW
    assert message.size == len(RAW)
    assert message.state is MessageState.QUEUED
    assert message.attempts == 0
    assert message.provider == "outbox"
    assert message.meta == {"client": "127.0.0.1", "helo": "client.test"}
    assert message.history == ()
    assert message.lease_owner is None
    assert before - 5 < message.created_at < spool_clock.time() + 5
    assert message.next_attempt_at <= spool_clock.time() + 5

    without_body = await spool.get(message_id)
    assert without_body is not None
    assert without_body.raw is None
    assert await spool.get("00000000000ffffffffff") is None


async def test_null_sender_and_unicode_envelope(spool: Spool) -> None:
    envelope = Envelope(mail_from="", rcpt_tos=("用户@例子.广告",))
    message_id = await spool.put(envelope, b"x", provider="outbox")
    message = await spool.get(message_id)
    assert message is not None
    assert message.envelope == envelope


async def test_large_message_is_stored_byte_for_byte(spool: Spool) -> None:
    raw = bytes(range(256)) * (12 * 1024 * 1024 // 256)  # 12 MB, every byte value
    message_id = await put(spool, raw)
    [leased] = await spool.lease("w1", 10, 60)
    assert leased.id == message_id
    assert leased.size == len(raw)
    assert leased.raw == raw


@pytest.mark.parametrize(
    "size",
    [0, 1, BODY_CHUNK - 1, BODY_CHUNK, BODY_CHUNK + 1, 3 * BODY_CHUNK + 7],
)
async def test_body_of_any_size_round_trips(spool: Spool, size: int) -> None:
    raw = (b"0123456789abcdef\r\n" * (size // 18 + 1))[:size]
    message_id = await put(spool, raw)
    fetched = await spool.get(message_id, with_body=True)
    assert fetched is not None
    assert fetched.raw == raw
    assert fetched.size == size
    [leased] = await spool.lease("w1", 1, 60)
    assert leased.raw == raw


async def test_put_parts_commits_every_part_with_the_same_bytes(spool: Spool) -> None:
    second = Envelope(mail_from="app@example.com", rcpt_tos=("c@example.com",))
    ids = await spool.put_parts(
        RAW,
        [NewPart(ENVELOPE, "postmark", {"route": "a"}), NewPart(second, "ses", {"route": "b"})],
    )
    assert len(ids) == 2
    assert len(set(ids)) == 2
    stored = [await spool.get(i, with_body=True) for i in ids]
    assert [(m.envelope, m.provider, m.meta, m.raw) for m in stored if m] == [
        (ENVELOPE, "postmark", {"route": "a"}, RAW),
        (second, "ses", {"route": "b"}, RAW),
    ]
    assert {m.id for m in await spool.lease("w1", 10, 60)} == set(ids)


@pytest.mark.parametrize("size", [10, 2 * BODY_CHUNK + 3])
async def test_put_parts_already_leased(spool: Spool, size: int, spool_clock: SpoolClock) -> None:
    raw = b"z" * size
    [message_id] = await spool.put_parts(
        raw, [NewPart(ENVELOPE, "outbox")], lease_owner="inline", lease_time=60
    )
    message = await spool.get(message_id, with_body=True)
    assert message is not None
    assert message.state is MessageState.IN_FLIGHT
    assert message.lease_owner == "inline"
    assert message.lease_expires_at is not None
    assert message.lease_expires_at > spool_clock.time() + 30
    assert message.raw == raw
    assert await spool.lease("w1", 10, 60) == []  # nobody else may take it
    assert await spool.mark_delivered(
        message_id, owner="inline", provider="outbox", provider_message_id="p"
    )


async def put_in_turn(spool: Spool, spool_clock: SpoolClock, count: int) -> list[str]:
    """``count`` messages, a millisecond apart: ids and due times in arrival order."""
    ids = []
    for _ in range(count):
        ids.append(await put(spool))
        await spool_clock.advance(0.001)
    return ids


async def test_list_orders_filters_and_limits(spool: Spool, spool_clock: SpoolClock) -> None:
    ids = await put_in_turn(spool, spool_clock, 5)
    listed = await spool.list()
    assert [m.id for m in listed] == ids
    assert all(m.raw is None for m in listed)
    assert [m.id for m in await spool.list(limit=2)] == ids[:2]
    await spool.lease("w1", 2, 60)
    assert [m.id for m in await spool.list(state=MessageState.IN_FLIGHT)] == ids[:2]
    assert [m.id for m in await spool.list(state=MessageState.QUEUED)] == ids[2:]
    assert await spool.list(state=MessageState.FAILED) == []


async def test_lease_claims_due_messages_once(spool: Spool, spool_clock: SpoolClock) -> None:
    ids = await put_in_turn(spool, spool_clock, 3)
    assert await spool.lease("w1", 0, 60) == []
    leased = await spool.lease("w1", 2, 60)
    assert [m.id for m in leased] == ids[:2]
    for message in leased:
        assert message.raw == RAW
        assert message.state is MessageState.IN_FLIGHT
        assert message.lease_owner == "w1"
        assert message.lease_expires_at is not None
        assert message.lease_expires_at > spool_clock.time() + 30
    assert [m.id for m in await spool.lease("w2", 10, 60)] == ids[2:]
    assert await spool.lease("w3", 10, 60) == []


async def test_lease_within_bytes_stops_before_the_message_over_them(
    spool: Spool, spool_clock: SpoolClock
) -> None:
    sizes = [300, 500, 200, 100]
    bodies = [RAW + b"x" * (size - len(RAW)) for size in sizes]
    ids = []
    for body in bodies:
        ids.append(await put(spool, body))
        await spool_clock.advance(0.001)
    # 300 + 500 > 700: the second is left due, and so is everything after it.
    leased = await spool.lease("w1", 10, 60, max_bytes=700)
    assert [m.id for m in leased] == ids[:1]
    assert leased[0].raw == bodies[0]
    # The first is claimed whatever its size; 500 + 200 fit, 100 more do not.
    leased = await spool.lease("w1", 10, 60, max_bytes=1)
    assert [m.id for m in leased] == ids[1:2]
    leased = await spool.lease("w1", 10, 60, max_bytes=700)
    assert [m.id for m in leased] == ids[2:4]
    assert [m.raw for m in leased] == bodies[2:4]
    assert await spool.lease("w1", 10, 60, max_bytes=10**9) == []
    # Left out means still due, for anyone: nothing was claimed twice or lost.
    stats = await spool.stats()
    assert stats.counts.get(MessageState.IN_FLIGHT) == 4


async def test_lease_within_bytes_and_limit(spool: Spool, spool_clock: SpoolClock) -> None:
    ids = await put_in_turn(spool, spool_clock, 3)
    leased = await spool.lease("w1", 2, 60, max_bytes=10 * len(RAW))
    assert [m.id for m in leased] == ids[:2]
    leased = await spool.lease("w2", 2, 60, max_bytes=len(RAW))
    assert [m.id for m in leased] == ids[2:]


async def test_lease_takes_earliest_due_first(spool: Spool, spool_clock: SpoolClock) -> None:
    ids = [await put(spool) for _ in range(3)]
    [first, second, third] = await spool.lease("w1", 3, 60)
    now = spool_clock.time()
    # Give them due times in the reverse order of their arrival.
    assert await spool.mark_retry(ids[0], owner="w1", provider="p", error="e", next_attempt_at=now)
    assert await spool.mark_retry(
        ids[1], owner="w1", provider="p", error="e", next_attempt_at=now - 10
    )
    assert await spool.mark_retry(
        ids[2], owner="w1", provider="p", error="e", next_attempt_at=now - 20
    )
    assert [m.id for m in await spool.lease("w1", 1, 60)] == [ids[2]]
    assert [m.id for m in await spool.lease("w1", 5, 60)] == [ids[1], ids[0]]
    del first, second, third


async def test_expired_lease_goes_to_another_worker(spool: Spool, spool_clock: SpoolClock) -> None:
    message_id = await put(spool)
    [leased] = await spool.lease("dead-worker", 1, 60)
    await spool_clock.advance(50)
    assert await spool.lease("w2", 1, 60) == []  # still leased
    await spool_clock.advance(10)
    [again] = await spool.lease("w2", 1, 60)
    assert again.id == leased.id == message_id
    assert again.lease_owner == "w2"
    assert again.raw == RAW
    # The first worker lost its lease: it can no longer record an outcome.
    assert not await spool.mark_delivered(
        message_id, owner="dead-worker", provider="outbox", provider_message_id="x"
    )
    assert await spool.mark_delivered(
        message_id, owner="w2", provider="outbox", provider_message_id="p-1"
    )


async def test_mark_delivered_checks_owner_and_drops_body(spool: Spool) -> None:
    message_id = await put(spool)
    assert not await spool.mark_delivered(
        message_id, owner="w1", provider="outbox", provider_message_id="x"
    )  # not leased
    await spool.lease("w1", 1, 60)
    assert not await spool.mark_delivered(
        message_id, owner="intruder", provider="outbox", provider_message_id="x"
    )
    assert await spool.mark_delivered(
        message_id, owner="w1", provider="outbox", provider_message_id="esp-42"
    )
    message = await spool.get(message_id, with_body=True)
    assert message is not None
    assert message.state is MessageState.DELIVERED
    assert message.raw is None
    assert message.attempts == 1
    assert message.provider_message_id == "esp-42"
    assert message.lease_owner is None
    assert [(a.number, a.outcome, a.provider_message_id) for a in message.history] == [
        (1, "delivered", "esp-42")
    ]
    # Recording twice is refused: the lease is gone.
    assert not await spool.mark_delivered(
        message_id, owner="w1", provider="outbox", provider_message_id="esp-42"
    )


async def test_mark_retry_requeues_for_later(spool: Spool, spool_clock: SpoolClock) -> None:
    message_id = await put(spool)
    await spool.lease("w1", 1, 60)
    later = spool_clock.time() + 120
    assert not await spool.mark_retry(
        message_id, owner="intruder", provider="outbox", error="nope", next_attempt_at=later
    )
    assert await spool.mark_retry(
        message_id, owner="w1", provider="outbox", error="HTTP 503", next_attempt_at=later
    )
    assert await spool.lease("w1", 1, 60) == []  # not due yet
    message = await spool.get(message_id, with_body=True)
    assert message is not None
    assert message.state is MessageState.QUEUED
    assert message.raw == RAW
    assert message.attempts == 1
    assert message.last_error == "HTTP 503"
    assert message.next_attempt_at == pytest.approx(later)
    assert [(a.number, a.outcome, a.error) for a in message.history] == [
        (1, "deferred", "HTTP 503")
    ]
    assert await spool.next_due() == pytest.approx(later)


async def test_mark_failed_keeps_body_and_retry_now_revives(spool: Spool) -> None:
    message_id = await put(spool)
    await spool.lease("w1", 1, 60)
    assert not await spool.mark_failed(message_id, owner="other", provider="outbox", error="x")
    assert await spool.mark_failed(message_id, owner="w1", provider="outbox", error="rejected")
    message = await spool.get(message_id, with_body=True)
    assert message is not None
    assert message.state is MessageState.FAILED
    assert message.raw == RAW
    assert message.last_error == "rejected"
    assert await spool.lease("w1", 1, 60) == []

    assert await spool.retry_now(message_id)
    revived = await spool.get(message_id)
    assert revived is not None
    assert revived.state is MessageState.QUEUED
    assert revived.created_at >= message.created_at  # a fresh queue lifetime
    [leased] = await spool.lease("w1", 1, 60)
    assert leased.id == message_id
    assert leased.attempts == 1


async def test_retry_now(spool: Spool, spool_clock: SpoolClock) -> None:
    assert not await spool.retry_now("00000000000ffffffffff")
    queued = await put(spool)
    await spool.lease("w1", 1, 60)
    assert not await spool.retry_now(queued)  # in flight: a worker owns it
    await spool.mark_retry(
        queued, owner="w1", provider="outbox", error="e", next_attempt_at=spool_clock.time() + 3600
    )
    assert await spool.lease("w1", 1, 60) == []
    assert await spool.retry_now(queued)
    assert [m.id for m in await spool.lease("w1", 1, 60)] == [queued]
    await spool.mark_delivered(queued, owner="w1", provider="outbox", provider_message_id=None)
    assert not await spool.retry_now(queued)  # delivered: the body is gone


async def test_delete(spool: Spool, spool_clock: SpoolClock) -> None:
    message_id = await put(spool)
    await spool.lease("w1", 1, 60)
    await spool.mark_retry(
        message_id, owner="w1", provider="outbox", error="e", next_attempt_at=spool_clock.time()
    )
    assert await spool.delete(message_id)
    assert await spool.get(message_id) is None
    assert not await spool.delete(message_id)
    # A new message does not inherit anything from the deleted one.
    assert await spool.list() == []


async def test_stats(spool: Spool) -> None:
    empty = await spool.stats()
    assert empty.depth == 0
    assert empty.oldest_queued_at is None
    ids = [await put(spool) for _ in range(4)]
    first = await spool.get(ids[0])
    assert first is not None
    [a, b] = await spool.lease("w1", 2, 60)
    await spool.mark_delivered(a.id, owner="w1", provider="outbox", provider_message_id=None)
    stats = await spool.stats()
    assert stats.counts == {
        MessageState.QUEUED: 2,
        MessageState.IN_FLIGHT: 1,
        MessageState.DELIVERED: 1,
    }
    assert stats.depth == 3
    assert stats.oldest_queued_at == pytest.approx(
        (await spool.get(b.id)).created_at  # type: ignore[union-attr]
    )


async def test_next_due(spool: Spool, spool_clock: SpoolClock) -> None:
    assert await spool.next_due() is None
    message_id = await put(spool)
    due = await spool.next_due()
    assert due is not None
    assert due <= spool_clock.time() + 5
    [leased] = await spool.lease("w1", 1, 600)
    # Only an in-flight message: it is "due" again when its lease expires.
    assert await spool.next_due() == pytest.approx(leased.lease_expires_at)
    await spool.mark_delivered(message_id, owner="w1", provider="outbox", provider_message_id=None)
    assert await spool.next_due() is None


async def test_purge_removes_only_old_finished_messages(
    spool: Spool, spool_clock: SpoolClock
) -> None:
    ids = await put_in_turn(spool, spool_clock, 4)
    await spool.lease("w1", 3, 60)
    await spool.mark_delivered(ids[0], owner="w1", provider="outbox", provider_message_id=None)
    await spool.mark_failed(ids[1], owner="w1", provider="outbox", error="x")
    now = spool_clock.time()
    # Retention not reached: nothing goes.
    assert await spool.purge(delivered_before=now - 60, failed_before=now - 60) == 0
    # Only delivered messages past retention.
    assert await spool.purge(delivered_before=now + 60, failed_before=now - 60) == 1
    assert await spool.get(ids[0]) is None
    assert await spool.purge(delivered_before=now + 60, failed_before=now + 60) == 1
    assert await spool.get(ids[1]) is None
    # Queued and in-flight messages are never purged.
    assert {m.id for m in await spool.list()} == {ids[2], ids[3]}


async def test_concurrent_leases_never_share_a_message(spool_factory: SpoolFactory) -> None:
    """Two spool objects on one store (two instances) and many workers each."""
    first = await spool_factory()
    second = await spool_factory()
    ids = {await put(first) for _ in range(120)}
    claimed: list[str] = []

    async def worker(spool: Spool, name: str) -> None:
        while True:
            leased = await spool.lease(name, 7, 60)
            if not leased:
                return
            for message in leased:
                claimed.append(message.id)
                assert await spool.mark_delivered(
                    message.id, owner=name, provider="outbox", provider_message_id=None
                )

    await asyncio.gather(
        *(worker(first if n % 2 else second, f"w{n}") for n in range(8)),
    )
    assert len(claimed) == len(ids)
    assert set(claimed) == ids
    stats = await first.stats()
    assert stats.counts == {MessageState.DELIVERED: 120}


async def test_a_second_spool_object_sees_the_same_messages(spool_factory: SpoolFactory) -> None:
    writer = await spool_factory()
    reader = await spool_factory()
    message_id = await put(writer)
    message = await reader.get(message_id, with_body=True)
    assert message is not None
    assert message.raw == RAW


async def test_closed_spool_refuses_work(spool_factory: SpoolFactory) -> None:
    spool = await spool_factory()
    await spool.close()
    with pytest.raises(SpoolError):
        await put(spool)
    await spool.close()  # closing twice is harmless
