"""Spool fixtures: every test here runs once per backend (SQLite and PostgreSQL), and
once more on SQLite with every body in a file of its own (``sqlite-files``: the files
that only large messages get otherwise, see ``esprelay.spool.sqlite.BODY_FILE_MIN``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from esprelay.spool import Spool, open_spool
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
            "DROP TABLE IF EXISTS esprelay_attempts, esprelay_bodies, esprelay_messages,"
            " esprelay_schema"
        )
    finally:
        await conn.close()


@pytest.fixture
async def spool_factory(spool_url: str) -> AsyncIterator[SpoolFactory]:
    """Open spools on the same store, as separate processes would; all closed at the end."""
    if spool_url.startswith("postgresql"):
        await _reset_postgres(spool_url)
    opened: list[Spool] = []

    async def make(**options: object) -> Spool:
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
