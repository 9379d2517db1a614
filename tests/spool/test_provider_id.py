"""Finding a message by the id its ESP's send answered, in both backends: for the events
that carry no esprelay id, and for the inbox, which names their message by it."""

from __future__ import annotations

import sqlite3
from typing import Any

import asyncpg

from esprelay.events.model import Event, EventInbox
from esprelay.models import Envelope, MessageState
from esprelay.spool import Spool
from tests.spool.conftest import SpoolClock

ENVELOPE = Envelope("sender@example.com", ("rcpt@example.net",))


async def delivered(spool: Spool, provider: str, provider_message_id: str | None) -> str:
    message_id = await spool.put(ENVELOPE, b"Subject: x\r\n\r\nx\r\n", provider=provider)
    [leased] = await spool.lease("w1", 1, 60)
    assert leased.id == message_id
    assert await spool.mark_delivered(
        message_id, owner="w1", provider=provider, provider_message_id=provider_message_id
    )
    return message_id


def find(spool: Spool) -> Any:
    method = spool.find_by_provider_message_id  # type: ignore[attr-defined]
    return method


async def test_found_by_provider_and_its_id(spool: Spool) -> None:
    ses = await delivered(spool, "ses", "0102018c-aaaa")
    eu = await delivered(spool, "ses-eu", "0102018c-bbbb")
    await delivered(spool, "outbox", None)
    found = await find(spool)("ses", "0102018c-aaaa")
    assert found is not None and found.id == ses
    assert found.state is MessageState.DELIVERED and found.raw is None
    assert found.provider_message_id == "0102018c-aaaa"
    assert (await find(spool)("ses-eu", "0102018c-bbbb")).id == eu
    # The id of another provider, an unknown id: nothing.
    assert await find(spool)("ses", "0102018c-bbbb") is None
    assert await find(spool)("ses", "nosuch") is None


async def test_the_newest_when_an_esp_gives_one_id_twice(
    spool: Spool, spool_clock: SpoolClock
) -> None:
    await delivered(spool, "sendgrid", "same")
    await spool_clock.advance(1)
    newer = await delivered(spool, "sendgrid", "same")
    found = await find(spool)("sendgrid", "same")
    assert found is not None and found.id == newer


async def test_inbox_names_the_message_of_an_event_without_esprelay_id(spool: Spool) -> None:
    assert isinstance(spool, EventInbox)
    ours = await delivered(spool, "ses", "0102018c-cccc")
    other = await delivered(spool, "ses", "0102018c-dddd")

    def event(event_id: str, **kw: Any) -> Event:
        return Event("ses", event_id, kind="bounced", recipient=None, at=1.0, **kw)

    results = await spool.put_events(
        [
            event("by-esp-id", esp_message_id="0102018c-cccc"),
            # esprelay's id wins over the ESP's when both are there.
            event("both", esprelay_id=other, esp_message_id="0102018c-cccc"),
            event("unknown-esprelay-id", esprelay_id="nosuch", esp_message_id="0102018c-cccc"),
            event("unknown", esp_message_id="nosuch"),
            # The same ESP id from another provider names none of these.
            Event("mailgun", "x", kind="bounced", recipient=None, at=1.0,
                  esp_message_id="0102018c-cccc"),
        ]
    )  # fmt: skip
    assert [r.message_id for r in results] == [ours, other, ours, None, None]


async def test_lookup_uses_its_index(spool: Spool, spool_url: str) -> None:
    if not spool_url.startswith("postgresql"):
        path = spool_url.removeprefix("sqlite:///")
        with sqlite3.connect(path) as db:
            plan = " ".join(
                str(row[-1])
                for row in db.execute(
                    "EXPLAIN QUERY PLAN SELECT id FROM messages WHERE provider = ?"
                    " AND provider_message_id = ? ORDER BY created_at DESC, id DESC LIMIT 1",
                    ("ses", "x"),
                )
            )
        db.close()
        assert "messages_provider_message_id" in plan
        return
    conn = await asyncpg.connect(spool_url)
    try:
        await conn.execute("SET enable_seqscan = off")
        rows = await conn.fetch(
            "EXPLAIN SELECT id FROM esprelay_messages WHERE provider = 'ses'"
            " AND provider_message_id = 'x' ORDER BY created_at DESC, id DESC LIMIT 1"
        )
        plan = " ".join(row[0] for row in rows)
    finally:
        await conn.close()
    assert "esprelay_messages_provider_message_id" in plan
