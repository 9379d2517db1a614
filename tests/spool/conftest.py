"""Spool fixtures: every test here runs once per backend (SQLite and PostgreSQL), and
once more on SQLite with every body in a file of its own (``sqlite-files``: the files
that only large messages get otherwise, see ``esprelay.spool.sqlite.BODY_FILE_MIN``).

Time is driven, never waited for (``spool_clock``): an SQLite spool reads a fake clock,
and a PostgreSQL spool reads its server's, which the test "moves on" by moving every
stored time back instead."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from esprelay.spool import Spool, open_spool
from tests.fakeclock import FakeClock
from tests.pgutil import temporary_database

SpoolFactory = Callable[..., Awaitable[Spool]]


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """One database per test module; each test starts from an empty schema."""
    with temporary_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "sqlite-files", "postgresql"])
def spool_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite-files":
        monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
        monkeypatch.setattr("esprelay.spool.sqlite.BODY_FILE_MIN", 1)
    if request.param.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'spool.db'}"
    return str(request.getfixturevalue("pg_url"))


async def _reset_postgres(url: str) -> None:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(
            "DROP TABLE IF EXISTS esprelay_message_timeline, esprelay_message_recipients,"
            " esprelay_events, esprelay_attempts, esprelay_bodies,"
            " esprelay_messages, esprelay_schema"
        )
    finally:
        await conn.close()


class SpoolClock:
    """The time as the spools under test see it, and the means to move it on."""

    def __init__(self, url: str) -> None:
        self.url = url
        # Started at the real time: the PostgreSQL half of a test reads the real one.
        self.fake = None if url.startswith("postgresql") else FakeClock(start=time.time())
        self._conn: asyncpg.Connection | None = None

    def time(self) -> float:
        return time.time() if self.fake is None else self.fake.time()

    async def advance(self, seconds: float) -> None:
        if self.fake is not None:
            self.fake.advance(seconds)
            return
        # The server's clock cannot be moved: every time it is compared with goes back.
        if self._conn is None:
            self._conn = await asyncpg.connect(self.url, timeout=5)
        async with self._conn.transaction():
            await self._conn.execute(
                "UPDATE esprelay_messages SET created_at = created_at - $1,"
                " updated_at = updated_at - $1, next_attempt_at = next_attempt_at - $1,"
                " lease_expires_at = lease_expires_at - $1",
                seconds,
            )
            await self._conn.execute("UPDATE esprelay_attempts SET at = at - $1", seconds)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


@pytest.fixture
async def spool_clock(spool_url: str) -> AsyncIterator[SpoolClock]:
    clock = SpoolClock(spool_url)
    yield clock
    await clock.close()


@pytest.fixture
async def spool_factory(spool_url: str, spool_clock: SpoolClock) -> AsyncIterator[SpoolFactory]:
    """Open spools on the same store, as separate processes would; all closed at the end."""
    if spool_url.startswith("postgresql"):
        await _reset_postgres(spool_url)
    opened: list[Spool] = []

    async def make(**options: object) -> Spool:
        if spool_clock.fake is not None:
            options.setdefault("clock", spool_clock.fake)
        spool = open_spool(spool_url, **options)  # type: ignore[arg-type]
        await spool.open()
        opened.append(spool)
        return spool

    yield make
    for spool in opened:
        await spool.close()


@pytest.fixture
async def spool(spool_factory: SpoolFactory) -> Spool:
    return await spool_factory()
