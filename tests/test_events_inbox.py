"""The durable event inbox of both spool backends: stored once, in order, kept."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from esprelay.events.model import Event, EventInbox
from esprelay.models import Envelope
from esprelay.spool import open_spool
from esprelay.spool.postgres import MIGRATIONS, SCHEMA_VERSION, migrate
from tests.pgutil import temporary_database


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with temporary_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def spool_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'spool.db'}"
    return str(request.getfixturevalue("pg_url"))


async def _empty(url: str) -> None:
    if url.startswith("postgresql"):
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
async def inbox(spool_url: str) -> AsyncIterator[EventInbox]:
    await _empty(spool_url)
    spool = open_spool(spool_url, exclusive=True, owner="test")
    await spool.open()
    assert isinstance(spool, EventInbox)
    try:
        yield spool
    finally:
        await spool.close()


def _event(event_id: str, *, provider: str = "sendgrid", **kw: object) -> Event:
    values: dict[str, object] = {
        "kind": "bounced",
        "recipient": "nobody@example.net",
        "at": 1_700_000_000.5,
        "smtp_status": "5.1.1",
        "diagnostic": "550 5.1.1 no such user",
        "esp_message_id": "esp-1",
        "raw": {"event": "bounce", "n": [1, 2], "text": "ünïcode"},
        **kw,
    }
    return Event(provider, event_id, **values)  # type: ignore[arg-type]


async def test_events_are_stored_once_each(inbox: EventInbox) -> None:
    first = await inbox.put_events([_event("a"), _event("b"), _event("a")])
    assert [r.stored for r in first] == [True, True, False]
    again = await inbox.put_events([_event("b"), _event("c"), _event("a", provider="mailgun")])
    assert [r.stored for r in again] == [False, True, True]
    pending = await inbox.pending_events()
    assert [(s.event.provider, s.event.provider_event_id) for s in pending] == [
        ("sendgrid", "a"),
        ("sendgrid", "b"),
        ("sendgrid", "c"),
        ("mailgun", "a"),
    ]
    assert pending[0].event == _event("a")
    assert [s.seq for s in pending] == sorted(s.seq for s in pending)
    assert pending[0].received_at == pytest.approx(time.time(), abs=300)


async def test_concurrent_requests_store_each_event_once(inbox: EventInbox) -> None:
    # Twenty requests at once, as webhooks arrive: they share commits (both backends
    # group them), and an event in two of them is stored by one only.
    requests = [[_event(f"e{n}"), _event(f"shared{n % 5}")] for n in range(20)]
    before = getattr(inbox, "round_trips", 0)
    answers = await asyncio.gather(*(inbox.put_events(events) for events in requests))
    assert [r.stored for r in answers[0]] == [True, True]
    assert all(r.stored for r, _ in answers)
    shared = [request[1].stored for request in answers]
    assert shared == [n < 5 for n in range(20)]
    pending = await inbox.pending_events(limit=100)
    assert len(pending) == 25
    if hasattr(inbox, "round_trips"):  # PostgreSQL: fewer statements than requests
        assert inbox.round_trips - before < len(requests)
    again = await asyncio.gather(*(inbox.put_events(events) for events in requests[:3]))
    assert not any(r.stored for answer in again for r in answer)


async def test_raw_json_beyond_orjson_is_kept(inbox: EventInbox) -> None:
    raw = {"event": "bounce", "big": 2**70, "text": "ünïcode"}
    await inbox.put_events([_event("big", raw=raw)])
    [pending] = await inbox.pending_events()
    assert pending.event.raw == raw


async def test_events_name_their_message(inbox: EventInbox) -> None:
    spool = inbox
    message_id = await spool.put(  # type: ignore[attr-defined]
        Envelope("s@example.com", ("x@example.net",)), b"Subject: x\r\n\r\nx\r\n", provider="p"
    )
    results = await inbox.put_events(
        [_event("known", esprelay_id=message_id), _event("unknown", esprelay_id="nosuch")]
    )
    assert [r.message_id for r in results] == [message_id, None]
    assert [s.message_id for s in await inbox.pending_events()] == [message_id, None]


async def test_finish_and_purge(inbox: EventInbox) -> None:
    await inbox.put_events([_event("a"), _event("b")])
    a, b = await inbox.pending_events()
    assert await inbox.finish_events([a.seq]) == 1
    assert await inbox.finish_events([a.seq]) == 0
    assert [s.seq for s in await inbox.pending_events()] == [b.seq]
    assert await inbox.purge_events(processed_before=time.time() - 3600) == 0
    assert await inbox.purge_events(processed_before=time.time() + 3600) == 1
    # A purged event is forgotten: the ESP sending it again stores it again.
    assert [r.stored for r in await inbox.put_events([_event("a")])] == [True]


async def test_nothing_to_store(inbox: EventInbox) -> None:
    assert await inbox.put_events([]) == []
    assert await inbox.finish_events([]) == 0


async def test_events_survive_a_reopen(spool_url: str) -> None:
    await _empty(spool_url)
    spool = open_spool(spool_url, exclusive=True, owner="test")
    await spool.open()
    assert isinstance(spool, EventInbox)
    await spool.put_events([_event("a")])
    await spool.close()
    spool = open_spool(spool_url, exclusive=True, owner="test")
    await spool.open()
    try:
        assert isinstance(spool, EventInbox)
        [stored] = await spool.pending_events()
        assert stored.event == _event("a")
    finally:
        await spool.close()


async def test_postgres_migrates_a_version_1_schema(pg_url: str) -> None:
    """A database at the first schema (messages, no inbox) gets the inbox, its rows kept."""
    await _empty(pg_url)
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(
            "CREATE TABLE esprelay_schema (version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.execute(MIGRATIONS[0])
        await conn.execute("INSERT INTO esprelay_schema (version) VALUES (1)")
    finally:
        await conn.close()
    assert await migrate(pg_url) == (1, SCHEMA_VERSION)
    spool = open_spool(pg_url, auto_migrate=False)
    await spool.open()
    try:
        assert isinstance(spool, EventInbox)
        assert [r.stored for r in await spool.put_events([_event("a")])] == [True]
    finally:
        await spool.close()


async def test_sqlite_file_from_before_gets_the_inbox(tmp_path: Path) -> None:
    """A spool file written before the inbox existed gets its table at the next open."""
    import sqlite3

    path = tmp_path / "old.db"
    spool = open_spool(f"sqlite:///{path}", exclusive=True)
    await spool.open()
    await spool.close()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE event_inbox")
    conn.close()
    spool = open_spool(f"sqlite:///{path}", exclusive=True)
    await spool.open()
    try:
        assert isinstance(spool, EventInbox)
        assert [r.stored for r in await spool.put_events([_event("a")])] == [True]
    finally:
        await spool.close()
