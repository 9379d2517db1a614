"""The embedded spool: one SQLite file in WAL mode with ``synchronous=FULL``.

Every operation goes to one writer thread.  The thread takes whatever operations are
waiting, runs them in one transaction, commits once and only then resolves their
futures (with one wake-up of the event loop per batch): *group commit*.  Twenty
sessions finishing DATA at the same moment cost one fsync, and still no ``250`` is sent
before the message is on disk.

A batch of nothing but leases and delivery outcomes is committed without an fsync
(``synchronous=NORMAL``): losing it in a crash means a message delivered or tried
again, never one lost, and the next batch that takes a message in syncs it along
(see ``_run_batch``).

One bad operation does not spoil its neighbours: when one raises, the transaction is
rolled back and the batch runs again with each operation inside its own SAVEPOINT, so
the others commit and only that one fails.  A SAVEPOINT per operation on every batch
cost more than the operations themselves; failures are rare, so only they pay for it.

A body of ``BODY_FILE_MIN`` bytes or more is kept in a file of its own in a folder
beside the database (``spool.db.bodies/<id>``), written and fsync'd before the commit
of its row, which only says so (``body_file``).  In the database it would be written
twice, to the WAL and then by a checkpoint into the database file, and its pages freed
again at delivery: ~18 ms of CPU for 5 MB, the most expensive part of such a message.
A file is written once and removed once its delivery is on disk.  After a crash, a file
without a row (written, its row never committed; or delivered, not yet removed) goes at
the next exclusive open; a row whose file is missing is failed, with that as its error,
when it comes up for delivery.

An SQLite spool belongs to one ``serve`` process at a time (an exclusive lock file
beside the database), so on start any message left ``in_flight`` by a killed process
is made due again at once.  ``esprelay queue`` opens the same file without the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import orjson

from esprelay.clock import SYSTEM_CLOCK, Clock
from esprelay.errors import SpoolError, SpoolFull
from esprelay.events.model import Event, InboxResult, StoredEvent
from esprelay.events.rows import EVENT_COLUMNS, event_row, stored_event
from esprelay.events.status import (
    ENTRY_COLUMNS,
    STATUS_KINDS,
    Application,
    Applied,
    MessageStatus,
    RecipientStatus,
    dsn_words,
    entry,
    entry_row,
)
from esprelay.models import Attempt, Envelope, MessageState, SpooledMessage
from esprelay.spill import Spilled, storage_error, sync_directory
from esprelay.spool.base import (
    NewPart,
    OnePartPut,
    SpoolStats,
    new_message_id,
    within_bytes,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], Any]
# An operation, the future its caller awaits, that caller's event loop, and whether
# the operation's commit must be on disk before the caller hears of it (``_run``).
_Item = tuple[Operation, "asyncio.Future[Any]", asyncio.AbstractEventLoop, bool]

# 2: the indexes cover only the rows a query looks for (see _SCHEMA); _migrate.
# 3: large bodies in files beside the database (``body_file``, see the module doc).
# 4: ``held`` (esprelay queue hold/release): a held message is never leased.
SCHEMA_VERSION = 4
#: Bodies this large or larger go to a file of their own (see the module doc).  Below
#: ~100 KB SQLite reads and writes a blob faster than the file system does
#: (https://www.sqlite.org/intern-v-extern-blob.html); a typical message stays inline.
BODY_FILE_MIN = 256 * 1024
MAX_BATCH = 256
PAGE_SIZE = 8192

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
    meta TEXT NOT NULL DEFAULT '{}',
    body_file INTEGER NOT NULL DEFAULT 0
);
-- One row per attempt that carries information of its own: a deferral, a failure or a
-- partial delivery (some recipients accepted; see ``mark_partial``).
-- A delivery is the message's last attempt and the messages row holds all of it
-- (number = attempts, at = updated_at, provider, provider_message_id), so it gets no
-- row; ``get`` puts it back into the history.  Files written before keep theirs.
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
# Partial indexes: a message is in messages_due while it waits and in messages_lease
# while it is in flight, and leaves them at its outcome.  A delivery, the fate of nearly
# every row, removes one index entry and writes none (with an index of every row by
# state, it moved two), and the indexes stay the size of the queue however many
# delivered rows are kept.  A query uses one only if its WHERE names the state as a
# literal: a bound parameter does not tell the planner.  Counting the rows of one index
# reads the index alone (SQLite defers the seek to the row until a column is read).
_INDEXES = {
    "messages_due": "ON messages (next_attempt_at) WHERE state = 'queued'",
    "messages_lease": "ON messages (lease_expires_at) WHERE state = 'in_flight'",
    "messages_failed": "ON messages (updated_at) WHERE state = 'failed'",
}
_SCHEMA += "".join(
    f"CREATE INDEX IF NOT EXISTS {name} {definition};\n" for name, definition in _INDEXES.items()
)

_COLUMNS = (
    "id, created_at, updated_at, mail_from, rcpt_tos, size, state, attempts, next_attempt_at,"
    " lease_owner, lease_expires_at, last_error, provider, provider_message_id, meta"
)

# The statements every message goes through, built once.  Constants are written into
# the SQL and NULLs too, not bound: the sqlite3 module binds None (and anything but
# int, float and str) through its adaptation protocol, two failed attribute lookups
# each, which cost more than the rest of the binding.
_INSERT = (
    "INSERT INTO messages (id, created_at, updated_at, mail_from, rcpt_tos, size, raw,"
    " body_file, state, next_attempt_at, lease_owner, lease_expires_at, provider, meta)"
    " VALUES (?1, ?2, ?2, ?3, ?4, ?5, ?6, {}, {})"
)
# ... (id, now, mail_from, rcpt_tos, size, raw, provider, meta); raw is None for a file
_QUEUED = "'queued', ?2, NULL, NULL, ?7, ?8"
# ... (id, now, mail_from, rcpt_tos, size, raw, lease_owner, lease_expires_at, provider, meta)
_LEASED = "'in_flight', ?2, ?7, ?8, ?9, ?10"
# By (leased, body in a file).
_INSERTS = {
    (leased, in_file): _INSERT.format(int(in_file), _LEASED if leased else _QUEUED)
    for leased in (False, True)
    for in_file in (False, True)
}
# Claiming is a SELECT of the due messages, then an UPDATE of each (UPDATE ...
# RETURNING would copy every body through SQLite's temporary table).
_DUE = (
    f"SELECT {_COLUMNS}, raw, body_file FROM messages"
    " WHERE ((state = 'queued' AND next_attempt_at <= ?1)"
    " OR (state = 'in_flight' AND lease_expires_at <= ?1)) AND held = 0"
    " ORDER BY next_attempt_at, id LIMIT ?2"
)
_CLAIM = (
    "UPDATE messages SET state = 'in_flight', lease_owner = ?2, lease_expires_at = ?3,"
    " updated_at = ?4 WHERE id = ?1"
)
BODY_MISSING = "the spool lost this message's body (its file is missing)"
# (id, now, BODY_MISSING): a message whose body file is gone can never be delivered.
_FAIL_MISSING_BODY = (
    "UPDATE messages SET state = 'failed', updated_at = ?2, lease_owner = NULL,"
    " lease_expires_at = NULL, body_file = 0, last_error = ?3 WHERE id = ?1"
)
# The count of each state from the indexes: every row (the id index) and the rows of
# each partial index; delivered are the rest.  The oldest waiting or in flight message
# too, through the same indexes.
_STATS = (
    "SELECT (SELECT COUNT(*) FROM messages),"
    " (SELECT COUNT(*) FROM messages WHERE state = 'queued'),"
    " (SELECT COUNT(*) FROM messages WHERE state = 'in_flight'),"
    " (SELECT COUNT(*) FROM messages WHERE state = 'failed'),"
    " (SELECT MIN(t) FROM (SELECT MIN(created_at) AS t FROM messages WHERE state = 'queued'"
    " UNION ALL SELECT MIN(created_at) FROM messages WHERE state = 'in_flight'))"
)


@functools.cache
def _finish_statements(
    state: MessageState,
    outcome: str,
    *,
    error: bool,
    provider_message_id: bool,
    next_attempt_at: bool,
    drop_body: bool,
) -> tuple[str, str | None]:
    """The UPDATE recording an outcome, for (id, now, provider, owner, *given), and the
    INSERT of its attempt row, for (id, now, provider, *recorded): ``recorded`` are the
    error and the provider message id that are not None, ``given`` the same and then the
    next attempt time if it is not None.  A delivery has no attempt row (see the schema):
    its INSERT is None.

    The UPDATE checks the lease and counts the attempt; the INSERT reads the count back
    (no SELECT first, and no RETURNING: SQLite runs RETURNING through a temporary
    table, which costs more than a second statement).
    """
    update = [
        f"UPDATE messages SET state = '{state.value}', attempts = attempts + 1,"
        " updated_at = ?2, lease_owner = NULL, lease_expires_at = NULL, provider = ?3"
    ]
    attempt = [f"'{outcome}'"]
    number = 4
    if error:
        number += 1
        update.append(f"last_error = ?{number}")
        attempt.append(f"?{number - 1}")
    else:
        update.append("last_error = NULL")
        attempt.append("NULL")
    if provider_message_id:
        number += 1
        update.append(f"provider_message_id = ?{number}")
        attempt.append(f"?{number - 1}")
    else:
        attempt.append("NULL")
    if next_attempt_at:
        number += 1
        update.append(f"next_attempt_at = ?{number}")
    if drop_body:
        update.append("raw = NULL, body_file = 0")
    return (
        ", ".join(update) + " WHERE id = ?1 AND state = 'in_flight' AND lease_owner = ?4",
        None
        if state is MessageState.DELIVERED
        else "INSERT OR REPLACE INTO attempts (message_id, number, at, provider, outcome, error,"
        f" provider_message_id) SELECT ?1, attempts, ?2, ?3, {', '.join(attempt)}"
        " FROM messages WHERE id = ?1",
    )


# A partial attempt (``mark_partial``), for (id, now, provider, owner, note,
# provider_message_id[, rcpt_tos, next_attempt_at]): queued again for the recipients
# still to be tried, or delivered (the others were bounced) with its body dropped.
_PARTIAL_SET = (
    "attempts = attempts + 1, updated_at = ?2, lease_owner = NULL, lease_expires_at = NULL,"
    " provider = ?3, last_error = ?5, provider_message_id = COALESCE(?6, provider_message_id)"
)
_PARTIAL_WHERE = " WHERE id = ?1 AND state = 'in_flight' AND lease_owner = ?4"
_PARTIAL_REQUEUE = (
    f"UPDATE messages SET state = 'queued', {_PARTIAL_SET}, rcpt_tos = ?7,"
    f" next_attempt_at = ?8{_PARTIAL_WHERE}"
)
_PARTIAL_DELIVERED = (
    f"UPDATE messages SET state = 'delivered', {_PARTIAL_SET}, raw = NULL,"
    f" body_file = 0{_PARTIAL_WHERE}"
)
# (id, now, provider, note, provider_message_id): the attempt row, numbered as counted.
_PARTIAL_ATTEMPT = (
    "INSERT OR REPLACE INTO attempts (message_id, number, at, provider, outcome, error,"
    " provider_message_id) SELECT ?1, attempts, ?2, ?3, 'partial', ?4, ?5"
    " FROM messages WHERE id = ?1"
)

_STATES = {state.value: state for state in MessageState}


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


def _spool_error(exc: BaseException) -> Exception:
    """``exc`` as the SpoolError a caller sees (the same mapping as ``_translate_errors``)."""
    if isinstance(exc, SpoolError):
        return exc
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        if "full" in text or "disk i/o" in text:
            error: Exception = SpoolFull(f"spool storage problem: {exc}")
        else:
            error = SpoolError(f"spool error: {exc}")
    else:
        error = SpoolError(f"spool error: {exc}")
    error.__cause__ = exc
    return error


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a spool file written by an earlier version to ``SCHEMA_VERSION`` (a new one
    has the current shape already, from ``_SCHEMA``), in one transaction.

    Version 1 indexed every row by (state, time): its two indexes are built again as the
    partial ones of ``_INDEXES``, under the same names, so an earlier esprelay can still
    open the file (its queries work with them, as they do with the old ones).  Version 3
    adds ``body_file`` (0 for every row written before: their bodies are in the rows),
    version 4 ``held`` (0: nothing was held before).  A new file gets both columns here
    too, by the same statements.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        # No version: a new file (``_SCHEMA`` made it as it should be; rebuilding its
        # empty indexes costs nothing) or one older than the versions.
        version = 1 if row is None else int(row[0])
        if version < 2:
            for name in ("messages_due", "messages_lease"):
                conn.execute(f"DROP INDEX IF EXISTS {name}")
                conn.execute(f"CREATE INDEX {name} {_INDEXES[name]}")
        columns = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
        if "body_file" not in columns:  # before version 3: every body in its row
            conn.execute("ALTER TABLE messages ADD COLUMN body_file INTEGER NOT NULL DEFAULT 0")
        if "held" not in columns:  # before version 4: nothing held
            conn.execute("ALTER TABLE messages ADD COLUMN held INTEGER NOT NULL DEFAULT 0")
        if version < SCHEMA_VERSION:
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _rollback(conn: sqlite3.Connection) -> None:
    # An I/O error or a full disk may have rolled the transaction back already.
    with contextlib.suppress(sqlite3.Error):
        conn.execute("ROLLBACK")


class _Failed:
    """An operation's outcome when it raised: ``error`` goes to its caller."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _batch_scheduling() -> None:
    """Ask the kernel to treat the calling thread (the writer) as a batch thread: woken
    (an operation queued, an fsync done) it waits for the running thread to block or
    use up its time slice instead of preempting it (Linux ``SCHED_BATCH``; same
    priority and share of the CPU, no privilege needed; a no-op elsewhere).

    The writer and the event loop share the GIL, and the writer releases it around
    every SQLite step: preempting the loop on each wake-up made the two threads hand
    the GIL and the CPU back and forth several times per message (futex waits and
    context switches, ~7 and ~3.6 per 2 KB message in the writer at 20 sessions on one
    core).  Waiting instead, it finds more operations queued and runs them together:
    bench/README.md, "Where it goes, by thread".  Durability is unchanged: no caller
    hears of an operation before its batch is committed.
    """
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return
    with contextlib.suppress(OSError):
        # 0: the calling thread only (Linux schedules threads, not processes).
        os.sched_setscheduler(0, policy, os.sched_param(0))


