"""``mark_partial``: a message the provider accepted for some recipients only.

Runs on every backend (``spool_url`` is parametrized in conftest.py).
"""

from __future__ import annotations

from esprelay.models import Envelope, MessageState
from esprelay.spool import Spool
from tests.spool.conftest import SpoolClock

ENVELOPE = Envelope("app@example.com", ("a@example.org", "b@example.org", "c@example.org"))
RAW = b"From: app@example.com\r\nSubject: partial\r\n\r\nbody\r\n"
NOTE = "accepted <a@example.org>; bounced <b@example.org>; retried <c@example.org>"


async def test_requeues_only_the_recipients_still_to_try(
    spool: Spool, spool_clock: SpoolClock
) -> None:
    message_id = await spool.put(ENVELOPE, RAW, provider="outbox", meta={"k": "v"})
    [leased] = await spool.lease("w1", 10, 60)
    assert leased.id == message_id
    due = spool_clock.time() + 30
    assert await spool.mark_partial(
        message_id,
        owner="w1",
        provider="esp",
        provider_message_id="esp-1",
        note=NOTE,
        rcpt_tos=("c@example.org",),
        next_attempt_at=due,
    )
    message = await spool.get(message_id, with_body=True)
    assert message is not None
    assert message.state is MessageState.QUEUED
    assert message.envelope == Envelope("app@example.com", ("c@example.org",))
    assert message.raw == RAW  # kept for the retry
    assert message.attempts == 1
    assert message.provider_message_id == "esp-1"
    assert message.last_error == NOTE
    assert message.meta == {"k": "v"}
    assert abs(message.next_attempt_at - due) < 5
    [attempt] = message.history
    assert (attempt.number, attempt.outcome, attempt.error, attempt.provider_message_id) == (
        1,
        "partial",
        NOTE,
        "esp-1",
    )
    assert await spool.lease("w1", 10, 60) == []  # not due yet

    await spool_clock.advance(60)
    [again] = await spool.lease("w2", 10, 60)
    assert again.envelope.rcpt_tos == ("c@example.org",)
    assert again.raw == RAW
    assert await spool.mark_delivered(
        message_id, owner="w2", provider="esp", provider_message_id="esp-2"
    )
    done = await spool.get(message_id)
    assert done is not None and done.state is MessageState.DELIVERED
    assert done.attempts == 2
    assert [(a.number, a.outcome, a.provider_message_id) for a in done.history] == [
        (1, "partial", "esp-1"),
        (2, "delivered", "esp-2"),
    ]


async def test_without_recipients_left_the_message_is_delivered(spool: Spool) -> None:
    message_id = await spool.put(ENVELOPE, RAW, provider="outbox")
    await spool.lease("w1", 10, 60)
    assert await spool.mark_partial(
        message_id,
        owner="w1",
        provider="esp",
        provider_message_id="esp-1",
        note="accepted <a@example.org>; bounced <b@example.org> <c@example.org>",
        rcpt_tos=(),
        next_attempt_at=None,
    )
    message = await spool.get(message_id, with_body=True)
    assert message is not None
    assert message.state is MessageState.DELIVERED
    assert message.envelope == ENVELOPE  # the record keeps every recipient
    assert message.raw is None
    assert message.provider_message_id == "esp-1"
    assert [(a.number, a.outcome) for a in message.history] == [(1, "partial")]
    assert (await spool.stats()).depth == 0


async def test_a_lost_lease_writes_nothing(spool: Spool, spool_clock: SpoolClock) -> None:
    message_id = await spool.put(ENVELOPE, RAW, provider="outbox")
    await spool.lease("w1", 10, 60)
    await spool_clock.advance(120)  # the lease expires and another worker takes it
    await spool.lease("w2", 10, 60)
    assert not await spool.mark_partial(
        message_id,
        owner="w1",
        provider="esp",
        provider_message_id="esp-1",
        note=NOTE,
        rcpt_tos=("c@example.org",),
        next_attempt_at=spool_clock.time(),
    )
    message = await spool.get(message_id)
    assert message is not None
    assert message.state is MessageState.IN_FLIGHT and message.lease_owner == "w2"
    assert message.envelope == ENVELOPE
    assert message.history == ()
