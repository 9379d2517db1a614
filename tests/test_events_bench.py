"""bench.events still runs end to end (tiny counts, no timing assertions)."""

from __future__ import annotations

from bench.events import run


async def test_every_esp_stores_every_event() -> None:
    rows = await run(count=4, batch=3, concurrency=2)
    assert [row["esp"] for row in rows] == ["sendgrid", "mailgun", "ses", "postmark"]
    assert [row["stored"] for row in rows] == [12, 4, 4, 4]
    assert [row["events_per_request"] for row in rows] == [3, 1, 1, 1]
