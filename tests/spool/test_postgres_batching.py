"""The PostgreSQL spool's group commit: concurrent puts and outcomes share statements,
every caller hears of its own write only once it is committed, and a batch that fails
(a row the database refuses, a connection lost in the middle) loses nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from esprelay.errors import SpoolError
from esprelay.events.model import Event
from esprelay.models import Envelope, MessageState
from esprelay.spool.base import NewPart
from esprelay.spool.postgres import SCHEMA_VERSION, PostgresSpool, schema_version

PROVIDER = "outbox"


def _envelope(n: int, recipients: int = 1) -> Envelope:
    return Envelope(
        mail_from=f"app{n}@example.com",
        rcpt_tos=tuple(f"r{n}.{i}@example.org" for i in range(recipients)),
    )


async def _empty(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "DROP TABLE IF EXISTS esprelay_message_timeline, esprelay_message_recipients,"
            " esprelay_events, esprelay_attempts, esprelay_bodies,"
            " esprelay_messages, esprelay_schema"
        )
    finally:
        await conn.close()


@pytest.fixture
async def spool(pg_url: str) -> AsyncIterator[PostgresSpool]:
    await _empty(pg_url)
    spool = PostgresSpool(pg_url)
    await spool.open()
    yield spool
    await spool.close()


@pytest.fixture
async def admin(pg_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_url, timeout=5)
    yield conn
    await conn.close()


@pytest.fixture
async def blocker(pg_url: str) -> AsyncIterator[asyncpg.Connection]:
    """Another client, whose transaction holds what the spool's next batch needs.

    (Not ``admin``'s: inside a transaction, pg_stat_activity does not change.)"""
    conn = await asyncpg.connect(pg_url, timeout=5)
    yield conn
    await conn.close()


async def test_concurrent_puts_commit_together_and_each_as_given(spool: PostgresSpool) -> None:
    before = spool.round_trips
    # Fifty puts at once: one entry each, with one to three recipients, or two entries
    # (a split by route), some already leased (an intake hand-off).
    results = await asyncio.gather(
        *(
            spool.put_parts(
                f"body {n}".encode() * (n + 1),
                [NewPart(_envelope(n, 1 + n % 3), PROVIDER, {"n": n})]
                + (
                    [NewPart(_envelope(100 + n), "sendgrid", {"n": n, "split": True})]
                    if n % 10 == 0
                    else []
                ),
                lease_owner="w" if n % 2 else None,
                lease_time=60,
            )
            for n in range(50)
        )
    )
    # Fifty puts, one statement (and a NOTIFY for the ones spooled unleased).
    assert spool.round_trips - before <= 3
    for n, ids in enumerate(results):
        assert len(ids) == (2 if n % 10 == 0 else 1)
        message = await spool.get(ids[0], with_body=True)
        assert message is not None
        assert message.envelope == _envelope(n, 1 + n % 3)
        assert message.raw == f"body {n}".encode() * (n + 1)
        assert message.meta == {"n": n}
        assert message.state is (MessageState.IN_FLIGHT if n % 2 else MessageState.QUEUED)
        assert message.lease_owner == ("w" if n % 2 else None)
        if n % 10 == 0:
            split = await spool.get(ids[1], with_body=True)
            assert split is not None
            assert split.envelope == _envelope(100 + n)
            assert split.provider == "sendgrid" and split.raw == message.raw
    stats = await spool.stats()
    assert stats.depth == 55


async def test_concurrent_outcomes_commit_together_and_each_as_given(
    spool: PostgresSpool,
) -> None:
    ids = [
        (await spool.put_parts(b"x" * n, [NewPart(_envelope(n, 3), PROVIDER)]))[0]
        for n in range(40)
    ]
    leased = await spool.lease("w", 40, 60)
    assert sorted(m.id for m in leased) == sorted(ids)
    before = spool.round_trips
    outcomes = await asyncio.gather(
        *(spool.mark_delivered(i, owner="w", provider=PROVIDER, provider_message_id=f"p{i}")
          for i in ids[:20]),
        *(spool.mark_retry(i, owner="w", provider=PROVIDER, error="later", next_attempt_at=1e12)
          for i in ids[20:30]),
        *(spool.mark_failed(i, owner="w", provider=PROVIDER, error="no") for i in ids[30:35]),
        *(
            spool.mark_partial(
                i, owner="w", provider=PROVIDER, provider_message_id="pp", note="some",
                rcpt_tos=[f"r{n}.2@example.org"] if n % 2 else [], next_attempt_at=1e12,
            )
            for n, i in enumerate(ids[35:], start=35)
        ),
        # Not the owner: nothing recorded.
        spool.mark_delivered(ids[0], owner="other", provider=PROVIDER, provider_message_id=None),
    )  # fmt: skip
    # The last one names a message a batch holds already: it waits for the next one.
    assert outcomes == [True] * 40 + [False]
    assert spool.round_trips - before <= 3
    for n, i in enumerate(ids):
        message = await spool.get(i, with_body=True)
        assert message is not None
        assert message.attempts == 1 and len(message.history) == 1
        assert message.lease_owner is None
        if n < 20:
            assert message.state is MessageState.DELIVERED
            assert message.provider_message_id == f"p{i}" and message.raw is None
            assert message.history[0].outcome == "delivered"
        elif n < 30:
            assert message.state is MessageState.QUEUED
            assert message.next_attempt_at == 1e12 and message.last_error == "later"
            assert message.raw == b"x" * n
        elif n < 35:
            assert message.state is MessageState.FAILED and message.last_error == "no"
            assert message.raw == b"x" * n
        elif n % 2:
            # Requeued for the one recipient still to be tried.
            assert message.state is MessageState.QUEUED
            assert message.envelope.rcpt_tos == (f"r{n}.2@example.org",)
            assert message.raw == b"x" * n and message.provider_message_id == "pp"
        else:
            assert message.state is MessageState.DELIVERED
            assert message.envelope == _envelope(n, 3) and message.raw is None
            assert message.history[0].outcome == "partial"


async def test_two_outcomes_for_one_message_record_one(spool: PostgresSpool) -> None:
    message_id = await spool.put(_envelope(1), b"x", provider=PROVIDER)
    await spool.lease("w", 1, 60)
    recorded = await asyncio.gather(
        spool.mark_delivered(message_id, owner="w", provider=PROVIDER, provider_message_id="a"),
        spool.mark_retry(message_id, owner="w", provider=PROVIDER, error="e", next_attempt_at=1),
    )
    assert recorded == [True, False]
    message = await spool.get(message_id)
    assert message is not None and message.state is MessageState.DELIVERED
    assert message.attempts == 1


async def test_a_row_the_database_refuses_fails_alone(spool: PostgresSpool) -> None:
    # PostgreSQL text holds no NUL: that message is refused, its neighbours are stored.
    bad = Envelope(mail_from="bad\x00@example.com", rcpt_tos=("a@example.org",))
    results = await asyncio.gather(
        *(spool.put(_envelope(n), b"good", provider=PROVIDER) for n in range(5)),
        spool.put(bad, b"bad", provider=PROVIDER),
        *(spool.put(_envelope(n), b"good", provider=PROVIDER) for n in range(5, 10)),
        return_exceptions=True,
    )
    assert isinstance(results[5], SpoolError)
    stored = [result for result in results if isinstance(result, str)]
    assert len(stored) == 10
    assert (await spool.stats()).depth == 10
    for message_id in stored:
        message = await spool.get(message_id, with_body=True)
        assert message is not None and message.raw == b"good"


async def _wait_for_blocked_statement(admin: asyncpg.Connection, fragment: str) -> int:
    """The pid of the spool's backend waiting for a lock in a statement with ``fragment``."""
    for _ in range(1000):
        pid = await admin.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'esprelay' AND wait_event_type = 'Lock'"
            " AND position($1 in query) > 0",
            fragment,
        )
        if pid is not None:
            return int(pid)
        await asyncio.sleep(0.01)
    raise AssertionError("the batch never reached the database")


