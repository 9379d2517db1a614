"""A relay on the PostgreSQL spool, many SMTP sessions at once: every message gets its
250 only once stored, every one is delivered once, and /metrics counts the spool's
round trips (its group commit shares them between messages)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import pytest

from tests.opshttp import scrape, send, value
from tests.pgutil import temporary_database
from tests.relayproc import RelayProcess

MESSAGES = 40
SESSIONS = 10


@pytest.fixture
def pg_url() -> Iterator[str]:
    with temporary_database() as url:
        yield url


async def _states(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        rows = await conn.fetch("SELECT state, count(*) FROM esprelay_messages GROUP BY state")
    finally:
        await conn.close()
    return {row[0]: row[1] for row in rows}


async def test_concurrent_sessions_through_the_postgresql_spool(
    relay_factory: type[RelayProcess], pg_url: str
) -> None:
    relay = relay_factory({"ESPRELAY_SPOOL_URL": pg_url}).start()
    with ThreadPoolExecutor(SESSIONS) as pool:
        ids = list(pool.map(lambda n: send(relay, subject=f"m{n}"), range(MESSAGES)))
    assert len(set(ids)) == MESSAGES
    relay.wait_for_log(r"delivered id=", count=MESSAGES)
    delivered = sorted(path.stem for path in relay.outbox.glob("*.json"))
    assert delivered == sorted(ids)
    assert await _states(pg_url) == {"delivered": MESSAGES}
    samples = scrape(relay)
    # Counted: at least a statement for the first message in and its outcome.
    assert value(samples, "esprelay_spool_round_trips_total") >= 2