def _settle(batch: list[_Item], outcomes: list[Any]) -> None:
    """From the writer thread: hand a committed batch's outcomes to their futures with one
    ``call_soon_threadsafe`` per event loop (each one is a wake-up write)."""
    loop = batch[0][2]
    if all(item[2] is loop for item in batch):
        groups = [(loop, batch, outcomes)]
    else:  # spools used from several loops (tests): one wake-up for each
        by_loop: dict[asyncio.AbstractEventLoop, tuple[list[_Item], list[Any]]] = {}
        for item, outcome in zip(batch, outcomes, strict=True):
            items, values = by_loop.setdefault(item[2], ([], []))
            items.append(item)
            values.append(outcome)
        groups = [(loop, items, values) for loop, (items, values) in by_loop.items()]
    for loop, items, values in groups:
        # A loop closed meanwhile has nobody left waiting.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve, items, values)


def _resolve(batch: list[_Item], outcomes: list[Any]) -> None:
    """On the event loop: set each future (unless its caller gave up on it)."""
    for (_, future, _, _), outcome in zip(batch, outcomes, strict=True):
        if future.done():
            continue
        if type(outcome) is _Failed:
            future.set_exception(outcome.error)
        else:
            future.set_result(outcome)


class _BodyFiles:
    """The folder of message bodies kept as files, one per message, named by its id."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def open(self) -> None:
        self.directory.mkdir(mode=0o700, exist_ok=True)

    def write(self, ids: Sequence[str], raw: bytes) -> None:
        """One file per id holding ``raw``, all on disk (the folder too) on return; none
        left behind if one cannot be written."""
        written: list[str] = []
        try:
            for id in ids:
                fd = os.open(self.directory / id, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                written.append(id)
                try:
                    view = memoryview(raw)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
            sync_directory(self.directory)  # the new names
        except OSError as exc:
            self.remove(written)
            raise storage_error(exc) from exc

    def adopt(self, ids: Sequence[str], spilled: Spilled) -> None:
        """``spilled``'s file under each id, all on disk on return (as :meth:`write`)."""
        spilled.link_as([self.directory / id for id in ids])

    def read(self, id: str) -> bytes | None:
        try:
            with open(self.directory / id, "rb") as file:
                return file.read()
        except FileNotFoundError:
            return None

    def remove(self, ids: Sequence[str]) -> None:
        for id in ids:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / id)

    def names(self) -> list[str]:
        return os.listdir(self.directory)