async def test_a_connection_lost_mid_batch_fails_every_put_and_stores_none(
    spool: PostgresSpool, admin: asyncpg.Connection, blocker: asyncpg.Connection
) -> None:
    kept = await spool.put(_envelope(0), b"stored before", provider=PROVIDER)
    # Another transaction holds the table, so the batch waits inside the database ...
    holding = blocker.transaction()
    await holding.start()
    await blocker.execute("LOCK TABLE esprelay_messages IN SHARE ROW EXCLUSIVE MODE")
    puts = asyncio.gather(
        *(spool.put(_envelope(n), b"lost", provider=PROVIDER) for n in range(1, 11)),
        return_exceptions=True,
    )
    pid = await _wait_for_blocked_statement(admin, "INSERT INTO esprelay_messages")
    # ... until its connection is cut.
    await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    await holding.rollback()
    results = await puts
    assert all(isinstance(result, SpoolError) for result in results), results
    counted = await admin.fetchval("SELECT count(*) FROM esprelay_messages")
    assert counted == 1
    # Nothing of the batch was stored; what was before still is; the spool goes on.
    again = await spool.put(_envelope(11), b"after", provider=PROVIDER)
    assert [m.id for m in await spool.lease("w", 10, 60)] == [kept, again]


async def test_a_connection_lost_mid_batch_fails_every_outcome_and_records_none(
    spool: PostgresSpool, admin: asyncpg.Connection, blocker: asyncpg.Connection
) -> None:
    ids = [await spool.put(_envelope(n), b"x", provider=PROVIDER) for n in range(6)]
    await spool.lease("w", 6, 60)
    holding = blocker.transaction()
    await holding.start()
    await blocker.execute("SELECT id FROM esprelay_messages WHERE id = $1 FOR UPDATE", ids[0])
    marks = asyncio.gather(
        *(
            spool.mark_delivered(i, owner="w", provider=PROVIDER, provider_message_id=None)
            for i in ids
        ),
        return_exceptions=True,
    )
    pid = await _wait_for_blocked_statement(admin, "UPDATE esprelay_messages")
    await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    await holding.rollback()
    results = await marks
    assert all(isinstance(result, SpoolError) for result in results), results
    # Nothing recorded: every message is still leased, and the outcomes can be
    # recorded again.
    for message_id in ids:
        message = await spool.get(message_id)
        assert message is not None and message.state is MessageState.IN_FLIGHT
        assert message.attempts == 0 and message.history == ()
    recorded = await asyncio.gather(
        *(
            spool.mark_delivered(i, owner="w", provider=PROVIDER, provider_message_id=None)
            for i in ids
        )
    )
    assert recorded == [True] * 6


