"""What is particular to the SQLite spool (the shared contract has its own suite)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from esprelay.errors import SpoolError
from esprelay.models import Envelope, MessageState
from esprelay.spool.sqlite import SqliteSpool

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
