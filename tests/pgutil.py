"""Throw-away PostgreSQL databases for tests, on the local server (127.0.0.1:5432).

``ESPRELAY_TEST_PG_ADMIN_URL`` names the maintenance database to connect to
(default ``postgresql://postgres@127.0.0.1:5432/postgres``).  Every test database
is ``esprelay_test_<random>`` and is dropped afterwards, whatever happened.  Without
a reachable server the tests skip, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.conftest import IN_CI

ADMIN_URL = os.environ.get(
    "ESPRELAY_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    host = parts.hostname or "127.0.0.1"
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def server_address() -> tuple[str, int]:
    parts = urlsplit(ADMIN_URL)
    return parts.hostname or "127.0.0.1", parts.port or 5432


async def _admin(statement: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL, timeout=5)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def require_postgres() -> None:
    """Skip (or fail under CI=true) when the PostgreSQL server cannot be reached."""
    try:
        asyncio.run(_admin("SELECT 1"))
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        message = (
            f"PostgreSQL is not reachable at {urlsplit(ADMIN_URL).netloc}"
            f" ({type(exc).__name__}: {exc}); `make test` starts the local cluster"
        )
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@contextlib.contextmanager
def temporary_database() -> Iterator[str]:
    """Create ``esprelay_test_<random>``; yield its URL; drop it (even if still in use)."""
    require_postgres()
    name = f"esprelay_test_{secrets.token_hex(6)}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield with_database(ADMIN_URL, name)
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