async def test_close_answers_the_writes_already_submitted(pg_url: str) -> None:
    await _empty(pg_url)
    spool = PostgresSpool(pg_url)
    await spool.open()
    puts = [
        asyncio.ensure_future(spool.put(_envelope(n), b"x", provider=PROVIDER)) for n in range(5)
    ]
    await asyncio.sleep(0)  # every put is waiting in the line
    await spool.close()
    ids = [await put for put in puts]
    with pytest.raises(SpoolError, match="not open"):
        await spool.put(_envelope(9), b"x", provider=PROVIDER)
    reopened = PostgresSpool(pg_url)
    await reopened.open()
    try:
        assert sorted(m.id for m in await reopened.lease("w", 10, 60)) == sorted(ids)
    finally:
        await reopened.close()


async def _session_state(conn: asyncpg.Connection) -> dict[str, object]:
    """What a connection given back to the pool still holds of its last user's session
    (the pool does not reset it: see ``PostgresSpool._reset_connection``)."""
    return {
        "in_transaction": conn.is_in_transaction(),
        "listening": await conn.fetchval("SELECT count(*) FROM pg_listening_channels()"),
        "advisory_locks": await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        ),
        "cursors": await conn.fetchval("SELECT count(*) FROM pg_cursors WHERE name <> ''"),
        # Settings changed for the session (asyncpg sets ``jit`` back to its value after
        # introspecting a type, which counts as set, but changes nothing).
        "settings": await conn.fetch(
            "SELECT name, setting FROM pg_settings"
            " WHERE source = 'session' AND setting IS DISTINCT FROM reset_val"
        ),
    }


