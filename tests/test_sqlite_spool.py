"""What is particular to the SQLite spool (the shared contract has its own suite)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from esprelay.errors import SpoolError
from esprelay.models import Envelope, MessageState
from esprelay.spool.base import NewPart
from esprelay.spool.sqlite import BODY_FILE_MIN, SCHEMA_VERSION, SqliteSpool

ENVELOPE = Envelope("a@example.com", ("b@example.org",))


async def test_many_concurrent_puts_are_all_committed(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path / "s.db")
    await spool.open()
    ids = await asyncio.gather(
        *(spool.put(ENVELOPE, f"Subject: {i}\r\n\r\n".encode(), provider="p") for i in range(300))
    )
    await spool.close()
    assert len(set(ids)) == 300
    # Read back through a separate connection: the rows are on disk.
    with sqlite3.connect(tmp_path / "s.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 300
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_in_flight_messages_are_recovered_on_exclusive_open(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path / "s.db", exclusive=True)
    await spool.open()
    message_id = await spool.put(ENVELOPE, b"x", provider="p")
    [leased] = await spool.lease("dead-owner", 10, lease_time=3600)
    assert leased.id == message_id
    await spool.close()

    spool = SqliteSpool(tmp_path / "s.db", exclusive=True)
    await spool.open()
    [again] = await spool.lease("new-owner", 10, lease_time=60)
    assert again.id == message_id and again.raw == b"x"
    # The dead owner can no longer record an outcome.
    assert not await spool.mark_delivered(
        message_id, owner="dead-owner", provider="p", provider_message_id="x"
    )
    assert await spool.mark_delivered(
        message_id, owner="new-owner", provider="p", provider_message_id="y"
    )
    message = await spool.get(message_id)
    assert message is not None and message.state == MessageState.DELIVERED
    await spool.close()


async def test_exclusive_lock(tmp_path: Path) -> None:
    first = SqliteSpool(tmp_path / "s.db", exclusive=True)
    await first.open()
    with pytest.raises(SpoolError, match="in use"):
        await SqliteSpool(tmp_path / "s.db", exclusive=True).open()
    shared = SqliteSpool(tmp_path / "s.db")
    await shared.open()  # admin commands may open it alongside
    await shared.close()
    await first.close()


async def test_unwritable_location_is_a_spool_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises((SpoolError, OSError)):
        await SqliteSpool(blocker / "s.db").open()


async def test_closed_spool_refuses_work(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path / "s.db")
    await spool.open()
    await spool.close()
    with pytest.raises(SpoolError):
        await spool.put(ENVELOPE, b"x", provider="p")


@contextlib.asynccontextmanager
async def _one_batch(spool: SqliteSpool) -> AsyncIterator[None]:
    """Hold the writer thread in an operation while the block runs, so the operations
    queued in it run together as one batch when it ends."""
    entered, release = threading.Event(), threading.Event()

    def block(conn: sqlite3.Connection) -> None:
        entered.set()
        release.wait(10)

    blocker = asyncio.ensure_future(spool._run(block))
    await asyncio.to_thread(entered.wait, 10)
    try:
        yield
        await asyncio.sleep(0.05)  # let the queued operations reach the writer's queue
    finally:
        release.set()
        await blocker


async def test_a_failing_operation_fails_alone_in_its_batch(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path / "s.db")
    await spool.open()
    [leased] = await spool.put_parts(b"x", [NewPart(ENVELOPE, "p")], lease_owner="w")

    def half_done_then_python_error(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE messages SET provider = 'changed'")
        raise ValueError("boom")

    def half_done_then_sqlite_error(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE messages SET provider = 'changed'")
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    async with _one_batch(spool):
        tasks = [
            asyncio.ensure_future(spool.put(ENVELOPE, b"first", provider="p")),
            asyncio.ensure_future(spool._run(half_done_then_python_error)),
            asyncio.ensure_future(
                spool.mark_delivered(leased, owner="w", provider="p", provider_message_id="pm")
            ),
            asyncio.ensure_future(spool._run(half_done_then_sqlite_error)),
            asyncio.ensure_future(spool.put(ENVELOPE, b"last", provider="p")),
        ]
    first, python_error, delivered, sqlite_error, last = await asyncio.gather(
        *tasks, return_exceptions=True
    )
    assert isinstance(python_error, ValueError)
    assert isinstance(sqlite_error, SpoolError) and "no_such_table" in str(sqlite_error)
    assert delivered is True
    assert isinstance(first, str) and isinstance(last, str)
    for message_id in (first, last, leased):
        message = await spool.get(message_id, with_body=True)
        assert message is not None and message.provider == "p"  # no half-done update
    message = await spool.get(leased)
    assert message is not None and message.state == MessageState.DELIVERED
    assert [a.outcome for a in message.history] == ["delivered"]
    await spool.close()


async def test_a_caller_that_gives_up_does_not_stop_the_writer(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path / "s.db")
    await spool.open()
    async with _one_batch(spool):
        abandoned = asyncio.ensure_future(spool.put(ENVELOPE, b"abandoned", provider="p"))
        kept = asyncio.ensure_future(spool.put(ENVELOPE, b"kept", provider="p"))
        await asyncio.sleep(0.05)
        abandoned.cancel()
    message_id = await asyncio.wait_for(kept, 10)
    assert await asyncio.wait_for(spool.put(ENVELOPE, b"after", provider="p"), 10)
    assert (await spool.get(message_id)) is not None
    # The operation itself was already queued: it ran, its caller just no longer waits.
    stats = await spool.stats()
    assert stats.counts[MessageState.QUEUED] == 3
    await spool.close()


async def test_every_queued_operation_runs_before_close(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path / "s.db")
    await spool.open()
    puts = [asyncio.ensure_future(spool.put(ENVELOPE, b"x", provider="p")) for _ in range(50)]
    await asyncio.sleep(0)
    await spool.close()
    assert len(set(await asyncio.gather(*puts))) == 50


async def test_new_spools_get_larger_pages_and_old_ones_keep_theirs(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "old.db") as conn:
        conn.execute("CREATE TABLE placeholder (x)")  # a 4 KiB-page file made earlier
    for name, expected in (("new.db", 8192), ("old.db", 4096)):
        spool = SqliteSpool(tmp_path / name)
        await spool.open()
        await spool.put(ENVELOPE, b"x" * 3000, provider="p")
        await spool.close()
        with sqlite3.connect(tmp_path / name) as conn:
            assert conn.execute("PRAGMA page_size").fetchone()[0] == expected
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _attempt_rows(path: Path) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(
            "SELECT message_id, number, outcome FROM attempts ORDER BY message_id, number"
        ).fetchall()


async def test_a_delivery_is_recorded_in_the_message_row_only(tmp_path: Path) -> None:
    """Deferrals and failures get an attempt row; a delivery is implied by the messages
    row, and ``get`` shows the same history as a spool that kept a row for it."""
    spool = SqliteSpool(tmp_path / "s.db")
    await spool.open()
    [retried, direct] = [
        (await spool.put_parts(b"x", [NewPart(ENVELOPE, "p")], lease_owner="w", lease_time=60))[0]
        for _ in range(2)
    ]
    assert await spool.mark_retry(retried, owner="w", provider="p", error="503", next_attempt_at=0)
    [again] = await spool.lease("w", 10, 60)
    assert again.id == retried
    assert await spool.mark_delivered(retried, owner="w", provider="q", provider_message_id="pm")
    assert await spool.mark_delivered(direct, owner="w", provider="p", provider_message_id=None)
    assert _attempt_rows(tmp_path / "s.db") == [(retried, 1, "deferred")]

    message = await spool.get(retried)
    assert message is not None
    assert [
        (a.number, a.provider, a.outcome, a.error, a.provider_message_id) for a in message.history
    ] == [
        (1, "p", "deferred", "503", None),
        (2, "q", "delivered", None, "pm"),
    ]
    assert message.history[-1].at == message.updated_at
    message = await spool.get(direct)
    assert message is not None
    assert [(a.number, a.provider, a.outcome, a.provider_message_id) for a in message.history] == [
        (1, "p", "delivered", None)
    ]
    await spool.close()


async def test_a_delivery_row_written_by_an_earlier_version_is_shown_once(
    tmp_path: Path,
) -> None:
    spool = SqliteSpool(tmp_path / "s.db")
    await spool.open()
    [message_id] = await spool.put_parts(
        b"x", [NewPart(ENVELOPE, "p")], lease_owner="w", lease_time=60
    )
    assert await spool.mark_delivered(message_id, owner="w", provider="p", provider_message_id="a")
    await spool.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "s.db")) as conn, conn:
        conn.execute(
            "INSERT INTO attempts (message_id, number, at, provider, outcome, error,"
            " provider_message_id) SELECT id, attempts, updated_at, provider, 'delivered',"
            " NULL, provider_message_id FROM messages"
        )
    spool = SqliteSpool(tmp_path / "s.db")
    await spool.open()
    message = await spool.get(message_id)
    assert message is not None
    assert [(a.number, a.outcome, a.provider_message_id) for a in message.history] == [
        (1, "delivered", "a")
    ]
    await spool.close()


# The indexes of schema version 1, as spool files written before version 2 have them.
_V1_INDEXES = (
    "CREATE INDEX messages_due ON messages (state, next_attempt_at)",
    "CREATE INDEX messages_lease ON messages (state, lease_expires_at)",
)


async def _spool_in_every_state(path: Path) -> dict[MessageState, str]:
    """A spool with one message in each state (and one more queued)."""
    spool = SqliteSpool(path)
    await spool.open()
    ids = {}
    for state in MessageState:
        [ids[state]] = await spool.put_parts(
            state.value.encode(), [NewPart(ENVELOPE, "p")], lease_owner="w", lease_time=60
        )
    await spool.put(ENVELOPE, b"waiting", provider="p")
    await spool.mark_retry(
        ids[MessageState.QUEUED], owner="w", provider="p", error="503", next_attempt_at=1.0
    )
    await spool.mark_delivered(
        ids[MessageState.DELIVERED], owner="w", provider="p", provider_message_id="pm"
    )
    await spool.mark_failed(ids[MessageState.FAILED], owner="w", provider="p", error="550")
    await spool.close()
    return ids


def _schema(path: Path) -> tuple[str, dict[str, str]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        [version] = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        indexes = dict(
            conn.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            ).fetchall()
        )
    return version, indexes


async def test_a_version_1_spool_gets_partial_indexes_and_keeps_its_messages(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    ids = await _spool_in_every_state(path)
    version, indexes = _schema(path)
    assert version == str(SCHEMA_VERSION)
    # (The event inbox has an index of its own, event_inbox_pending.)
    assert {"messages_due", "messages_lease", "messages_failed"} <= set(indexes)
    # Make it the file version 1 left: its indexes, its version, no body_file column.
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("ALTER TABLE messages DROP COLUMN body_file")
        conn.execute("DROP INDEX messages_due")
        conn.execute("DROP INDEX messages_lease")
        conn.execute("DROP INDEX messages_failed")
        for statement in _V1_INDEXES:
            conn.execute(statement)
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")

    spool = SqliteSpool(path, exclusive=True)
    await spool.open()
    version, indexes = _schema(path)
    assert version == str(SCHEMA_VERSION)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(messages)")]
        assert columns[-1] == "body_file" and "held" in columns
        assert conn.execute("SELECT DISTINCT body_file FROM messages").fetchall() == [(0,)]
    assert "WHERE state = 'queued'" in indexes["messages_due"]
    assert "WHERE state = 'in_flight'" in indexes["messages_lease"]
    assert "WHERE state = 'failed'" in indexes["messages_failed"]
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    # The message in flight was recovered (through the new lease index), the others
    # are where they were.
    stats = await spool.stats()
    assert stats.counts == {
        MessageState.DELIVERED: 1,
        MessageState.FAILED: 1,
        MessageState.QUEUED: 3,
    }
    assert stats.oldest_queued_at is not None
    assert await spool.next_due() == 1.0
    leased = await spool.lease("w2", 10, 60)
    assert sorted(m.raw or b"" for m in leased) == [b"in_flight", b"queued", b"waiting"]
    failed = await spool.list(state=MessageState.FAILED)
    assert [m.id for m in failed] == [ids[MessageState.FAILED]]
    await spool.close()


async def test_stats_and_lists_agree_with_a_count_of_every_row(tmp_path: Path) -> None:
    """A differential check of the counts taken from the partial indexes."""
    path = tmp_path / "s.db"
    await _spool_in_every_state(path)
    spool = SqliteSpool(path)  # not exclusive: the message in flight stays in flight
    await spool.open()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        expected = dict(conn.execute("SELECT state, COUNT(*) FROM messages GROUP BY state"))
        oldest = conn.execute(
            "SELECT MIN(created_at) FROM messages WHERE state IN ('queued', 'in_flight')"
        ).fetchone()[0]
        states = dict(conn.execute("SELECT id, state FROM messages"))
    stats = await spool.stats()
    assert {state.value: count for state, count in stats.counts.items()} == expected
    assert list(stats.counts) == sorted(stats.counts)  # the order GROUP BY gave
    assert stats.oldest_queued_at == oldest
    for state in MessageState:
        listed = await spool.list(state=state)
        assert sorted(m.id for m in listed) == sorted(i for i, s in states.items() if s == state)
    await spool.close()


def _synchronous(conn: sqlite3.Connection) -> int:
    """The setting the batch this runs in commits with: 2 is FULL, 1 NORMAL."""
    return int(conn.execute("PRAGMA synchronous").fetchone()[0])


async def test_only_batches_of_leases_and_outcomes_commit_without_fsync(
    tmp_path: Path,
) -> None:
    """Anything that takes a message in (or changes it by hand) commits with FULL,
    whatever shares its batch; leases, deliveries and deferrals alone with NORMAL."""
    spool = SqliteSpool(tmp_path / "s.db", exclusive=True)
    await spool.open()
    leased = [
        (await spool.put_parts(b"x", [NewPart(ENVELOPE, "p")], lease_owner="w", lease_time=60))[0]
        for _ in range(8)
    ]
    await spool.put(ENVELOPE, b"due", provider="p")

    async def batch_mode(*operations: Any) -> int:
        async with _one_batch(spool):
            probe = asyncio.ensure_future(spool._run(_synchronous, durable=False))
            others = [asyncio.ensure_future(operation) for operation in operations]
        await asyncio.gather(*others)
        return await probe

    def delivered(message_id: str) -> Any:
        return spool.mark_delivered(message_id, owner="w", provider="p", provider_message_id="x")

    assert await batch_mode() == 1
    assert await batch_mode(delivered(leased[0]), spool.lease("w", 1, 60)) == 1
    assert (
        await batch_mode(
            spool.mark_retry(leased[1], owner="w", provider="p", error="e", next_attempt_at=9e9)
        )
        == 1
    )
    # A message taken in: FULL, with or without outcomes in the same batch.
    assert await batch_mode(spool.put(ENVELOPE, b"new", provider="p")) == 2
    assert await batch_mode(delivered(leased[2])) == 1
    assert (
        await batch_mode(
            delivered(leased[3]),
            spool.put_parts(b"y", [NewPart(ENVELOPE, "p")], lease_owner="w", lease_time=60),
            delivered(leased[4]),
        )
        == 2
    )
    # A failure (a bounce follows it) and the admin operations: FULL.
    assert await batch_mode(spool.mark_failed(leased[5], owner="w", provider="p", error="e")) == 2
    assert await batch_mode(spool.retry_now(leased[1])) == 2
    assert await batch_mode(spool.delete(leased[6])) == 2
    assert await batch_mode(spool.purge(delivered_before=0, failed_before=0)) == 2
    # A plain operation (the default) is durable.
    assert await spool._run(_synchronous) == 2
    assert await spool._run(_synchronous, durable=False) == 1
    # The delivery of a body kept in a file is durable: the file goes after it.
    [large] = await spool.put_parts(
        b"z" * BODY_FILE_MIN, [NewPart(ENVELOPE, "p")], lease_owner="w", lease_time=60
    )
    assert await batch_mode(delivered(large)) == 2
    await spool.close()
    reopened = SqliteSpool(tmp_path / "s.db")
    await reopened.open()
    assert (await reopened.stats()).counts[MessageState.DELIVERED] == 5
    await reopened.close()


def test_message_ids_are_unique_and_time_ordered() -> None:
    from esprelay.spool.base import new_message_id

    ids = [new_message_id(1_800_000_000.0 + i / 1000) for i in range(20000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 21 and int(i, 16) >= 0 for i in ids)
    assert ids == sorted(ids, key=lambda i: i[:11])


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
async def test_the_writer_thread_alone_runs_as_a_batch_thread(tmp_path: Path) -> None:
    """The writer waits for the event loop's thread to block instead of preempting it
    (``_batch_scheduling``); the thread that opened the spool keeps its own policy."""
    before = os.sched_getscheduler(0)
    spool = SqliteSpool(tmp_path / "s.db")
    await spool.open()
    try:
        writer = spool._thread
        assert writer is not None and writer.native_id is not None
        assert os.sched_getscheduler(writer.native_id) == os.SCHED_BATCH
        assert os.sched_getscheduler(0) == before
        await spool.put(ENVELOPE, b"Subject: x\r\n\r\nx\r\n", provider="p")
    finally:
        await spool.close()
