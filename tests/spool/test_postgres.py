"""What only the shared PostgreSQL spool does: schema migration, NOTIFY wake-ups,
taking back its own leases, and turning an unreachable database into SpoolError."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys

import asyncpg
import pytest

from esprelay.errors import ConfigError, SpoolError
from esprelay.models import Envelope, MessageState
from esprelay.spool import open_spool, postgres
from esprelay.spool.base import NewPart
from esprelay.spool.postgres import BODY_CHUNK, SCHEMA_VERSION, PostgresSpool, migrate, redact_url
from tests.fakeclock import FakeClock
from tests.pgutil import with_database, with_port

ENVELOPE = Envelope(mail_from="app@example.com", rcpt_tos=("a@example.org",))


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


async def test_migrate_creates_schema_once(pg_url: str) -> None:
    await _empty(pg_url)
    assert await migrate(pg_url) == (0, SCHEMA_VERSION)
    assert await migrate(pg_url) == (SCHEMA_VERSION, SCHEMA_VERSION)


async def test_concurrent_migrations_do_not_race(pg_url: str) -> None:
    await _empty(pg_url)
    results = await asyncio.gather(*(migrate(pg_url) for _ in range(4)))
    assert sorted(results) == [(0, SCHEMA_VERSION)] + [(SCHEMA_VERSION, SCHEMA_VERSION)] * 3


async def test_without_auto_migrate_an_empty_database_is_refused(pg_url: str) -> None:
    await _empty(pg_url)
    spool = PostgresSpool(pg_url, auto_migrate=False)
    with pytest.raises(SpoolError, match="esprelay db upgrade"):
        await spool.open()
    await migrate(pg_url)
    await spool.open()
    await spool.close()


async def test_a_newer_schema_is_refused(pg_url: str) -> None:
    await _empty(pg_url)
    await migrate(pg_url)
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("INSERT INTO esprelay_schema (version) VALUES ($1)", SCHEMA_VERSION + 1)
    finally:
        await conn.close()
    with pytest.raises(SpoolError, match="newer than this esprelay"):
        await PostgresSpool(pg_url).open()
    await _empty(pg_url)


def test_db_upgrade_command(pg_url: str) -> None:
    asyncio.run(_empty(pg_url))
    env = {"ESPRELAY_SPOOL_URL": pg_url, "PATH": "/usr/bin:/bin"}
    run = [sys.executable, "-m", "esprelay", "db", "upgrade"]
    first = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert first.returncode == 0, first.stderr
    assert f"migrated from version 0 to {SCHEMA_VERSION}" in first.stdout
    again = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stdout


async def test_put_on_one_instance_wakes_listeners_on_another(pg_url: str) -> None:
    await _empty(pg_url)
    a = PostgresSpool(pg_url)
    b = PostgresSpool(pg_url)
    await a.open()
    await b.open()
    try:
        woken = asyncio.Event()
        b.add_listener(woken.set)
        # The listener fires once when it (re)connects: notifications may have been missed.
        await asyncio.wait_for(woken.wait(), timeout=10)
        woken.clear()
        await a.put(ENVELOPE, b"x", provider="outbox")
        await asyncio.wait_for(woken.wait(), timeout=10)
        # `esprelay queue retry` (retry_now) wakes the workers too.
        [leased] = await b.lease("w", 1, 60)
        await b.mark_retry(leased.id, owner="w", provider="outbox", error="e", next_attempt_at=1e12)
        woken.clear()
        assert await a.retry_now(leased.id)
        await asyncio.wait_for(woken.wait(), timeout=10)
    finally:
        await a.close()
        await b.close()


async def test_listener_reconnects_after_a_pause_on_its_clock(pg_url: str) -> None:
    await _empty(pg_url)
    clock = FakeClock()
    spool = PostgresSpool(pg_url, clock=clock)
    await spool.open()
    try:
        woken = asyncio.Event()
        spool.add_listener(woken.set)
        await asyncio.wait_for(woken.wait(), timeout=10)  # listening
        woken.clear()
        # The server ends the listening connection (a restart, an administrator).
        conn = await asyncpg.connect(pg_url, timeout=5)
        try:
            ended = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = 'esprelay'"
                " AND query LIKE 'LISTEN %'"
            )
        finally:
            await conn.close()
        assert ended == 1
        await asyncio.wait_for(clock.waiting(seconds=0.5), timeout=10)  # pausing
        assert not woken.is_set()
        clock.advance(0.5)
        # Listening again, and the callbacks run: notifications may have been missed.
        await asyncio.wait_for(woken.wait(), timeout=10)
    finally:
        await spool.close()


async def test_open_takes_back_only_its_own_leases(pg_url: str) -> None:
    await _empty(pg_url)
    spool = open_spool(pg_url)
    await spool.open()
    mine = await spool.put(ENVELOPE, b"1", provider="outbox")
    theirs = await spool.put(ENVELOPE, b"2", provider="outbox")
    await spool.lease("host:1", 1, 3600)
    await spool.lease("host:2", 1, 3600)
    await spool.close()

    # "host:1" restarts: its lease is released at once; "host:2" keeps its own.
    restarted = open_spool(pg_url, exclusive=True, owner="host:1")
    await restarted.open()
    try:
        again = await restarted.get(mine)
        other = await restarted.get(theirs)
        assert again is not None and other is not None
        assert again.state is MessageState.QUEUED
        assert other.state is MessageState.IN_FLIGHT
        assert other.lease_owner == "host:2"
        assert [m.id for m in await restarted.lease("host:1", 5, 60)] == [mine]
    finally:
        await restarted.close()


async def test_close_hands_back_its_own_leases(pg_url: str) -> None:
    await _empty(pg_url)
    spool = open_spool(pg_url, exclusive=True, owner="host:7")
    await spool.open()
    mine = await spool.put(ENVELOPE, b"1", provider="outbox")
    theirs = await spool.put(ENVELOPE, b"2", provider="outbox")
    await spool.lease("host:7", 1, 3600)
    await spool.lease("host:8", 1, 3600)
    await spool.close()

    other = open_spool(pg_url)
    await other.open()
    try:
        assert [m.id for m in await other.lease("host:9", 5, 60)] == [mine]
        still = await other.get(theirs)
        assert still is not None and still.lease_owner == "host:8"
    finally:
        await other.close()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres:secret@127.0.0.1:notaport/x",
        "postgresql://postgres@127.0.0.1:5432/x?sslmode=bogus",
    ],
)
async def test_bad_url_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigError, match="ESPRELAY_SPOOL_URL") as raised:
        await PostgresSpool(url).open()
    assert "secret" not in str(raised.value)
    with pytest.raises(ConfigError, match="ESPRELAY_SPOOL_URL"):
        await migrate(url)


async def test_delivered_message_keeps_no_body_rows(pg_url: str) -> None:
    await _empty(pg_url)
    spool = PostgresSpool(pg_url)
    await spool.open()
    try:
        message_id = await spool.put(ENVELOPE, b"x" * (2 * BODY_CHUNK + 5), provider="outbox")
        await spool.lease("w", 1, 60)
        assert await spool.mark_delivered(
            message_id, owner="w", provider="outbox", provider_message_id=None
        )
    finally:
        await spool.close()
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM esprelay_bodies") == 0
    finally:
        await conn.close()


MEMORY_PROBE = """
import asyncio, os, resource, sys
from esprelay.models import Envelope
from esprelay.spool.postgres import PostgresSpool

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