class SqliteSpool(OnePartPut):
    def __init__(
        self, path: str | Path, *, exclusive: bool = False, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.path = Path(path)
        self.exclusive = exclusive
        # "Now" for every operation (read on the writer thread too).
        self._time = clock.time
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None
        self._closed = False
        # The connection's synchronous setting, FULL or not (writer thread only).
        self._synchronous_full = True
        # The writer thread's cursor for the statements every message goes through (a
        # new cursor per statement, as ``conn.execute`` makes, costs about as much as
        # the statement).  Used by operations only, which run on that thread.
        self._cursor: sqlite3.Cursor
        self._bodies = _BodyFiles(self.path.with_name(self.path.name + ".bodies"))
        # Ids of the messages this process wrote or leased with a body file, until it
        # is removed: a delivery of one of them is committed with an fsync, and then
        # its file removed (see mark_delivered).
        self._body_files: set[str] = set()

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
        try:
            await asyncio.to_thread(self._bodies.open)
        except OSError as exc:
            await self.close()
            raise SpoolError(f"cannot open spool {self.path}: {exc}") from exc
        if self.exclusive:
            recovered = await self._run(self._recover)
            if recovered:
                log.warning(
                    "spool: %d message(s) left in flight by a previous run are due again", recovered
                )
            await self._remove_orphan_bodies()

    async def _remove_orphan_bodies(self) -> None:
        """Remove the body files no row names: left by a crash between a file's write and
        its row's commit, or between a delivery's commit and its file's removal, and
        the files of messages that were arriving (``esprelay.spill``)."""

        def named(conn: sqlite3.Connection) -> set[str]:
            return {row[0] for row in conn.execute("SELECT id FROM messages WHERE body_file = 1")}

        known = await self._run(named)
        names = await asyncio.to_thread(self._bodies.names)
        orphans = [name for name in names if name not in known]
        if orphans:
            await asyncio.to_thread(self._bodies.remove, orphans)
            log.info("spool: removed %d body file(s) left by a previous run", len(orphans))

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
        # A new spool gets 8 KiB pages (an existing one keeps its size): a few small
        # messages share a page, so a commit writes about half as many WAL frames (two
        # write calls each) and the kernel side of the spool costs ~15-20% less.
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    # endregion
    # region writer thread

    def _writer(self, ready: Future[None]) -> None:
        _batch_scheduling()
        try:
            conn = self._connect()
            conn.executescript(_SCHEMA)
            _migrate(conn)
        except sqlite3.Error as exc:
            ready.set_exception(SpoolError(f"cannot open spool {self.path}: {exc}"))
            return
        self._cursor = conn.cursor()
        ready.set_result(None)
        get, get_nowait = self._queue.get, self._queue.get_nowait
        stop = False
        while not stop:
            item = get()
            if item is None:
                break
            batch = [item]
            while len(batch) < MAX_BATCH:
                try:
                    more = get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            try:
                outcomes = self._run_batch(conn, batch)
            except Exception as exc:  # a bug here must not leave callers waiting forever
                log.exception("spool: writer failed a batch")
                outcomes = [_Failed(SpoolError(f"spool error: {exc}"))] * len(batch)
            _settle(batch, outcomes)
        conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Item]) -> list[Any]:
        """Run ``batch`` in one transaction; return each operation's outcome (a value, or
        ``_Failed``), all committed."""
        execute = self._cursor.execute  # no new cursor per statement (see __init__)
        # In WAL mode a commit appends the pages it changed to the WAL file; FULL then
        # fsyncs the WAL, NORMAL does not (the WAL is synced before a checkpoint copies
        # it into the database).  One fsync of the WAL makes everything written to it
        # before durable, so the next FULL commit (any batch holding a new message or
        # an admin operation) hardens the NORMAL ones before it too.  After a crash,
        # SQLite replays the WAL up to its last valid commit only: each frame carries a
        # checksum that chains through all the frames before it, so what survives is a
        # prefix of the commits, and what may be lost is a tail of batches of leases and
        # outcomes: at worst a message delivered again after its lease is recovered.
        full = any(item[3] for item in batch)
        try:
            if full is not self._synchronous_full:
                execute("PRAGMA synchronous=FULL" if full else "PRAGMA synchronous=NORMAL")
                self._synchronous_full = full
            execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            return [_Failed(_spool_error(exc))] * len(batch)
        try:
            outcomes = [operation(conn) for operation, _, _, _ in batch]
        except Exception:  # noqa: BLE001 - one operation failed: isolate it (see the module doc)
            _rollback(conn)
            return self._run_batch_isolated(conn, batch)
        try:
            execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(conn)
            return [_Failed(_spool_error(exc))] * len(batch)
        return outcomes

    def _run_batch_isolated(self, conn: sqlite3.Connection, batch: list[_Item]) -> list[Any]:
        """Like ``_run_batch``, each operation in a SAVEPOINT: one that fails is undone
        alone, and the others commit."""
        execute = conn.execute
        outcomes: list[Any] = []
        try:
            execute("BEGIN IMMEDIATE")
            for operation, _, _, _ in batch:
                execute("SAVEPOINT op")
                try:
                    with _translate_errors():
                        value = operation(conn)
                except Exception as exc:  # noqa: BLE001 - handed to the caller's future
                    execute("ROLLBACK TO op")
                    execute("RELEASE op")
                    outcomes.append(_Failed(exc))
                else:
                    execute("RELEASE op")
                    outcomes.append(value)
            execute("COMMIT")
        except Exception as exc:  # noqa: BLE001 - every waiting caller gets the error
            _rollback(conn)
            return [_Failed(_spool_error(exc))] * len(batch)
        return outcomes

    async def _run(
        self, operation: Callable[[sqlite3.Connection], T], *, durable: bool = True
    ) -> T:
        """Run ``operation`` on the writer thread, in the next batch; return its value
        once its batch is committed: on disk, fsync'd, unless ``durable`` is False and
        nothing else in the batch needs it (an operation whose loss in a crash only
        means another delivery attempt: a lease, a delivery, a deferral).

        An operation may run twice (its batch again, when another one in it fails): it
        must not act beyond the connection, and only the committed run's value counts.
        """
        if self._thread is None or self._closed:
            raise SpoolError("spool is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((operation, future, loop, durable))
        return await future

    # endregion
    # region operations

    @property
    def body_directory(self) -> Path:
        return self._bodies.directory

    async def put_parts(
        self,
        raw: bytes | Spilled,
        parts: Sequence[NewPart],
        *,
        lease_owner: str | None = None,
        lease_time: float = 0.0,
    ) -> list[str]:
        size = len(raw)
        in_file = size >= BODY_FILE_MIN  # (and so the only size a lease reads from a file)
        if isinstance(raw, Spilled) and (
            raw.path is None or raw.directory != self._bodies.directory or not in_file
        ):
            raw = await asyncio.to_thread(raw.read)
        now = self._time()
        # A message spooled already leased carries its owner and expiry (_LEASED).
        lease: tuple[Any, ...] = (lease_owner, now + lease_time) if lease_owner else ()
        sql = _INSERTS[bool(lease_owner), in_file]
        stored = None if in_file else raw
        rows = [
            (
                new_message_id(now),
                now,
                part.envelope.mail_from,
                orjson.dumps(part.envelope.rcpt_tos).decode(),
                size,
                stored,
                *lease,
                part.provider,
                orjson.dumps(part.meta).decode(),
            )
            for part in parts
        ]
        ids = [row[0] for row in rows]

        def insert(conn: sqlite3.Connection) -> list[str]:
            self._cursor.executemany(sql, rows)
            return ids

        if not in_file:
            assert isinstance(raw, bytes)
            return await self._run(insert)
        # The files are on disk before the rows that name them are committed.
        if isinstance(raw, Spilled):
            await asyncio.to_thread(self._bodies.adopt, ids, raw)
        else:
            await asyncio.to_thread(self._bodies.write, ids, raw)
        try:
            await self._run(insert)
        except Exception:
            # Not committed (an operation that raises is rolled back): nothing names them.
            self._bodies.remove(ids)
            raise
        self._body_files.update(ids)
        return ids

    async def lease(
        self, owner: str, limit: int, lease_time: float, *, max_bytes: int | None = None
    ) -> list[SpooledMessage]:
        if limit <= 0:
            return []

        def claim(conn: sqlite3.Connection) -> list[SpooledMessage]:
            now = self._time()
            expires = now + lease_time
            rows = conn.execute(_DUE, (now, limit)).fetchall()
            if max_bytes is not None:
                rows = within_bytes(rows, max_bytes, size=lambda row: row[5])
            if any(row[16] for row in rows):
                rows = self._with_file_bodies(conn, rows, now)
            if rows:
                self._cursor.executemany(_CLAIM, [(row[0], owner, expires, now) for row in rows])
            # The rows as the UPDATE left them (what ``get`` would now return).
            return [
                _row_to_message(
                    (*row[:2], now, *row[3:6], "in_flight", *row[7:9], owner, expires, *row[11:15]),
                    raw=row[15],
                )
                for row in rows
            ]

        # A claim lost in a crash leaves the message due (or in flight, and recovered).
        leased = await self._run(claim, durable=False)
        self._body_files.update(m.id for m in leased if m.size >= BODY_FILE_MIN)
        return leased

    def _with_file_bodies(
        self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]], now: float
    ) -> list[tuple[Any, ...]]:
        """``rows`` with each body kept in a file read into its place; a row whose file is
        missing is failed (it can never be delivered) and left out."""
        kept: list[tuple[Any, ...]] = []
        for row in rows:
            if not row[16]:
                kept.append(row)
                continue
            body = self._bodies.read(row[0])
            if body is None:
                conn.execute(_FAIL_MISSING_BODY, (row[0], now, BODY_MISSING))
                log.error("spool: failed id=%s: %s", row[0], BODY_MISSING)
                continue
            kept.append((*row[:15], body, 1))
        return kept

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
        update_sql, attempt_sql = _finish_statements(
            state,
            outcome,
            error=error is not None,
            provider_message_id=provider_message_id is not None,
            next_attempt_at=next_attempt_at is not None,
            drop_body=drop_body,
        )
        recorded = tuple(value for value in (error, provider_message_id) if value is not None)
        given = recorded if next_attempt_at is None else (*recorded, next_attempt_at)

        if attempt_sql is None:

            def update_only(conn: sqlite3.Connection) -> bool:
                cursor = self._cursor
                cursor.execute(update_sql, (id, self._time(), provider, owner, *given))
                return cursor.rowcount == 1

            return update_only

        def update(conn: sqlite3.Connection) -> bool:
            now = self._time()
            cursor = self._cursor
            cursor.execute(update_sql, (id, now, provider, owner, *given))
            if cursor.rowcount != 1:
                return False
            cursor.execute(attempt_sql, (id, now, provider, *recorded))
            return True

        return update

    async def mark_delivered(
        self, id: str, *, owner: str, provider: str, provider_message_id: str | None
    ) -> bool:
        in_file = id in self._body_files
        done = await self._run(
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
            ),
            # Lost in a crash: the message stays in flight, is recovered at the next
            # start and delivered again (at least once, as promised).  Not so once its
            # body file is gone: that delivery is committed with an fsync first.
            durable=in_file,
        )
        if in_file:
            self._body_files.discard(id)
            if done:
                await asyncio.to_thread(self._bodies.remove, [id])
        return bool(done)

    async def mark_retry(
        self, id: str, *, owner: str, provider: str, error: str, next_attempt_at: float
    ) -> bool:
        self._body_files.discard(id)  # a later lease names it again
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
                ),
                # Lost in a crash: the message is tried again at the next start.
                durable=False,
            )
        )

    async def mark_failed(self, id: str, *, owner: str, provider: str, error: str) -> bool:
        self._body_files.discard(id)  # kept for a retry by hand, which leases it again
        # Durable (the default): a bounce and the failure webhook follow it.
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

    async def mark_partial(
        self,
        id: str,
        *,
        owner: str,
        provider: str,
        provider_message_id: str | None,
        note: str,
        rcpt_tos: Sequence[str],
        next_attempt_at: float | None,
    ) -> bool:
        requeue = bool(rcpt_tos)
        in_file = id in self._body_files
        self._body_files.discard(id)  # requeued: a later lease names it again
        update_sql = _PARTIAL_REQUEUE if requeue else _PARTIAL_DELIVERED
        requeued = (orjson.dumps(list(rcpt_tos)).decode(), next_attempt_at) if requeue else ()

        def update(conn: sqlite3.Connection) -> bool:
            now = self._time()
            cursor = self._cursor
            cursor.execute(
                update_sql, (id, now, provider, owner, note, provider_message_id, *requeued)
            )
            if cursor.rowcount != 1:
                return False
            cursor.execute(_PARTIAL_ATTEMPT, (id, now, provider, note, provider_message_id))
            return True

        # Durable (the default): once the envelope is narrowed, the recipients that
        # were accepted are never sent to again, and a bounce may follow.
        done = bool(await self._run(update))
        if done and in_file and not requeue:
            await asyncio.to_thread(self._bodies.remove, [id])
        return done

    async def get(self, id: str, *, with_body: bool = False) -> SpooledMessage | None:
        def select(conn: sqlite3.Connection) -> SpooledMessage | None:
            columns = _COLUMNS + (", raw, body_file" if with_body else ", NULL, 0")
            row = conn.execute(f"SELECT {columns} FROM messages WHERE id = ?", (id,)).fetchone()
            if row is None:
                return None
            if row[-1]:
                row = (*row[:-2], self._bodies.read(id), 1)
            row = row[:-1]
            history = tuple(
                Attempt(*attempt)
                for attempt in conn.execute(
                    "SELECT number, at, provider, outcome, error, provider_message_id"
                    " FROM attempts WHERE message_id = ? ORDER BY number",
                    (id,),
                )
            )
            return _row_to_message(row[:-1], raw=row[-1], history=_with_delivery(row, history))

        return await self._run(select)

    async def list(
        self, *, state: MessageState | None = None, limit: int = 100
    ) -> list[SpooledMessage]:
        def select(conn: sqlite3.Connection) -> list[SpooledMessage]:
            if state is None:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM messages ORDER BY created_at, id LIMIT ?", (limit,)
                )
            else:  # the state as a literal, for the partial indexes (_INDEXES)
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM messages WHERE state = '{state.value}'"
                    " ORDER BY created_at, id LIMIT ?",
                    (limit,),
                )
            return [_row_to_message(row) for row in rows]

        return await self._run(select)

    async def retry_now(self, id: str) -> bool:
        def update(conn: sqlite3.Connection) -> bool:
            now = self._time()
            cursor = conn.execute(
                "UPDATE messages SET state = ?, next_attempt_at = ?, updated_at = ?,"
                " created_at = CASE WHEN state = ? THEN ? ELSE created_at END"
                " WHERE id = ? AND state IN (?, ?) AND (raw IS NOT NULL OR body_file = 1)",
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

        removed = await self._run(remove)
        if removed:
            self._body_files.discard(id)
            await asyncio.to_thread(self._bodies.remove, [id])
        return removed

    async def stats(self) -> SpoolStats:
        def select(conn: sqlite3.Connection) -> SpoolStats:
            total, queued, in_flight, failed, oldest = conn.execute(_STATS).fetchone()
            # As GROUP BY state gave them: the states that have rows, in name order.
            counts = {
                state: count
                for state, count in (
                    (MessageState.DELIVERED, total - queued - in_flight - failed),
                    (MessageState.FAILED, failed),
                    (MessageState.IN_FLIGHT, in_flight),
                    (MessageState.QUEUED, queued),
                )
                if count
            }
            return SpoolStats(counts=counts, oldest_queued_at=oldest)

        return await self._run(select)

    async def next_due(self) -> float | None:
        def select(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT MIN(t) FROM (SELECT MIN(next_attempt_at) AS t FROM messages"
                " WHERE state = 'queued' UNION ALL SELECT MIN(lease_expires_at) FROM messages"
                " WHERE state = 'in_flight')"
            ).fetchone()
            return None if row is None else row[0]

        return await self._run(select)

    async def purge(self, *, delivered_before: float, failed_before: float) -> int:
        def remove(conn: sqlite3.Connection) -> tuple[list[str], list[str]]:
            cursor = conn.execute(
                "DELETE FROM messages WHERE (state = ? AND updated_at < ?)"
                " OR (state = ? AND updated_at < ?) RETURNING id, body_file",
                (
                    MessageState.DELIVERED.value,
                    delivered_before,
                    MessageState.FAILED.value,
                    failed_before,
                ),
            )
            rows = cursor.fetchall()
            ids = [row[0] for row in rows]
            conn.executemany("DELETE FROM attempts WHERE message_id = ?", [(i,) for i in ids])
            return ids, [row[0] for row in rows if row[1]]

        ids, files = await self._run(remove)
        if files:
            await asyncio.to_thread(self._bodies.remove, files)
        return len(ids)

    async def hold(self, ids: Sequence[str] | None) -> tuple[str, ...]:
        """Hold queued and in-flight messages (all of them with ``ids`` None): they are
        not leased until released; one in flight finishes its attempt.  Returns the ids
        held (already held ones included)."""

        def update(conn: sqlite3.Connection) -> tuple[str, ...]:
            where = "state IN ('queued', 'in_flight')"
            return _update_ids(conn, f"UPDATE messages SET held = 1 WHERE {where}", ids)

        return await self._run(update)

    async def release(self, ids: Sequence[str] | None) -> tuple[str, ...]:
        """Release held messages (all with ``ids`` None), due now; return their ids."""

        def update(conn: sqlite3.Connection) -> tuple[str, ...]:
            now = self._time()
            return _update_ids(
                conn,
                "UPDATE messages SET held = 0, updated_at = ?,"
                " next_attempt_at = min(next_attempt_at, ?) WHERE held = 1",
                ids,
                (now, now),
            )

        return await self._run(update)

    async def flush(self) -> int:
        """Make every queued message that is not held due now; return how many."""

        def update(conn: sqlite3.Connection) -> int:
            now = self._time()
            cursor = conn.execute(
                "UPDATE messages SET next_attempt_at = ?, updated_at = ?"
                " WHERE state = 'queued' AND held = 0 AND next_attempt_at > ?",
                (now, now, now),
            )
            return cursor.rowcount

        return await self._run(update)

    async def held_ids(self) -> set[str]:
        """The ids of the held messages."""

        def select(conn: sqlite3.Connection) -> set[str]:
            return {row[0] for row in conn.execute("SELECT id FROM messages WHERE held = 1")}

        return await self._run(select)

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Nothing to do: one ``serve`` process owns an SQLite spool, and its own
        intake wakes its workers (``IntakeState.on_accepted``)."""
        del callback

    @staticmethod
    def _recover(conn: sqlite3.Connection) -> int:
        cursor = conn.execute(
            "UPDATE messages SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL"
            " WHERE state = 'in_flight'"
        )
        return cursor.rowcount

    # endregion
    # region event inbox (esprelay.events): verified ESP events, stored once each

    async def put_events(self, events: Sequence[Event]) -> _InboxResults:
        """Store ``events``; return once committed and fsync'd (see EventInbox)."""
        rows = [event_row(event) for event in events]

        def insert(conn: sqlite3.Connection) -> _InboxResults:
            # Joins the writer's batch: concurrent requests share its commit and fsync.
            execute = self._cursor.execute  # no new cursor per statement (see __init__)
            now = self._time()
            results = []
            for event, row in zip(events, rows, strict=True):
                message_id = None
                if event.esprelay_id is not None:
                    found = execute(_MESSAGE_ID, (event.esprelay_id,)).fetchone()
                    message_id = None if found is None else found[0]
                if message_id is None and event.esp_message_id is not None:
                    message_id = _sent_as(conn, event.provider, event.esp_message_id)
                stored = execute(_INSERT_EVENT, (*row, now, message_id)).rowcount == 1
                results.append(InboxResult(stored, message_id))
            return results

        return await self._run(insert) if events else []

    async def pending_events(self, limit: int = 100) -> _StoredEvents:
        def select(conn: sqlite3.Connection) -> _StoredEvents:
            rows = conn.execute(
                f"SELECT {EVENT_COLUMNS} FROM event_inbox WHERE processed_at IS NULL"
                " ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
            return [stored_event(row) for row in rows]

        return await self._run(select, durable=False)

    async def finish_events(self, seqs: Sequence[int]) -> int:
        def update(conn: sqlite3.Connection) -> int:
            now = self._time()
            return sum(
                conn.execute(
                    "UPDATE event_inbox SET processed_at = ?"
                    " WHERE seq = ? AND processed_at IS NULL",
                    (now, seq),
                ).rowcount
                for seq in seqs
            )

        return await self._run(update) if seqs else 0

    async def purge_events(self, *, processed_before: float) -> int:
        def remove(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM event_inbox WHERE processed_at IS NOT NULL AND processed_at < ?",
                (processed_before,),
            ).rowcount

        return await self._run(remove, durable=False)

    # endregion
    # region message status (esprelay.events.status): what the ESP events said

    async def apply_event(
        self, message_id: str, recipient: str, event: Event, *, dsn: str | None = None
    ) -> Applied | None:
        """See :class:`~esprelay.events.status.MessageStatusStore`; None when the message
        is not in the spool (purged meanwhile)."""
        row = (message_id, *entry_row(recipient, event))

        def apply(conn: sqlite3.Connection) -> Applied | None:
            found = conn.execute("SELECT 1 FROM messages WHERE id = ?", (message_id,))
            if found.fetchone() is None:
                return None
            new = conn.execute(_INSERT_TIMELINE, row).rowcount == 1
            changed = new and event.kind in STATUS_KINDS
            if changed:
                changed = conn.execute(_UPSERT_RECIPIENT, row).rowcount == 1
            claimed = dsn is not None and (
                conn.execute(_CLAIM_DSN, (dsn, message_id, recipient)).rowcount == 1
            )
            return Applied(new, changed, claimed)

        # Lost in a crash: the event is still pending (its finish_events, durable, comes
        # after and hardens this commit with it) and is applied again.  A claimed DSN is
        # hardened by the durable put of the DSN itself.
        return await self._run(apply, durable=False)

    async def apply_events(self, batch: Sequence[Application]) -> _AppliedList:
        """See :class:`~esprelay.events.status.MessageStatusStore`: the statements of
        :meth:`apply_event`, for each event in turn, in one operation of the writer."""
        rows = [(item, (item.message_id, *entry_row(item.recipient, item.event))) for item in batch]

        def apply(conn: sqlite3.Connection) -> _AppliedList:
            execute = self._cursor.execute  # no new cursor per statement (see __init__)
            present: dict[str, bool] = {}
            results: _AppliedList = []
            for (message_id, recipient, event, dsn), row in rows:
                found = present.get(message_id)
                if found is None:
                    found = execute(_MESSAGE_ID, (message_id,)).fetchone() is not None
                    present[message_id] = found
                if not found:
                    results.append(None)
                    continue
                new = execute(_INSERT_TIMELINE, row).rowcount == 1
                changed = new and event.kind in STATUS_KINDS
                if changed:
                    changed = execute(_UPSERT_RECIPIENT, row).rowcount == 1
                claimed = dsn is not None and (
                    execute(_CLAIM_DSN, (dsn, message_id, recipient)).rowcount == 1
                )
                results.append(Applied(new, changed, claimed))
            return results

        # Not durable, as apply_event (see there).
        return await self._run(apply, durable=False) if rows else []

    async def get_messages(
        self, ids: Sequence[str], *, with_body: bool = False
    ) -> dict[str, SpooledMessage]:
        """The messages of ``ids`` still in the spool, by id, read at once (without their
        attempts' history; with their bodies if asked)."""
        wanted = list(dict.fromkeys(ids))
        columns = _COLUMNS + (", raw, body_file" if with_body else ", NULL, 0")
        sql = f"SELECT {columns} FROM messages WHERE id = ?"

        def select(conn: sqlite3.Connection) -> dict[str, SpooledMessage]:
            execute = self._cursor.execute
            found: dict[str, SpooledMessage] = {}
            for id in wanted:
                row = execute(sql, (id,)).fetchone()
                if row is None:
                    continue
                raw = self._bodies.read(id) if row[-1] else row[-2]
                found[id] = _row_to_message(row[:-2], raw=raw)
            return found

        return await self._run(select, durable=False) if wanted else {}

    async def release_dsn(self, message_id: str, recipient: str, kind: str) -> None:
        def release(conn: sqlite3.Connection) -> None:
            found = conn.execute(
                "SELECT dsn FROM message_recipients WHERE message_id = ? AND recipient = ?",
                (message_id, recipient),
            ).fetchone()
            if found is not None:
                kept = ",".join(word for word in dsn_words(found[0]) if word != kind)
                conn.execute(
                    "UPDATE message_recipients SET dsn = ? WHERE message_id = ? AND recipient = ?",
                    (kept, message_id, recipient),
                )

        await self._run(release)

    async def message_status(self, message_id: str) -> MessageStatus:
        def select(conn: sqlite3.Connection) -> MessageStatus:
            recipients = conn.execute(
                f"SELECT {ENTRY_COLUMNS}, dsn FROM message_recipients WHERE message_id = ?"
                " ORDER BY recipient",
                (message_id,),
            ).fetchall()
            timeline = conn.execute(
                f"SELECT {ENTRY_COLUMNS} FROM message_timeline WHERE message_id = ?"
                " ORDER BY at, rowid",
                (message_id,),
            ).fetchall()
            return MessageStatus(
                recipients=tuple(RecipientStatus(entry(r), dsn_words(r[8])) for r in recipients),
                timeline=tuple(entry(r) for r in timeline),
            )

        return await self._run(select, durable=False)

    async def search_messages(
        self,
        *,
        header_message_id: str | None = None,
        recipient: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
    ) -> _Messages:
        """Messages by the Message-ID header kept at intake (``meta.message_id_header``),
        a recipient (case-insensitive) and creation time (``since`` <= t < ``until``)."""
        clauses: list[str] = []
        args: list[Any] = []
        if header_message_id is not None:
            clauses.append("json_extract(meta, '$.message_id_header') = ?")
            args.append(header_message_id)
        if recipient is not None:
            clauses.append(
                "EXISTS (SELECT 1 FROM json_each(messages.rcpt_tos) WHERE lower(value) = ?)"
            )
            args.append(recipient.lower())
        if since is not None:
            clauses.append("created_at >= ?")
            args.append(since)
        if until is not None:
            clauses.append("created_at < ?")
            args.append(until)
        where = " WHERE " + " AND ".join(clauses) if clauses else ""

        def select(conn: sqlite3.Connection) -> _Messages:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM messages{where} ORDER BY created_at, id LIMIT ?",
                (*args, limit),
            )
            return [_row_to_message(row) for row in rows]

        return await self._run(select, durable=False)

    # endregion
    # region lookup by the ESP's message id (events that carry no esprelay id)

    async def find_by_provider_message_id(
        self, provider: str, provider_message_id: str
    ) -> SpooledMessage | None:
        """The message ``provider`` (its configured name) accepted as
        ``provider_message_id`` (the id its send API answered), without its body; the
        newest if the ESP gave one id twice; None if none."""

        def select(conn: sqlite3.Connection) -> SpooledMessage | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM messages {_BY_PROVIDER_ID} LIMIT 1",
                (provider, provider_message_id),
            ).fetchone()
            return None if row is None else _row_to_message(row)

        return await self._run(select, durable=False)

    # endregion


def _update_ids(
    conn: sqlite3.Connection, update: str, ids: Sequence[str] | None, params: tuple[Any, ...] = ()
) -> tuple[str, ...]:
    """Run ``update`` (an UPDATE ... WHERE without RETURNING) on the rows of ``ids``, or
    on every row it selects with ``ids`` None; return the ids it changed."""
    if ids is None:
        return tuple(sorted(row[0] for row in conn.execute(update + " RETURNING id", params)))
    return tuple(
        id
        for id in dict.fromkeys(ids)
        if conn.execute(update + " AND id = ? RETURNING id", (*params, id)).fetchone()
    )


def _with_delivery(row: tuple[Any, ...], history: tuple[Attempt, ...]) -> tuple[Attempt, ...]:
    """``history`` with the delivery the messages ``row`` records (a delivered message's
    last attempt has no row of its own, unless a file written before says so)."""
    if row[6] != MessageState.DELIVERED.value or (history and history[-1].number >= row[7]):
        return history
    # updated_at, provider and provider_message_id: written by that attempt's UPDATE.
    return (*history, Attempt(row[7], row[2], row[12], "delivered", None, row[13]))


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
        envelope=Envelope(mail_from=mail_from, rcpt_tos=tuple(orjson.loads(rcpt_tos))),
        size=size,
        state=_STATES[state],
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
        meta=orjson.loads(meta),
    )


