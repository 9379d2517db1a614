"""Per-recipient status and timeline kept with the message, in both spool backends."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from esprelay.events.model import Event
from esprelay.events.status import MessageStatusStore
from esprelay.models import Envelope
from esprelay.spool import NewPart, Spool, open_spool
from tests.pgutil import temporary_database

RAW = b"From: a@example.com\r\nMessage-ID: <m1@example.com>\r\nSubject: hi\r\n\r\nbody\r\n"


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with temporary_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def spool_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'spool.db'}"
    return str(request.getfixturevalue("pg_url"))


async def empty_postgres(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "DROP TABLE IF EXISTS esprelay_message_timeline, esprelay_message_recipients,"
            " esprelay_events, esprelay_attempts, esprelay_bodies, esprelay_messages,"
            " esprelay_schema"
        )
    finally:
        await conn.close()


@pytest.fixture
async def spool(spool_url: str) -> AsyncIterator[Any]:
    url = spool_url
    if url.startswith("postgresql"):
        await empty_postgres(url)
    opened = open_spool(url, exclusive=True)
    await opened.open()
    try:
        assert isinstance(opened, MessageStatusStore)
        yield opened
    finally:
        await opened.close()


async def put(spool: Spool, rcpts: tuple[str, ...] = ("r@example.net",), **meta: Any) -> str:
    [id] = await spool.put_parts(
        RAW, [NewPart(Envelope("a@example.com", rcpts), "outbox", {"route": "default", **meta})]
    )
    return id


def event(kind: str, event_id: str, at: float, **kw: Any) -> Event:
    return Event(
        provider="sendgrid",
        provider_event_id=event_id,
        kind=kind,  # type: ignore[arg-type]
        recipient=kw.pop("recipient", "r@example.net"),
        at=at,
        **kw,
    )


async def test_apply_is_idempotent_and_keeps_the_latest_status(spool: Any) -> None:
    id = await put(spool)
    now = time.time()
    deferred = event("deferred", "e1", now, smtp_status="4.2.2", diagnostic="452 full")
    first = await spool.apply_event(id, "r@example.net", deferred)
    assert (first.new, first.changed, first.dsn) == (True, True, False)
    again = await spool.apply_event(id, "r@example.net", deferred)
    assert (again.new, again.changed) == (False, False)
    bounced = event("bounced", "e2", now + 2, smtp_status="5.1.1", remote_mta="mx.example.net")
    assert (await spool.apply_event(id, "r@example.net", bounced)).changed
    # Older than the status it would replace: in the timeline only.
    late = event("deferred", "e3", now + 1, smtp_status="4.0.0")
    applied = await spool.apply_event(id, "r@example.net", late)
    assert (applied.new, applied.changed) == (True, False)
    opened = event("opened", "e4", now + 3)
    assert (await spool.apply_event(id, "r@example.net", opened)).changed is False

    status = await spool.message_status(id)
    [recipient] = status.recipients
    assert recipient.status.kind == "bounced"
    assert recipient.status.smtp_status == "5.1.1"
    assert recipient.status.remote_mta == "mx.example.net"
    assert [e.event_id for e in status.timeline] == ["e1", "e3", "e2", "e4"]


async def test_a_dsn_is_claimed_once_per_kind_and_can_be_given_back(spool: Any) -> None:
    id = await put(spool)
    now = time.time()
    assert (
        await spool.apply_event(id, "r@example.net", event("bounced", "b1", now), dsn="failure")
    ).dsn
    second = await spool.apply_event(
        id, "r@example.net", event("bounced", "b2", now + 1), dsn="failure"
    )
    assert second.dsn is False
    await spool.release_dsn(id, "r@example.net", "failure")
    assert (
        await spool.apply_event(id, "r@example.net", event("bounced", "b2", now + 1), dsn="failure")
    ).dsn
    status = await spool.message_status(id)
    assert status.recipients[0].dsn_sent == ("failure",)


async def test_unknown_message_and_purge_take_the_status_along(spool: Any) -> None:
    assert await spool.apply_event("nope", "r@example.net", event("bounced", "x", 1.0)) is None
    id = await put(spool)
    await spool.apply_event(id, "r@example.net", event("delivered", "d", time.time()))
    assert await spool.delete(id)
    status = await spool.message_status(id)
    assert status.recipients == () and status.timeline == ()


async def test_search_and_find_by_provider_message_id(spool: Any) -> None:
    first = await put(
        spool, ("One@Example.net", "two@example.net"), message_id_header="m1@example.com"
    )
    second = await put(spool, ("three@example.net",), message_id_header="m2@example.com")
    found = await spool.search_messages(header_message_id="m1@example.com")
    assert [m.id for m in found] == [first]
    found = await spool.search_messages(recipient="one@example.NET")
    assert [m.id for m in found] == [first]
    assert [m.id for m in await spool.search_messages(since=time.time() + 60)] == []
    assert {m.id for m in await spool.search_messages(until=time.time() + 60)} == {first, second}
    [leased] = await spool.lease("w", 1, 60)
    assert await spool.mark_delivered(
        leased.id, owner="w", provider="outbox", provider_message_id="esp-1"
    )
    message = await spool.find_by_provider_message_id("outbox", "esp-1")
    assert message is not None and message.id == leased.id
    assert await spool.find_by_provider_message_id("outbox", "esp-2") is None
    assert await spool.find_by_provider_message_id("sendgrid", "esp-1") is None
