"""bench.events still runs end to end (tiny counts, no timing assertions)."""

from __future__ import annotations

from bench.events import end_to_end, verify


async def test_every_source_verifies_every_request() -> None:
    rows = await verify(count=4, batch=3)
    assert [row["esp"] for row in rows] == ["sendgrid", "mailgun", "ses", "postmark"]
    assert [row["events_per_request"] for row in rows] == [3, 1, 1, 1]


def test_a_served_listener_stores_and_applies_every_event() -> None:
    # A real `esprelay serve` (unpinned), its SQLite spool, its processor.
    for scenario, requests, events in (("sendgrid:3", 4, 12), ("mailgun:1", 5, 5)):
        figures = end_to_end(scenario, requests=requests, concurrency=2, spool="sqlite", cpus=None)
        assert (figures.errors, figures.error_samples) == (0, [])
        assert figures.stored == events
        # Each event named a message of the spool: applied to its timeline.
        assert figures.applied == events