# region event inbox schema and rows (esprelay.events)
#
# A table of its own, created with the others at every open (``_SCHEMA``): a file
# written before it gets it then, and an esprelay from before ignores it, so it needs
# no version of its own.  ``seq`` orders the events as they arrived; the unique key
# stores an event an ESP sends again (a retried webhook) once.
_SCHEMA += """
CREATE TABLE IF NOT EXISTS event_inbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    provider TEXT NOT NULL,
    event_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    recipient TEXT,
    at REAL NOT NULL,
    smtp_status TEXT,
    diagnostic TEXT,
    esp_message_id TEXT,
    esprelay_id TEXT,
    remote_mta TEXT,
    raw TEXT NOT NULL,
    received_at REAL NOT NULL,
    message_id TEXT,
    processed_at REAL,
    UNIQUE (provider, event_id)
);
CREATE INDEX IF NOT EXISTS event_inbox_pending ON event_inbox (seq) WHERE processed_at IS NULL;
"""

# (``list`` in the class is its method of that name.)
_InboxResults = list[InboxResult]
_StoredEvents = list[StoredEvent]

_MESSAGE_ID = "SELECT id FROM messages WHERE id = ?"
_INSERT_EVENT = (
    "INSERT INTO event_inbox (provider, event_id, kind, recipient, at, smtp_status, diagnostic,"
    " esp_message_id, esprelay_id, remote_mta, raw, received_at, message_id)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (provider, event_id) DO NOTHING"
)