CLEAN = {"in_transaction": False, "listening": 0, "advisory_locks": 0, "cursors": 0, "settings": []}


async def test_every_operation_leaves_its_pooled_connection_as_it_found_it(
    pg_url: str,
) -> None:
    await _empty(pg_url)
    # One pooled connection: every operation below runs on it, one after the other.
    spool = PostgresSpool(pg_url, owner="w", pool_size=1)
    await spool.open()
    try:
        pool = spool._require_pool()

        async def check(after: str) -> None:
            async with pool.acquire() as conn:
                assert await _session_state(conn) == CLEAN, after

        # The check sees what an operation would leave behind.
        async with pool.acquire() as conn:
            await conn.execute("SET work_mem = '8MB'")
            assert (await _session_state(conn))["settings"] != []
            await conn.execute("RESET ALL")
        await check("the check's own SET")

        small = await spool.put(_envelope(1), b"small", provider=PROVIDER)
        await check("put")
        large = await spool.put(_envelope(2), b"L" * (3 * 1024 * 1024 + 5), provider=PROVIDER)
        await check("put of a body in pieces")
        assert sorted(m.id for m in await spool.lease("w", 10, 60)) == sorted([small, large])
        await check("lease (a body read through a cursor)")
        message = await spool.get(large, with_body=True)
        assert message is not None and message.raw is not None
        await check("get with a body")
        assert await spool.hold([small]) == (small,)
        await check("hold")
        assert await spool.held_ids() == {small}
        await check("held_ids")
        assert await spool.mark_retry(
            small, owner="w", provider=PROVIDER, error="later", next_attempt_at=0.0
        )
        assert await spool.mark_delivered(
            large, owner="w", provider=PROVIDER, provider_message_id="esp-1"
        )
        await check("outcomes")
        assert await spool.release(None) == (small,)
        await check("release")
        assert await spool.flush() == 0
        await check("flush")
        event = Event(
            "sendgrid",
            "ev-1",
            kind="bounced",
            recipient="r2.0@example.org",
            at=1_700_000_000.0,
            esp_message_id="esp-1",
            esprelay_id=large,
            raw={"event": "bounce"},
        )
        [stored] = await spool.put_events([event])
        assert stored.stored and stored.message_id == large
        await check("put_events")
        [pending] = await spool.pending_events()
        await check("pending_events")
        assert await spool.finish_events([pending.seq]) == 1
        await check("finish_events")
        assert await spool.purge_events(processed_before=time.time() + 60) == 1
        await check("purge_events")
        applied = await spool.apply_event(large, "r2.0@example.org", event, dsn="failure")
        assert applied == (True, True, True)
        await check("apply_event")
        await spool.release_dsn(large, "r2.0@example.org", "failure")
        await check("release_dsn")
        status = await spool.message_status(large)
        assert [r.status.kind for r in status.recipients] == ["bounced"]
        await check("message_status")
        found = await spool.search_messages(recipient="R2.0@example.org")
        assert [m.id for m in found] == [large]
        await check("search_messages")
        message = await spool.find_by_provider_message_id(PROVIDER, "esp-1")
        assert message is not None and message.id == large
        await check("find_by_provider_message_id")
        assert await schema_version(pg_url) == SCHEMA_VERSION
        await check("schema_version")
        assert await spool.purge(delivered_before=time.time() + 60, failed_before=0) == 1
        await check("purge")
    finally:
        await spool.close()
