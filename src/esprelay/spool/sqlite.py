"""The embedded spool: one SQLite file in WAL mode with ``synchronous=FULL``.

Every operation goes to one writer thread.  The thread takes whatever operations are
waiting, runs them in one transaction (each inside its own SAVEPOINT, so one bad
operation does not spoil its neighbours), commits once and only then resolves their
futures: *group commit*.  Twenty sessions finishing DATA at the same moment cost one
fsync, and still no ``250`` is sent before the message is on disk.

An SQLite spool belongs to one ``serve`` process at a time (an exclusive lock file
beside the database), so on start any message left ``in_flight`` by a killed process
is made due again at once.  ``esprelay queue`` opens the same file without the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from esprelay.errors import SpoolError, SpoolFull
from esprelay.models import Attempt, Envelope, MessageState, SpooledMessage
from esprelay.spool.base import NewPart, SpoolStats, new_message_id

log = logging.getLogger(__name__)

T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], Any]

SCHEMA_VERSION = 1
MAX_BATCH = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    mail_from TEXT NOT NULL,
    rcpt_tos TEXT NOT NULL,
    size INTEGER NOT NULL,
    raw BLOB,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_owner TEXT,
    lease_expires_at REAL,
    last_error TEXT,
    provider TEXT NOT NULL,
    provider_message_id TEXT,
    meta TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS messages_due ON messages (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS messages_lease ON messages (state, lease_expires_at);
CREATE TABLE IF NOT EXISTS attempts (
    message_id TEXT NOT NULL,
    number INTEGER NOT NULL,
    at REAL NOT NULL,
    provider TEXT NOT NULL,
    outcome TEXT NOT NULL,
    error TEXT,
    provider_message_id TEXT,
    PRIMARY KEY (message_id, number)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_COLUMNS = (
    "id, created_at, updated_at, mail_from, rcpt_tos, size, state, attempts, next_attempt_at,"
    " lease_owner, lease_expires_at, last_error, provider, provider_message_id, meta"
)


def path_from_url(url: str) -> Path:
    """``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` to a Path."""
    if not url.startswith("sqlite:///"):
        raise SpoolError(f"not an SQLite spool URL: {url.split(':', 1)[0]}:...")
    return Path(url.removeprefix("sqlite:///"))


@contextlib.contextmanager
def _translate_errors() -> Any:
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc).lower()
        if "full" in text or "disk i/o" in text:
            raise SpoolFull(f"spool storage problem: {exc}") from exc
        raise SpoolError(f"spool error: {exc}") from exc
    except sqlite3.Error as exc:
        raise SpoolError(f"spool error: {exc}") from exc


class SqliteSpool:
    def __init__(self, path: str | Path, *, exclusive: bool = False) -> None:
        self.path = Path(path)
        self.exclusive = exclusive
        self._queue: queue.SimpleQueue[tuple[Operation, Future[Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None
        self._closed = False

    # region lifecycle

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.exclusive:
            self._take_lock()
        ready: Future[None] = Future()
        self._thread = threading.Thread(
            target=self._writer, args=(ready,), name="esprelay-spool", daemon=True
        )
        self._thread.start()
        await asyncio.wrap_future(ready)
        if self.exclusive:
            recovered = await self._run(self._recover)
            if recovered:
                log.warning(
                    "spool: %d message(s) left in flight by a previous run are due again", recovered
                )

    async def close(self) -> None:
        if self._thread is None or self._closed:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _take_lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolError(
                f"spool {self.path} is in use by another esprelay process"
                " (an SQLite spool serves one instance; use PostgreSQL to share one)"
            ) from None
        self._lock_fd = fd

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    # endregion
    # region writer thread

    def _writer(self, ready: Future[None]) -> None:
        try:
            conn = self._connect()
            conn.executescript(_SCHEMA)
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
        except sqlite3.Error as exc:
            ready.set_exception(SpoolError(f"cannot open spool {self.path}: {exc}"))
            return
        ready.set_result(None)
        stop = False
        while not stop:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < MAX_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._run_batch(conn, batch)
        conn.close()

    def _run_batch(
        self, conn: sqlite3.Connection, batch: list[tuple[Operation, Future[Any]]]
    ) -> None:
        results: list[tuple[Future[Any], Any, Exception | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for number, (operation, future) in enumerate(batch):
                savepoint = f"op{number}"
                conn.execute(f"SAVEPOINT {savepoint}")
                try:
                    with _translate_errors():
                        value = operation(conn)
                except Exception as exc:  # noqa: BLE001 - handed to the caller's future
                    conn.execute(f"ROLLBACK TO {savepoint}")
                    conn.execute(f"RELEASE {savepoint}")
                    results.append((future, None, exc))
                else:
                    conn.execute(f"RELEASE {savepoint}")
                    results.append((future, value, None))
            with _translate_errors():
                conn.execute("COMMIT")
        except Exception as exc:  # noqa: BLE001 - every waiting caller gets the error
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            failure = exc if isinstance(exc, SpoolError) else SpoolError(f"spool error: {exc}")
            for _, future in batch:
                if not future.done():
                    future.set_exception(failure)
            return
        for future, value, error in results:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)

    async def _run(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        if self._thread is None or self._closed:
            raise SpoolError("spool is not open")
        future: Future[T] = Future()
        self._queue.put((operation, future))
        return await asyncio.wrap_future(future)

    # endregion
    # region operations

    async def put(
        self,
        envelope: Envelope,
        raw: bytes,
        *,
        provider: str,
        meta: dict[str, Any] | None = None,
    ) -> str:
        [message_id] = await self.put_parts(raw, [NewPart(envelope, provider, meta or {})])
        return message_id

    async def put_parts(
        self,
        raw: bytes,
        parts: Sequence[NewPart],
        *,
        lease_owner: str | None = None,
        lease_time: float = 0.0,
    ) -> list[str]:
        now = time.time()
        state = MessageState.IN_FLIGHT if lease_owner else MessageState.QUEUED
        expires = now + lease_time if lease_owner else None
        rows = []
        for part in parts:
            rows.append(
                (
                    new_message_id(now),
                    now,
                    now,
                    part.envelope.mail_from,
                    json.dumps(list(part.envelope.rcpt_tos)),
                    len(raw),
                    raw,
                    state.value,
                    now,
                    lease_owner,
                    expires,
                    part.provider,
                    json.dumps(part.meta),
                )
            )

        def insert(conn: sqlite3.Connection) -> list[str]:
            conn.executemany(
                "INSERT INTO messages (id, created_at, updated_at, mail_from, rcpt_tos, size,"
                " raw, state, next_attempt_at, lease_owner, lease_expires_at, provider, meta)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            return [row[0] for row in rows]

        return await self._run(insert)

    async def lease(self, owner: str, limit: int, lease_time: float) -> list[SpooledMessage]:
        if limit <= 0:
            return []

        def claim(conn: sqlite3.Connection) -> list[SpooledMessage]:
            now = time.time()
            rows = conn.execute(
                f"UPDATE messages SET state = ?, lease_owner = ?, lease_expires_at = ?,"
                f" updated_at = ? WHERE id IN (SELECT id FROM messages"
                f" WHERE (state = ? AND next_attempt_at <= ?)"
                f" OR (state = ? AND lease_expires_at <= ?)"
                f" ORDER BY next_attempt_at LIMIT ?) RETURNING {_COLUMNS}, raw",
                (
                    MessageState.IN_FLIGHT.value,
                    owner,
                    now + lease_time,
                    now,
                    MessageState.QUEUED.value,
                    now,
                    MessageState.IN_FLIGHT.value,
                    now,
                    limit,
                ),
            ).fetchall()
            messages = [_row_to_message(row[:-1], raw=row[-1]) for row in rows]
            messages.sort(key=lambda m: (m.next_attempt_at, m.id))
            return messages

        return await self._run(claim)

    def _finish(
        self,
        id: str,
        owner: str,
        provider: str,
        *,
        state: MessageState,
        outcome: str,
        error: str | None,
        provider_message_id: str | None,
        next_attempt_at: float | None,
        drop_body: bool,
    ) -> Operation:
        def update(conn: sqlite3.Connection) -> bool:
            now = time.time()
            row = conn.execute(
                "SELECT attempts FROM messages WHERE id = ? AND state = ? AND lease_owner = ?",
                (id, MessageState.IN_FLIGHT.value, owner),
            ).fetchone()
            if row is None:
                return False
            attempts = row[0] + 1
            conn.execute(
                "UPDATE messages SET state = ?, attempts = ?, updated_at = ?, lease_owner = NULL,"
                " lease_expires_at = NULL, last_error = ?, provider = ?,"
                " provider_message_id = COALESCE(?, provider_message_id),"
                " next_attempt_at = COALESCE(?, next_attempt_at)"
                + (", raw = NULL" if drop_body else "")
                + " WHERE id = ?",
                (
                    state.value,
                    attempts,
                    now,
                    error,
                    provider,
                    provider_message_id,
                    next_attempt_at,
                    id,
                ),
            )
            conn.execute(
                "INSERT OR REPLACE INTO attempts (message_id, number, at, provider, outcome,"
                " error, provider_message_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (id, attempts, now, provider, outcome, error, provider_message_id),
            )
            return True

        return update

    async def mark_delivered(
        self, id: str, *, owner: str, provider: str, provider_message_id: str | None
    ) -> bool:
        return bool(
            await self._run(
                self._finish(
                    id,
                    owner,
                    provider,
                    state=MessageState.DELIVERED,
                    outcome="delivered",
                    error=None,
                    provider_message_id=provider_message_id,
                    next_attempt_at=None,
                    drop_body=True,
                )
            )
        )

    async def mark_retry(
        self, id: str, *, owner: str, provider: str, error: str, next_attempt_at: float
    ) -> bool:
        return bool(
            await self._run(
                self._finish(
                    id,
                    owner,
                    provider,
                    state=MessageState.QUEUED,
                    outcome="deferred",
                    error=error,
                    provider_message_id=None,
                    next_attempt_at=next_attempt_at,
                    drop_body=False,
                )
            )
        )

    async def mark_failed(self, id: str, *, owner: str, provider: str, error: str) -> bool:
        return bool(
            await self._run(
                self._finish(
                    id,
                    owner,
                    provider,
                    state=MessageState.FAILED,
                    outcome="failed",
                    error=error,
                    provider_message_id=None,
                    next_attempt_at=None,
                    drop_body=False,
                )
            )
        )

    async def get(self, id: str, *, with_body: bool = False) -> SpooledMessage | None:
        def select(conn: sqlite3.Connection) -> SpooledMessage | None:
            columns = _COLUMNS + (", raw" if with_body else ", NULL")
            row = conn.execute(f"SELECT {columns} FROM messages WHERE id = ?", (id,)).fetchone()
            if row is None:
                return None
            history = tuple(
                Attempt(*attempt)
                for attempt in conn.execute(
                    "SELECT number, at, provider, outcome, error, provider_message_id"
                    " FROM attempts WHERE message_id = ? ORDER BY number",
                    (id,),
                )
            )
            return _row_to_message(row[:-1], raw=row[-1], history=history)

        return await self._run(select)

    async def list(
        self, *, state: MessageState | None = None, limit: int = 100
    ) -> list[SpooledMessage]:
        def select(conn: sqlite3.Connection) -> list[SpooledMessage]:
            if state is None:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM messages ORDER BY created_at, id LIMIT ?", (limit,)
                )
            else:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM messages WHERE state = ?"
                    " ORDER BY created_at, id LIMIT ?",
                    (state.value, limit),
                )
            return [_row_to_message(row) for row in rows]

        return await self._run(select)

    async def retry_now(self, id: str) -> bool:
        def update(conn: sqlite3.Connection) -> bool:
            now = time.time()
            cursor = conn.execute(
                "UPDATE messages SET state = ?, next_attempt_at = ?, updated_at = ?,"
                " created_at = CASE WHEN state = ? THEN ? ELSE created_at END"
                " WHERE id = ? AND state IN (?, ?) AND raw IS NOT NULL",
                (
                    MessageState.QUEUED.value,
                    now,
                    now,
                    # A failed message retried by hand gets a fresh queue lifetime.
                    MessageState.FAILED.value,
                    now,
                    id,
                    MessageState.QUEUED.value,
                    MessageState.FAILED.value,
                ),
            )
            return cursor.rowcount > 0

        return await self._run(update)

    async def delete(self, id: str) -> bool:
        def remove(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute("DELETE FROM messages WHERE id = ?", (id,))
            conn.execute("DELETE FROM attempts WHERE message_id = ?", (id,))
            return cursor.rowcount > 0

        return await self._run(remove)

    async def stats(self) -> SpoolStats:
        def select(conn: sqlite3.Connection) -> SpoolStats:
            counts = {
                MessageState(state): count
                for state, count in conn.execute(
                    "SELECT state, COUNT(*) FROM messages GROUP BY state"
                )
            }
            oldest = conn.execute(
                "SELECT MIN(created_at) FROM messages WHERE state IN (?, ?)",
                (MessageState.QUEUED.value, MessageState.IN_FLIGHT.value),
            ).fetchone()[0]
            return SpoolStats(counts=counts, oldest_queued_at=oldest)

        return await self._run(select)

    async def next_due(self) -> float | None:
        def select(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT MIN(t) FROM (SELECT MIN(next_attempt_at) AS t FROM messages WHERE state = ?"
                " UNION ALL SELECT MIN(lease_expires_at) FROM messages WHERE state = ?)",
                (MessageState.QUEUED.value, MessageState.IN_FLIGHT.value),
            ).fetchone()
            return None if row is None else row[0]

        return await self._run(select)

    async def purge(self, *, delivered_before: float, failed_before: float) -> int:
        def remove(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "DELETE FROM messages WHERE (state = ? AND updated_at < ?)"
                " OR (state = ? AND updated_at < ?) RETURNING id",
                (
                    MessageState.DELIVERED.value,
                    delivered_before,
                    MessageState.FAILED.value,
                    failed_before,
                ),
            )
            ids = [row[0] for row in cursor.fetchall()]
            conn.executemany("DELETE FROM attempts WHERE message_id = ?", [(i,) for i in ids])
            return len(ids)

        return await self._run(remove)

    @staticmethod
    def _recover(conn: sqlite3.Connection) -> int:
        cursor = conn.execute(
            "UPDATE messages SET state = ?, lease_owner = NULL, lease_expires_at = NULL"
            " WHERE state = ?",
            (MessageState.QUEUED.value, MessageState.IN_FLIGHT.value),
        )
        return cursor.rowcount

    # endregion


def _row_to_message(
    row: tuple[Any, ...], *, raw: bytes | None = None, history: tuple[Attempt, ...] = ()
) -> SpooledMessage:
    (
        id,
        created_at,
        updated_at,
        mail_from,
        rcpt_tos,
        size,
        state,
        attempts,
        next_attempt_at,
        lease_owner,
        lease_expires_at,
        last_error,
        provider,
        provider_message_id,
        meta,
    ) = row
    return SpooledMessage(
        id=id,
        envelope=Envelope(mail_from=mail_from, rcpt_tos=tuple(json.loads(rcpt_tos))),
        size=size,
        state=MessageState(state),
        attempts=attempts,
        created_at=created_at,
        next_attempt_at=next_attempt_at,
        provider=provider,
        raw=bytes(raw) if raw is not None else None,
        last_error=last_error,
        provider_message_id=provider_message_id,
        lease_owner=lease_owner,
        lease_expires_at=lease_expires_at,
        updated_at=updated_at,
        history=history,
        meta=json.loads(meta),
    )