async def main(url):
    spool = PostgresSpool(url)
    await spool.open()
    envelope = Envelope("a@example.com", ("b@example.org",))
    await spool.put(envelope, b"warm-up", provider="outbox")
    await spool.lease("w", 1, 60)
    raw = os.urandom(25 * 1024 * 1024)
    base = peak_mb()
    await spool.put(envelope, raw, provider="outbox")
    after_put = peak_mb()
    [leased] = await spool.lease("w", 1, 60)
    after_lease = peak_mb()
    assert leased.raw == raw
    await spool.close()
    print(after_put - base, after_lease - after_put)

asyncio.run(main(sys.argv[1]))
"""


def test_large_message_costs_no_extra_copies(pg_url: str) -> None:
    """Peak memory of a fresh process storing, then leasing, a 25 MB message."""
    asyncio.run(_empty(pg_url))
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, pg_url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    put_growth, lease_growth = map(float, result.stdout.split())
    # One statement carrying the body costs about three copies (75 MB) in the driver
    # and asyncio; pieces cost a few MB.  A lease needs the one copy it returns.
    assert put_growth < 10, put_growth
    assert lease_growth < 25 * 1.4, lease_growth


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_database_is_a_spool_error(pg_url: str) -> None:
    url = with_port(pg_url, _closed_port())
    with pytest.raises(SpoolError, match="cannot reach the database"):
        await PostgresSpool(url).open()


async def test_missing_database_is_a_spool_error(pg_url: str) -> None:
    url = with_database(pg_url, "esprelay_test_does_not_exist")
    with pytest.raises(SpoolError, match="does not exist"):
        await PostgresSpool(url).open()


def test_password_never_shown() -> None:
    url = "postgresql://relay:s3cret@db.example:5432/mail"
    assert redact_url(url) == "postgresql://relay:***@db.example:5432/mail"
    assert "s3cret" not in repr(PostgresSpool(url))
    assert redact_url("postgresql://relay@db/mail") == "postgresql://relay@db/mail"


async def test_the_lease_scans_each_partial_index_in_order(pg_url: str) -> None:
    """With a backlog, claiming a few due messages reads a few index entries: an OR of
    the queued and the expired-lease conditions was served by neither partial index and
    scanned and sorted every due message at each lease."""
    await _empty(pg_url)
    spool = PostgresSpool(pg_url)
    await spool.open()
    try:
        envelope = Envelope("a@example.com", ("b@example.com",))
        for _ in range(20):
            await asyncio.gather(
                *(
                    spool.put_parts(b"Subject: s\r\n\r\nx\r\n", [NewPart(envelope, "outbox")])
                    for _ in range(100)
                )
            )
        assert len(await spool.lease("w", 10, 0.0)) == 10  # leases that expire at once
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute("ANALYZE esprelay_messages")
            transaction = conn.transaction()
            await transaction.start()
            plan = await conn.fetchval(
                f"EXPLAIN (ANALYZE, FORMAT JSON) {postgres._LEASE}", 10, "w2", 60.0
            )
            await transaction.rollback()  # EXPLAIN ANALYZE ran the UPDATE
        finally:
            await conn.close()
    finally:
        await spool.close()
    nodes: list[dict[str, object]] = []

    def walk(node: dict[str, object]) -> None:
        nodes.append(node)
        for child in node.get("Plans", []):  # type: ignore[attr-defined]
            walk(child)

    walk(json.loads(plan)[0]["Plan"])
    scans = {
        (n["Node Type"], n.get("Index Name")): n["Actual Rows"]
        for n in nodes
        if n.get("Relation Name") == "esprelay_messages" and "Scan" in str(n["Node Type"])
    }
    assert ("Index Scan", "esprelay_messages_due") in scans
    assert ("Index Scan", "esprelay_messages_lease") in scans
    # A few index entries read per scan, not the 1,990 due messages.
    assert all(rows <= 20 for rows in scans.values()), scans  # type: ignore[operator]