# endregion


# region message status schema (esprelay.events.status)

_Messages = list[SpooledMessage]
_AppliedList = list[Applied | None]
#
# Tables of their own, created at every open like the inbox's (no version of their own).
# Their rows go with their message (ON DELETE CASCADE: the connection has
# foreign_keys=ON), at a purge or a delete.  ``message_timeline`` holds every event of a
# message once (its key is the ESP's event id); ``message_recipients`` each recipient's
# latest status and the DSN kinds sent for it (``dsn``, comma separated).
_SCHEMA += """
CREATE TABLE IF NOT EXISTS message_timeline (
    message_id TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    provider TEXT NOT NULL,
    event_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    kind TEXT NOT NULL,
    at REAL NOT NULL,
    smtp_status TEXT,
    diagnostic TEXT,
    remote_mta TEXT,
    PRIMARY KEY (message_id, provider, event_id)
);
CREATE TABLE IF NOT EXISTS message_recipients (
    message_id TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    recipient TEXT NOT NULL,
    provider TEXT NOT NULL,
    event_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    at REAL NOT NULL,
    smtp_status TEXT,
    diagnostic TEXT,
    remote_mta TEXT,
    dsn TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (message_id, recipient)
);
"""
# (message_id, provider, event_id, recipient, kind, at, smtp_status, diagnostic, remote_mta)
_INSERT_TIMELINE = (
    "INSERT INTO message_timeline (message_id, provider, event_id, recipient, kind, at,"
    " smtp_status, diagnostic, remote_mta) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
    " ON CONFLICT DO NOTHING"
)
# The same parameters: the recipient's status, unless it holds a more recent event.
_UPSERT_RECIPIENT = (
    "INSERT INTO message_recipients (message_id, provider, event_id, recipient, kind, at,"
    " smtp_status, diagnostic, remote_mta) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
    " ON CONFLICT (message_id, recipient) DO UPDATE SET provider = excluded.provider,"
    " event_id = excluded.event_id, kind = excluded.kind, at = excluded.at,"
    " smtp_status = excluded.smtp_status, diagnostic = excluded.diagnostic,"
    " remote_mta = excluded.remote_mta WHERE excluded.at >= message_recipients.at"
)
# (kind, message_id, recipient): claimed only if no DSN of that kind was.
_CLAIM_DSN = (
    "UPDATE message_recipients SET dsn = CASE WHEN dsn = '' THEN ?1 ELSE dsn || ',' || ?1 END"
    " WHERE message_id = ?2 AND recipient = ?3 AND instr(',' || dsn || ',', ',' || ?1 || ',') = 0"
)

# endregion


# region lookup by the ESP's message id
#
# An event that does not carry esprelay's id (an SES notification without a
# configuration set, a Brevo event...) names its message by the id the ESP's send API
# answered, which a delivery writes into ``provider_message_id``.  A partial index: the
# rows an ESP has accepted, created at every open like the inbox (an esprelay from
# before keeps it up to date without knowing it).
_SCHEMA += """
CREATE INDEX IF NOT EXISTS messages_provider_message_id
    ON messages (provider, provider_message_id) WHERE provider_message_id IS NOT NULL;
"""
_BY_PROVIDER_ID = "WHERE provider = ? AND provider_message_id = ? ORDER BY created_at DESC, id DESC"


def _sent_as(conn: sqlite3.Connection, provider: str, provider_message_id: str) -> str | None:
    """The id of the message ``provider`` accepted as ``provider_message_id``, or None."""
    found = conn.execute(
        f"SELECT id FROM messages {_BY_PROVIDER_ID} LIMIT 1", (provider, provider_message_id)
    ).fetchone()
    return None if found is None else str(found[0])


# endregion
