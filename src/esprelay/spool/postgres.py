"""The shared spool: PostgreSQL, for several esprelay instances behind one load balancer.

Same interface and semantics as the SQLite spool, with these differences that come
from sharing:

- **Leases.** Workers claim due messages with ``FOR UPDATE SKIP LOCKED``, so two
  instances never lease the same message, and never wait on each other.  A lease
  records its owner and expiry; when an instance dies, its messages become due again
  once their leases expire and any other instance takes them.  Unlike SQLite, start-up
  does not reset every ``in_flight`` message (other instances may be delivering them):
  it takes back only the leases held under this instance's own owner id.
- **Clock.** "Now" is the database server's clock (``now()``), so instances whose
  clocks disagree still agree on when a lease has expired.  The given
  :class:`~esprelay.clock.Clock` only paces this process's own waits (reconnecting
  the listener, its keep-alive).
- **Wake-ups.** After ``put`` commits, and within ``retry_now``, ``release`` and
  ``flush``, the spool sends ``NOTIFY esprelay_spool``; PostgreSQL delivers it to
  every instance that listens (:meth:`PostgresSpool.add_listener`), so idle workers
  everywhere wake at once instead of polling tightly.
- **Durability.** Every write is one transaction (one statement, except for a large
  body); it returns only after PostgreSQL has committed it (``synchronous_commit`` is
  forced ``on`` for our sessions), so ``250`` still means "committed".
- **Group commit.** Concurrent writes of one kind share a statement, as the SQLite
  spool's writer shares a transaction: new messages (up to a megabyte of bodies) wait
  in one line, outcomes (``mark_*``) in another; while one batch is with the
  database the next gathers, and then goes as one statement of arrays, unnested by
  the server (:class:`_GroupCommit`).  Nobody is answered before that statement has
  committed, and a batch that fails fails every caller in it with a SpoolError (the
  client gets 451; nothing of the batch was stored), except that when the database
  refuses a row for its content (or rolls a batch back for a deadlock), each write
  of the batch is tried again alone, so that only the bad one fails.  Twenty
  sessions finishing DATA together cost one statement, one commit and one WAL flush
  instead of twenty, and the round trips per message (counted: ``round_trips``) fall
  well below one.  A lease is one statement for many messages, as it was; leases
  and their ``FOR UPDATE SKIP LOCKED`` are unchanged.  Verified ESP events for the
  inbox (``put_events``) have a line of their own: concurrent webhook requests share
  a statement, and none is answered before it has committed.
- **Shutdown.** ``close`` of a serving instance hands back the leases it still holds,
  so a graceful stop leaves nothing waiting for a lease to expire.
- **Schema.** :func:`upgrade` creates and migrates the tables (``esprelay db upgrade``,
  or at start with ``ESPRELAY_SPOOL_AUTO_MIGRATE``), under an advisory lock so that
  instances starting together do not race.

Message bytes travel as ``bytea`` in asyncpg's binary format, never as hex text.  A
body is stored in pieces of :data:`BODY_CHUNK` bytes (``esprelay_bodies``), written
from memoryview slices of the received bytes, so storing a 25 MB message costs about
a megabyte of buffers on top of the message itself rather than two more copies of
it; the server joins the pieces again, and a lease receives each body as one
``bytes`` object.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any, Generic, TypeVar

import asyncpg
import orjson

from esprelay.clock import SYSTEM_CLOCK, Clock
from esprelay.errors import ConfigError, SpoolError, SpoolFull
from esprelay.events.model import Event, InboxResult, StoredEvent
from esprelay.events.rows import EVENT_COLUMNS, event_row, stored_event
from esprelay.events.status import (
    ENTRY_COLUMNS,
    STATUS_KINDS,
    Application,
    Applied,
    BatchPlan,
    MessageStatus,
    RecipientStatus,
    entry,
    entry_row,
    plan_batch,
)
from esprelay.models import Attempt, Envelope, MessageState, SpooledMessage
from esprelay.spill import Spilled
from esprelay.spool.base import NewPart, OnePartPut, SpoolStats, new_message_id

log = logging.getLogger(__name__)

#: The NOTIFY channel on which commits of due work are announced.
CHANNEL = "esprelay_spool"
#: A constant key for the advisory lock held while migrating the schema.
MIGRATION_LOCK = 0x65737072656C6179  # "esprelay"

CONNECT_TIMEOUT = 10.0
#: Longest a single statement may take (a 25 MB message over a slow link included).
COMMAND_TIMEOUT = 60.0
#: How long a caller waits for a free pooled connection.
ACQUIRE_TIMEOUT = 30.0
#: How often the listening connection is checked when no notification arrives.
LISTEN_KEEPALIVE = 30.0

# Our sessions commit durably whatever the server's default: 250 means committed.
_SERVER_SETTINGS = {"application_name": "esprelay", "synchronous_commit": "on"}

_NOW = "extract(epoch FROM now())::float8"

# Each entry takes the schema from version N to N+1.  Never edit a released entry:
# append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE esprelay_messages (
        id text PRIMARY KEY,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        mail_from text NOT NULL,
        rcpt_tos text[] NOT NULL,
        size bigint NOT NULL,
        has_body boolean NOT NULL DEFAULT true,
        state text NOT NULL
            CHECK (state IN ('queued', 'in_flight', 'delivered', 'failed')),
        attempts integer NOT NULL DEFAULT 0,
        next_attempt_at double precision NOT NULL,
        lease_owner text,
        lease_expires_at double precision,
        last_error text,
        provider text NOT NULL,
        provider_message_id text,
        meta jsonb NOT NULL DEFAULT '{}'
    );
    CREATE INDEX esprelay_messages_due ON esprelay_messages (next_attempt_at)
        WHERE state = 'queued';
    CREATE INDEX esprelay_messages_lease ON esprelay_messages (lease_expires_at)
        WHERE state = 'in_flight';
    CREATE INDEX esprelay_messages_finished ON esprelay_messages (state, updated_at)
        WHERE state IN ('delivered', 'failed');
    CREATE INDEX esprelay_messages_created ON esprelay_messages (created_at, id);
    CREATE TABLE esprelay_bodies (
        message_id text NOT NULL REFERENCES esprelay_messages (id) ON DELETE CASCADE,
        seq integer NOT NULL,
        data bytea NOT NULL,
        PRIMARY KEY (message_id, seq)
    );
    CREATE TABLE esprelay_attempts (
        message_id text NOT NULL REFERENCES esprelay_messages (id) ON DELETE CASCADE,
        number integer NOT NULL,
        at double precision NOT NULL,
        provider text NOT NULL,
        outcome text NOT NULL,
        error text,
        provider_message_id text,
        PRIMARY KEY (message_id, number)
    );
    """,
    # 2: the inbox of verified ESP events (esprelay.events), each stored once.
    """
    CREATE TABLE esprelay_events (
        seq bigserial PRIMARY KEY,
        provider text NOT NULL,
        event_id text NOT NULL,
        kind text NOT NULL,
        recipient text,
        at double precision NOT NULL,
        smtp_status text,
        diagnostic text,
        esp_message_id text,
        esprelay_id text,
        remote_mta text,
        raw text NOT NULL,
        received_at double precision NOT NULL,
        message_id text,
        processed_at double precision,
        UNIQUE (provider, event_id)
    );
    CREATE INDEX esprelay_events_pending ON esprelay_events (seq) WHERE processed_at IS NULL;
    """,
    # 3: esprelay queue hold/release; a held message is never leased.
    """
    ALTER TABLE esprelay_messages ADD COLUMN held boolean NOT NULL DEFAULT false;
    """,
    # 4: what the ESP events said of each message (esprelay.events.status): its timeline
    # and each recipient's latest status, gone with the message.
    """
    CREATE TABLE esprelay_message_timeline (
        message_id text NOT NULL REFERENCES esprelay_messages (id) ON DELETE CASCADE,
        provider text NOT NULL,
        event_id text NOT NULL,
        recipient text NOT NULL,
        kind text NOT NULL,
        at double precision NOT NULL,
        smtp_status text,
        diagnostic text,
        remote_mta text,
        seq bigserial NOT NULL,
        PRIMARY KEY (message_id, provider, event_id)
    );
    CREATE TABLE esprelay_message_recipients (
        message_id text NOT NULL REFERENCES esprelay_messages (id) ON DELETE CASCADE,
        recipient text NOT NULL,
        provider text NOT NULL,
        event_id text NOT NULL,
        kind text NOT NULL,
        at double precision NOT NULL,
        smtp_status text,
        diagnostic text,
        remote_mta text,
        dsn text[] NOT NULL DEFAULT '{}',
        PRIMARY KEY (message_id, recipient)
    );
    """,
    # 5: messages by the id the ESP's send answered, for the events that carry no
    # esprelay id (find_by_provider_message_id); only the rows an ESP accepted.
    """
    CREATE INDEX esprelay_messages_provider_message_id
        ON esprelay_messages (provider, provider_message_id)
        WHERE provider_message_id IS NOT NULL;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

_COLUMNS = (
    "id, created_at, updated_at, mail_from, rcpt_tos, size, state, attempts, next_attempt_at,"
    " lease_owner, lease_expires_at, last_error, provider, provider_message_id, meta::text"
)

#: A message body is stored as pieces of this size (see :meth:`PostgresSpool.put`).
BODY_CHUNK = 1024 * 1024


def _small_body(alias: str) -> str:
    """The body of a one-piece message, inline; NULL for a large or dropped one."""
    return (
        f"CASE WHEN {alias}.has_body AND {alias}.size <= {BODY_CHUNK} THEN"
        f" (SELECT b.data FROM esprelay_bodies AS b"
        f" WHERE b.message_id = {alias}.id AND b.seq = 0) END"
    )


# $1 id, $2 mail_from, $3 rcpt_tos, $4 size, $5 provider, $6 meta, $7 lease owner or
# NULL (an entry created already leased, for an inline attempt), $8 lease time.
_INSERT_MESSAGE = (
    "INSERT INTO esprelay_messages (id, created_at, updated_at, mail_from, rcpt_tos, size,"
    " state, next_attempt_at, provider, meta, lease_owner, lease_expires_at)"
    f" VALUES ($1, {_NOW}, {_NOW}, $2, $3, $4,"
    " CASE WHEN $7::text IS NULL THEN 'queued' ELSE 'in_flight' END,"
    f" {_NOW}, $5, $6::jsonb, $7::text,"
    f" CASE WHEN $7::text IS NULL THEN NULL ELSE {_NOW} + $8::float8 END)"
    " RETURNING id"
)

_Callback = Callable[[], None]

#: Most operations one batch of the group commit holds.
MAX_BATCH = 256
#: Most bytes of bodies one batch of new messages carries (a larger body goes alone).
BATCH_BYTES = 4 * 1024 * 1024

# The group commit's insert: one row per spool entry, every column an array; the
# recipients of all entries in one flat array, each entry's a slice of it ($3, $4:
# first and last position, 1-based).  A row with a lease owner is created already
# leased.  The body goes in by the same statement, so message and body commit
# together, and the status (``INSERT 0 n``) confirms them: no rows come back.
_INSERT_BATCH = (
    "WITH u AS (SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::int[],"
    " $5::bigint[], $6::text[], $7::text[], $8::text[], $9::float8[], $10::bytea[])"
    " AS u(id, mail_from, rcpt_first, rcpt_last, size, provider, meta, lease_owner,"
    " lease_time, data)),"
    " m AS (INSERT INTO esprelay_messages (id, created_at, updated_at, mail_from, rcpt_tos,"
    " size, state, next_attempt_at, provider, meta, lease_owner, lease_expires_at)"
    f" SELECT u.id, {_NOW}, {_NOW}, u.mail_from, ($11::text[])[u.rcpt_first:u.rcpt_last],"
    " u.size, CASE WHEN u.lease_owner IS NULL THEN 'queued' ELSE 'in_flight' END,"
    f" {_NOW}, u.provider, u.meta::jsonb, u.lease_owner,"
    f" CASE WHEN u.lease_owner IS NULL THEN NULL ELSE {_NOW} + u.lease_time END FROM u"
    " RETURNING id)"
    " INSERT INTO esprelay_bodies (message_id, seq, data)"
    " SELECT m.id, 0, u.data FROM m JOIN u ON u.id = m.id"
)

# The group commit's outcomes: one row per message, as ``_finish`` describes it; the
# recipients of a partial attempt requeued for some of them a slice of $12 ($10,
# $11; NULL: unchanged).  Only a message still leased to the owner given changes;
# its attempt is recorded, and its id comes back, in the same statement.  A batch
# never names a message twice (``_GroupCommit`` ends it before a repeat).
_FINISH_BATCH = (
    "WITH u AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],"
    " $5::text[], $6::text[], $7::text[], $8::float8[], $9::bool[], $10::int[], $11::int[])"
    " AS u(id, owner, state, outcome, error, provider, provider_message_id,"
    " next_attempt_at, drop_body, rcpt_first, rcpt_last)),"
    " finished AS (UPDATE esprelay_messages AS m SET state = u.state,"
    f" attempts = m.attempts + 1, updated_at = {_NOW}, lease_owner = NULL,"
    " lease_expires_at = NULL, last_error = u.error, provider = u.provider,"
    " provider_message_id = COALESCE(u.provider_message_id, m.provider_message_id),"
    " next_attempt_at = COALESCE(u.next_attempt_at, m.next_attempt_at),"
    " rcpt_tos = CASE WHEN u.rcpt_first IS NULL THEN m.rcpt_tos"
    " ELSE ($12::text[])[u.rcpt_first:u.rcpt_last] END,"
    " has_body = m.has_body AND NOT u.drop_body"
    " FROM u WHERE m.id = u.id AND m.state = 'in_flight' AND m.lease_owner = u.owner"
    " RETURNING m.id, m.attempts, m.updated_at, u.provider, u.outcome, u.error,"
    " u.provider_message_id, u.drop_body),"
    " dropped AS (DELETE FROM esprelay_bodies AS b USING finished AS f"
    " WHERE b.message_id = f.id AND f.drop_body),"
    " recorded AS (INSERT INTO esprelay_attempts (message_id, number, at, provider, outcome,"
    " error, provider_message_id) SELECT id, attempts, updated_at, provider, outcome, error,"
    " provider_message_id FROM finished"
    " ON CONFLICT (message_id, number) DO UPDATE SET at = EXCLUDED.at,"
    " provider = EXCLUDED.provider, outcome = EXCLUDED.outcome, error = EXCLUDED.error,"
    " provider_message_id = EXCLUDED.provider_message_id"
    " RETURNING message_id)"
    " SELECT array_agg(message_id) FROM recorded"
)

# A new spool entry waiting for the group commit: (id, mail_from, rcpt_tos, size,
# provider, meta as JSON, lease owner or None, lease time), and its body.
_NewRow = tuple[str, str, list[str], int, str, str, str | None, float]
# An outcome waiting for the group commit: (id, owner, state, outcome, error,
# provider, provider_message_id, next_attempt_at, drop_body, rcpt_tos or None).
_Outcome = tuple[
    str, str, str, str, str | None, str, str | None, float | None, bool, list[str] | None
]


@contextlib.contextmanager
def _translate_errors(action: str) -> Iterator[None]:
    """asyncpg, socket and timeout errors become SpoolError (SMTP 451) at the boundary."""
    try:
        yield
    except asyncpg.PostgresError as exc:
        sqlstate = getattr(exc, "sqlstate", None) or ""
        # Class 53: insufficient resources (disk full, out of memory, too many connections).
        if sqlstate.startswith("53") and sqlstate != "53300":
            raise SpoolFull(f"spool storage problem while {action}: {exc}") from exc
        raise SpoolError(f"spool error while {action}: {type(exc).__name__}: {exc}") from exc
    except asyncpg.ClientConfigurationError:
        raise  # a bad ESPRELAY_SPOOL_URL: open() reports it as a configuration error
    except (asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
        raise SpoolError(f"spool error while {action}: {type(exc).__name__}: {exc}") from exc
    except TimeoutError as exc:
        raise SpoolError(
            f"spool error while {action}: the database did not answer in time"
        ) from exc
    except OSError as exc:
        raise SpoolError(
            f"spool error while {action}: cannot reach the database: {exc.strerror or exc}"
        ) from exc


@contextlib.contextmanager
def _url_errors() -> Iterator[None]:
    """A URL asyncpg cannot parse is a configuration error (exit 2), not a 451."""
    try:
        yield
    except asyncpg.ClientConfigurationError as exc:
        raise ConfigError(f"ESPRELAY_SPOOL_URL: {exc}") from None
    except ValueError:
        # Not the parser's message: it may quote a piece of the URL (a password).
        raise ConfigError(
            "ESPRELAY_SPOOL_URL: not a valid PostgreSQL URL"
            " (postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?sslmode=...])"
        ) from None


def redact_url(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in userinfo else url


_Item = TypeVar("_Item")


def _worth_trying_alone(error: SpoolError) -> bool:
    """Whether the database refused a batch for what one of its rows holds (a data
    exception, an integrity violation) or rolled it back for a conflict with another
    transaction (a deadlock between two instances' batches whose leases crossed):
    nothing was committed, and each write may be tried again alone."""
    cause = error.__cause__
    return isinstance(cause, asyncpg.PostgresError) and (
        getattr(cause, "sqlstate", None) or ""
    ).startswith(("22", "23", "40001", "40P01"))


def _fail(future: asyncio.Future[Any], error: SpoolError) -> None:
    if not future.done():
        # A copy for each caller: one exception raised in many tasks would gather
        # all their tracebacks.
        copy = type(error)(*error.args)
        copy.__cause__ = error.__cause__
        future.set_exception(copy)


class _GroupCommit(Generic[_Item]):
    """A line of writes of one kind, committed a batch at a time (see the module doc).

    ``run`` stores a batch in one statement and returns each item's result, in order,
    once it has committed; or raises SpoolError for all of them.  While a batch is
    with the database, the next gathers (up to :data:`MAX_BATCH` items, and
    :data:`BATCH_BYTES` by ``weigh``; never two items with one ``key``): the busier
    the spool, the larger the batches, and an idle spool sends a write at once.
    """

    def __init__(
        self,
        run: Callable[[list[_Item]], Awaitable[Sequence[Any]]],
        *,
        weigh: Callable[[_Item], int] | None = None,
        key: Callable[[_Item], str] | None = None,
    ) -> None:
        self._run = run
        self._weigh = weigh
        self._key = key
        self._waiting: deque[tuple[_Item, asyncio.Future[Any]]] = deque()
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: _Item) -> Any:
        """``item``'s result, once its batch has committed."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name="esprelay-spool-commit")
        return await future

    async def idle(self) -> None:
        """Return once every write submitted so far has been answered."""
        while self._task is not None:
            await asyncio.wait({self._task})

    def _take(self) -> list[tuple[_Item, asyncio.Future[Any]]]:
        batch = [self._waiting.popleft()]
        weight = self._weigh(batch[0][0]) if self._weigh is not None else 0
        keys = {self._key(batch[0][0])} if self._key is not None else set()
        while self._waiting and len(batch) < MAX_BATCH:
            item = self._waiting[0][0]
            if self._weigh is not None:
                weight += self._weigh(item)
                if weight > BATCH_BYTES:
                    break
            if self._key is not None:
                key = self._key(item)
                if key in keys:
                    break
                keys.add(key)
            batch.append(self._waiting.popleft())
        return batch

    async def _drain(self) -> None:
        try:
            while self._waiting:
                await self._commit(self._take())
        finally:
            self._task = None
            # Only if this task was cancelled (the loop is closing): nobody waits forever.
            while self._waiting:
                _fail(self._waiting.popleft()[1], SpoolError("spool error: the spool closed"))

    async def _commit(self, batch: list[tuple[_Item, asyncio.Future[Any]]]) -> None:
        try:
            results = await self._run([item for item, _ in batch])
        except SpoolError as exc:
            if len(batch) > 1 and _worth_trying_alone(exc):
                # One row spoils the statement for all: each alone, so it fails by itself.
                for one in batch:
                    await self._commit([one])
                return
            for _, future in batch:
                _fail(future, exc)
            return
        except BaseException as exc:
            # Cancelled, or a bug: whoever waits hears of it (nothing was confirmed).
            if isinstance(exc, Exception):
                log.exception("spool: a batch of writes failed")
            for _, future in batch:
                _fail(future, SpoolError(f"spool error: {type(exc).__name__}: {exc}"))
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)


async def _current_version(conn: asyncpg.Connection) -> int:
    exists = await conn.fetchval("SELECT to_regclass('esprelay_schema') IS NOT NULL")
    if not exists:
        return 0
    version = await conn.fetchval("SELECT max(version) FROM esprelay_schema")
    return int(version or 0)


async def upgrade(conn: asyncpg.Connection) -> tuple[int, int]:
    """Bring the schema to :data:`SCHEMA_VERSION`; return (version before, after).

    Runs in one transaction under an advisory lock: instances starting together
    migrate once, and a failed migration leaves the old schema untouched.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS esprelay_schema ("
            " version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        before = await _current_version(conn)
        if before > SCHEMA_VERSION:
            raise SpoolError(
                f"the spool schema is at version {before}, newer than this esprelay"
                f" understands ({SCHEMA_VERSION}): upgrade esprelay"
            )
        for version in range(before + 1, SCHEMA_VERSION + 1):
            await conn.execute(MIGRATIONS[version - 1])
            await conn.execute("INSERT INTO esprelay_schema (version) VALUES ($1)", version)
    return before, SCHEMA_VERSION


async def schema_version(url: str) -> int:
    """The schema version of the spool at ``url``; 0 where there is none (nothing is
    created: the queue commands look before they open)."""
    with _url_errors(), _translate_errors("reading the spool schema version"):
        conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT, server_settings=_SERVER_SETTINGS)
        try:
            return await _current_version(conn)
        finally:
            await conn.close()


async def migrate(url: str) -> tuple[int, int]:
    """``esprelay db upgrade``: connect to ``url`` and run :func:`upgrade`."""
    with _url_errors(), _translate_errors("migrating the spool schema"):
        conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT, server_settings=_SERVER_SETTINGS)
        try:
            return await upgrade(conn)
        finally:
            await conn.close()


class PostgresSpool(OnePartPut):
    """A spool in a PostgreSQL database shared by any number of esprelay instances."""

    def __init__(
        self,
        url: str,
        *,
        owner: str | None = None,
        auto_migrate: bool = True,
        pool_size: int = 10,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.url = url
        self.owner = owner
        self.auto_migrate = auto_migrate
        self.pool_size = max(1, pool_size)
        self._pool: asyncpg.Pool | None = None
        self._closed = False
        self._callbacks: list[_Callback] = []
        self._listen_task: asyncio.Task[None] | None = None
        self._announcing: asyncio.Task[None] | None = None
        self._announce_again = False
        self._sleep = clock.sleep
        self._timeout = clock.timeout
        #: Statements sent to the database and waited for (round trips), a plain
        #: count for the benchmark (logged at close).
        self.round_trips = 0
        # The group commits (see the module doc): new messages, and outcomes.
        self._puts: _GroupCommit[tuple[list[_NewRow], bytes]] = _GroupCommit(
            self._insert_batch, weigh=_put_weight
        )
        self._outcomes: _GroupCommit[_Outcome] = _GroupCommit(self._finish_batch, key=_outcome_id)
        # Verified ESP events for the inbox, a request's events per item.
        self._event_puts: _GroupCommit[Sequence[Event]] = _GroupCommit(
            self._insert_events_batch, weigh=_events_weight
        )

    def __repr__(self) -> str:
        return f"PostgresSpool({redact_url(self.url)!r})"

    # region lifecycle

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(
            self.url,
            timeout=CONNECT_TIMEOUT,
            command_timeout=COMMAND_TIMEOUT,
            server_settings=_SERVER_SETTINGS,
        )

    async def open(self) -> None:
        with _url_errors():
            await self._open()

    async def _open(self) -> None:
        with _translate_errors("opening the spool"):
            conn = await self._connect()
            try:
                if self.auto_migrate:
                    before, after = await upgrade(conn)
                    if before != after:
                        log.info("spool: schema migrated from version %d to %d", before, after)
                else:
                    version = await _current_version(conn)
                    if version != SCHEMA_VERSION:
                        raise SpoolError(
                            f"the spool schema is at version {version}, this esprelay needs"
                            f" {SCHEMA_VERSION}: run `esprelay db upgrade`"
                            " (or set ESPRELAY_SPOOL_AUTO_MIGRATE=true)"
                        )
                if self.owner is not None:
                    count = await self._release_leases(conn, self.owner)
                    if count:
                        log.warning(
                            "spool: took back %d message(s) leased by a previous run of %s",
                            count,
                            self.owner,
                        )
            finally:
                await conn.close()
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=self.pool_size,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
                server_settings=_SERVER_SETTINGS,
                reset=self._reset_connection,
            )

    async def _reset_connection(self, conn: asyncpg.Connection) -> None:
        """Nothing: what the pool runs on a connection given back (after rolling back
        a transaction left open, which asyncpg does first in any case).

        asyncpg's default reset sends ``SELECT pg_advisory_unlock_all(); CLOSE ALL;
        UNLISTEN *; RESET ALL`` at every release: a round trip per operation, as many
        as the operations themselves.  A pooled connection of this spool never holds
        session state for it to undo: no session advisory locks (the migration's is a
        transaction's), no cursor outside a transaction, no LISTEN (the listener has
        a connection of its own), no SET (settings are given at connect).  An
        operation that needs any of these must undo it itself.
        """
        del conn

    @staticmethod
    async def _release_leases(executor: asyncpg.Connection | asyncpg.Pool, owner: str) -> int:
        """Make every message leased by ``owner`` due again; return how many."""
        with _translate_errors("handing back leases"):
            status = await executor.execute(
                "UPDATE esprelay_messages SET state = 'queued', lease_owner = NULL,"
                f" lease_expires_at = NULL, updated_at = {_NOW}"
                " WHERE state = 'in_flight' AND lease_owner = $1",
                owner,
            )
        return int(status.rsplit(" ", 1)[-1])

    async def close(self) -> None:
        if self._closed:
            return
        # Writes already submitted are answered first, committed or not.
        await self._puts.idle()
        await self._outcomes.idle()
        await self._event_puts.idle()
        if self._announcing is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._announcing
        if self.owner is not None and self._pool is not None:
            # ``serve`` closes the spool after its deliveries have stopped: what this
            # instance still holds is due again now, not only when the leases expire.
            try:
                released = await self._release_leases(self._pool, self.owner)
            except SpoolError as exc:
                log.warning("spool: could not hand back leases at shutdown: %s", exc)
            else:
                if released:
                    log.info("spool: handed back %d unfinished message(s)", released)
        self._closed = True
        log.info("spool: closed after %d database round trip(s)", self.round_trips)
        if self._listen_task is not None:
            self._listen_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listen_task
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), timeout=5)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                self._pool.terminate()

    def _require_pool(self) -> asyncpg.Pool:
        if self._pool is None or self._closed:
            raise SpoolError("spool is not open")
        return self._pool

    async def _fetch(self, action: str, query: str, *args: Any) -> list[asyncpg.Record]:
        pool = self._require_pool()
        with _translate_errors(action):
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                self.round_trips += 1
                return list(await conn.fetch(query, *args))

    async def _fetchval(self, action: str, query: str, *args: Any) -> Any:
        pool = self._require_pool()
        with _translate_errors(action):
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                self.round_trips += 1
                return await conn.fetchval(query, *args)

    # endregion
    # region wake-ups

    def add_listener(self, callback: _Callback) -> None:
        """Call ``callback`` whenever any instance commits new due work.

        Starts one dedicated listening connection (not from the pool) that reconnects
        by itself; after every (re)connection the callbacks run once, since
        notifications sent while it was away are lost.
        """
        self._callbacks.append(callback)
        if self._listen_task is None and not self._closed:
            self._listen_task = asyncio.create_task(self._listen(), name="esprelay-spool-listen")

    def _notify_callbacks(self, *_: object) -> None:
        for callback in self._callbacks:
            callback()

    async def _listen(self) -> None:
        delay = 0.5
        while not self._closed:
            conn: asyncpg.Connection | None = None
            try:
                with _translate_errors("listening for new messages"):
                    conn = await self._connect()
                    lost = asyncio.Event()
                    conn.add_termination_listener(functools.partial(_set_event, lost))
                    await conn.add_listener(CHANNEL, self._notify_callbacks)
                    self._notify_callbacks()
                    delay = 0.5
                    while not lost.is_set():
                        with contextlib.suppress(TimeoutError):
                            async with self._timeout(LISTEN_KEEPALIVE):
                                await lost.wait()
                        if not lost.is_set():
                            await conn.execute("SELECT 1", timeout=CONNECT_TIMEOUT)
                log.warning("spool: lost the listening connection; reconnecting")
            except SpoolError as exc:
                log.warning("spool: %s; retrying in %.1fs", exc, delay)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.terminate()
            await self._sleep(delay)
            delay = min(delay * 2, 10.0)

    # endregion
    # region operations

    @property
    def body_directory(self) -> None:
        return None  # a message in a file is read from wherever it is, piece by piece

    async def put_parts(
        self,
        raw: bytes | Spilled,
        parts: Sequence[NewPart],
        *,
        lease_owner: str | None = None,
        lease_time: float = 0.0,
    ) -> list[str]:
        if isinstance(raw, Spilled) and len(raw) * len(parts) <= BODY_CHUNK:
            raw = await asyncio.to_thread(raw.read)
        rows = [
            (
                new_message_id(),
                part.envelope.mail_from,
                list(part.envelope.rcpt_tos),
                len(raw),
                part.provider,
                orjson.dumps(part.meta).decode(),
                lease_owner,
                float(lease_time),
            )
            for part in parts
        ]
        ids = [row[0] for row in rows]
        if isinstance(raw, bytes) and len(raw) * len(rows) <= BODY_CHUNK:
            # The common case: with the other messages arriving meanwhile, in one
            # statement (the group commit); returns only after its commit.  (Larger,
            # the body goes in pieces, so as not to be copied whole into buffers.)
            self._require_pool()
            await self._puts.submit((rows, raw))
            return ids
        inserted = await self._put_pieces(rows, raw)
        if inserted != ids:
            raise SpoolError("spool error while storing a message: insert not confirmed")
        if lease_owner is None:
            self._announce()
        return ids

    async def _put_pieces(self, rows: list[tuple[Any, ...]], raw: bytes | Spilled) -> list[str]:
        """Store several entries, or a large body piece by piece, in one transaction.

        One statement carrying 25 MB would be copied whole into asyncpg's send buffer
        and again into asyncio's; pieces of BODY_CHUNK bytes (memoryview slices of
        the one ``raw`` object, never copied by us) keep that to a megabyte or two.
        A message in a file is read one piece at a time.
        """
        pool = self._require_pool()
        size = len(raw)
        spilled, view = (raw, None) if isinstance(raw, Spilled) else (None, memoryview(raw))
        inserted = []
        with _translate_errors("storing a message"):
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
                self.round_trips += 2  # BEGIN, COMMIT
                for row in rows:
                    self.round_trips += 1
                    message_id = await conn.fetchval(_INSERT_MESSAGE, *row)
                    inserted.append(message_id)
                    pieces = range(0, size, BODY_CHUNK) if size else range(1)
                    for seq, start in enumerate(pieces):
                        self.round_trips += 1
                        if spilled is not None:
                            piece: bytes | memoryview = await asyncio.to_thread(
                                spilled.read_at, start, BODY_CHUNK
                            )
                        else:
                            assert view is not None
                            piece = view[start : start + BODY_CHUNK]
                        await conn.execute(
                            "INSERT INTO esprelay_bodies (message_id, seq, data)"
                            " VALUES ($1, $2, $3)",
                            message_id,
                            seq,
                            piece,
                        )
        return inserted

    async def _insert_batch(self, batch: list[tuple[list[_NewRow], bytes]]) -> list[None]:
        """Store the entries of every put in ``batch`` in one statement (one commit)."""
        ids: list[str] = []
        senders: list[str] = []
        firsts: list[int] = []
        lasts: list[int] = []
        sizes: list[int] = []
        providers: list[str] = []
        metas: list[str] = []
        owners: list[str | None] = []
        lease_times: list[float] = []
        bodies: list[bytes] = []
        recipients: list[str] = []
        for rows, raw in batch:
            for id, mail_from, rcpt_tos, size, provider, meta, owner, lease_time in rows:
                ids.append(id)
                senders.append(mail_from)
                firsts.append(len(recipients) + 1)
                recipients.extend(rcpt_tos)
                lasts.append(len(recipients))
                sizes.append(size)
                providers.append(provider)
                metas.append(meta)
                owners.append(owner)
                lease_times.append(lease_time)
                bodies.append(raw)
        status = await self._execute(
            "storing a message",
            _INSERT_BATCH,
            ids,
            senders,
            firsts,
            lasts,
            sizes,
            providers,
            metas,
            owners,
            lease_times,
            bodies,
            recipients,
        )
        if status != f"INSERT 0 {len(ids)}":
            raise SpoolError("spool error while storing a message: insert not confirmed")
        if None in owners:
            self._announce()  # once for the batch, after its commit
        return [None] * len(batch)

    async def _execute(self, action: str, query: str, *args: Any) -> str:
        pool = self._require_pool()
        with _translate_errors(action):
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                self.round_trips += 1
                status: str = await conn.execute(query, *args)
                return status

    def _announce(self) -> None:
        """Tell the other instances, after the commit, that new work is due.

        Not inside the insert's transaction: PostgreSQL serialises the commits of
        all transactions that NOTIFY (a database-wide lock), which would put every
        SMTP client in one line.  A burst of puts is folded into one NOTIFY per
        round trip; a lost one costs at most a poll interval.
        """
        if self._announcing is not None and not self._announcing.done():
            self._announce_again = True
            return
        self._announce_again = False
        self._announcing = asyncio.create_task(self._send_notify(), name="esprelay-spool-notify")

    async def _send_notify(self) -> None:
        while True:
            try:
                await self._fetchval("announcing new messages", "SELECT pg_notify($1, '')", CHANNEL)
            except SpoolError as exc:
                log.debug("spool: %s", exc)
            if not self._announce_again or self._closed:
                return
            self._announce_again = False

    async def lease(
        self, owner: str, limit: int, lease_time: float, *, max_bytes: int | None = None
    ) -> list[SpooledMessage]:
        if limit <= 0:
            return []
        if max_bytes is None:
            rows = await self._fetch("leasing messages", _LEASE, limit, owner, float(lease_time))
        else:
            rows = await self._fetch(
                "leasing messages",
                _LEASE_WITHIN_BYTES,
                limit,
                owner,
                float(lease_time),
                max_bytes,
            )
        messages = []
        for row in rows:
            raw = row["raw"]
            if raw is None:
                raw = await self._read_large_body(row["id"], row["size"])
                if raw is None:
                    continue  # deleted (esprelay queue delete) since it was leased
            messages.append(_record_to_message(row, raw=raw))
        messages.sort(key=lambda m: (m.next_attempt_at, m.id))
        return messages

    async def _read_large_body(self, id: str, size: int) -> bytes | None:
        """Fetch a body stored in several pieces, a few pieces at a time.

        The pieces go into one growing buffer whose value is then handed over
        without a copy (``BytesIO.getvalue`` shares it when it is exactly full), so
        a 25 MB body costs about 25 MB, where one statement returning it whole would
        cost three times that inside the driver.
        """
        pool = self._require_pool()
        buffer = io.BytesIO()
        pieces = 0
        with _translate_errors("reading a message body"):
            async with (
                pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn,
                conn.transaction(readonly=True),
            ):
                async for row in conn.cursor(
                    "SELECT data FROM esprelay_bodies WHERE message_id = $1 ORDER BY seq",
                    id,
                    prefetch=2,
                ):
                    buffer.write(row["data"])
                    pieces += 1
        # BEGIN, the cursor's opening, a fetch per two pieces, COMMIT.
        self.round_trips += 3 + pieces // 2
        if not pieces:
            return None
        body = buffer.getvalue()
        if len(body) != size:
            raise SpoolError(f"spool error: body of {id} is {len(body)} bytes, expected {size}")
        return body

    async def _finish(
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
        rcpt_tos: Sequence[str] | None = None,
    ) -> bool:
        # With the other outcomes recorded meanwhile, in one statement (the group
        # commit): the lease checked, the attempt counted and recorded, the body
        # dropped if asked, all in one commit.
        item: _Outcome = (
            id,
            owner,
            state.value,
            outcome,
            error,
            provider,
            provider_message_id,
            next_attempt_at,
            drop_body,
            None if rcpt_tos is None else list(rcpt_tos),
        )
        return bool(await self._outcomes.submit(item))

    async def _finish_batch(self, batch: list[_Outcome]) -> list[bool]:
        """Record every outcome of ``batch`` in one statement; which were recorded."""
        columns: list[list[Any]] = [[] for _ in range(11)]
        recipients: list[str] = []
        for *values, rcpt_tos in batch:
            for column, value in zip(columns[:9], values, strict=True):
                column.append(value)
            if rcpt_tos is None:
                columns[9].append(None)
                columns[10].append(None)
            else:
                columns[9].append(len(recipients) + 1)
                recipients.extend(rcpt_tos)
                columns[10].append(len(recipients))
        finished = await self._fetchval("recording attempts", _FINISH_BATCH, *columns, recipients)
        done = set(finished or ())
        return [item[0] in done for item in batch]

    async def mark_delivered(
        self, id: str, *, owner: str, provider: str, provider_message_id: str | None
    ) -> bool:
        return await self._finish(
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

    async def mark_retry(
        self, id: str, *, owner: str, provider: str, error: str, next_attempt_at: float
    ) -> bool:
        return await self._finish(
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

    async def mark_failed(self, id: str, *, owner: str, provider: str, error: str) -> bool:
        return await self._finish(
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
        # One statement: the envelope narrowed to the recipients still to be tried and
        # the attempt recorded commit together, or neither does (the lease then
        # expires and the message is tried again whole).
        requeue = bool(rcpt_tos)
        return await self._finish(
            id,
            owner,
            provider,
            state=MessageState.QUEUED if requeue else MessageState.DELIVERED,
            outcome="partial",
            error=note,
            provider_message_id=provider_message_id,
            next_attempt_at=next_attempt_at if requeue else None,
            drop_body=not requeue,
            rcpt_tos=rcpt_tos if requeue else None,
        )

    async def get(self, id: str, *, with_body: bool = False) -> SpooledMessage | None:
        pool = self._require_pool()
        with _translate_errors("reading a message"):
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
                row = await conn.fetchrow(
                    f"SELECT {_COLUMNS}, has_body,"
                    f" {_small_body('m') if with_body else 'NULL::bytea'} AS raw"
                    " FROM esprelay_messages AS m WHERE id = $1",
                    id,
                )
                if row is None:
                    return None
                attempts = await conn.fetch(
                    "SELECT number, at, provider, outcome, error, provider_message_id"
                    " FROM esprelay_attempts WHERE message_id = $1 ORDER BY number",
                    id,
                )
        raw = row["raw"]
        if with_body and raw is None and row["has_body"]:
            raw = await self._read_large_body(id, row["size"])
        history = tuple(Attempt(*attempt) for attempt in attempts)
        return _record_to_message(row, raw=raw, history=history)

    async def list(
        self, *, state: MessageState | None = None, limit: int = 100
    ) -> list[SpooledMessage]:
        if state is None:
            rows = await self._fetch(
                "listing messages",
                f"SELECT {_COLUMNS} FROM esprelay_messages ORDER BY created_at, id LIMIT $1",
                limit,
            )
        else:
            rows = await self._fetch(
                "listing messages",
                f"SELECT {_COLUMNS} FROM esprelay_messages WHERE state = $1"
                " ORDER BY created_at, id LIMIT $2",
                state.value,
                limit,
            )
        return [_record_to_message(row) for row in rows]

    async def retry_now(self, id: str) -> bool:
        updated = await self._fetchval(
            "retrying a message",
            "WITH updated AS ("
            f" UPDATE esprelay_messages SET state = 'queued', next_attempt_at = {_NOW},"
            f" updated_at = {_NOW},"
            # A failed message retried by hand gets a fresh queue lifetime.
            f" created_at = CASE WHEN state = 'failed' THEN {_NOW} ELSE created_at END"
            " WHERE id = $1 AND state IN ('queued', 'failed') AND has_body"
            " RETURNING id)"
            " SELECT updated.id FROM updated, LATERAL pg_notify($2, '') AS notified",
            id,
            CHANNEL,
        )
        return updated is not None

    async def delete(self, id: str) -> bool:
        deleted = await self._fetchval(
            "deleting a message",
            "DELETE FROM esprelay_messages WHERE id = $1 RETURNING id",
            id,
        )
        return deleted is not None

    async def stats(self) -> SpoolStats:
        pool = self._require_pool()
        with _translate_errors("reading spool statistics"):
            async with (
                pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                rows = await conn.fetch(
                    "SELECT state, count(*) AS n FROM esprelay_messages GROUP BY state"
                )
                oldest = await conn.fetchval(
                    "SELECT min(created_at) FROM esprelay_messages"
                    " WHERE state IN ('queued', 'in_flight')"
                )
        counts = {MessageState(row["state"]): int(row["n"]) for row in rows}
        return SpoolStats(counts=counts, oldest_queued_at=oldest)

    async def next_due(self) -> float | None:
        value = await self._fetchval(
            "reading the next due time",
            "SELECT least("
            " (SELECT min(next_attempt_at) FROM esprelay_messages WHERE state = 'queued'),"
            " (SELECT min(lease_expires_at) FROM esprelay_messages WHERE state = 'in_flight'))",
        )
        return None if value is None else float(value)

    async def hold(self, ids: Sequence[str] | None) -> tuple[str, ...]:
        """Hold queued and in-flight messages (all of them with ``ids`` None): they are
        not leased until released; one in flight finishes its attempt.  Returns the ids
        held (already held ones included)."""
        rows = await self._fetch(
            "holding messages",
            "UPDATE esprelay_messages SET held = true"
            " WHERE state IN ('queued', 'in_flight') AND ($1::text[] IS NULL OR id = ANY($1))"
            " RETURNING id",
            None if ids is None else list(ids),
        )
        return _in_order(ids, [row["id"] for row in rows])

    async def release(self, ids: Sequence[str] | None) -> tuple[str, ...]:
        """Release held messages (all with ``ids`` None), due now; return their ids."""
        rows = await self._fetch(
            "releasing messages",
            "WITH released AS ("
            f" UPDATE esprelay_messages SET held = false, updated_at = {_NOW},"
            f" next_attempt_at = least(next_attempt_at, {_NOW})"
            " WHERE held AND ($1::text[] IS NULL OR id = ANY($1)) RETURNING id)"
            " SELECT released.id FROM released, LATERAL pg_notify($2, '') AS notified",
            None if ids is None else list(ids),
            CHANNEL,
        )
        return _in_order(ids, [row["id"] for row in rows])

    async def flush(self) -> int:
        """Make every queued message that is not held due now; return how many."""
        flushed = await self._fetchval(
            "making the queue due now",
            "WITH flushed AS ("
            f" UPDATE esprelay_messages SET next_attempt_at = {_NOW}, updated_at = {_NOW}"
            f" WHERE state = 'queued' AND NOT held AND next_attempt_at > {_NOW} RETURNING 1)"
            " SELECT count(*) FROM flushed, LATERAL pg_notify($1, '') AS notified",
            CHANNEL,
        )
        return int(flushed)

    async def held_ids(self) -> set[str]:
        """The ids of the held messages."""
        rows = await self._fetch(
            "listing held messages", "SELECT id FROM esprelay_messages WHERE held"
        )
        return {row["id"] for row in rows}

    async def purge(self, *, delivered_before: float, failed_before: float) -> int:
        removed = await self._fetchval(
            "purging finished messages",
            "WITH removed AS (DELETE FROM esprelay_messages"
            " WHERE (state = 'delivered' AND updated_at < $1)"
            " OR (state = 'failed' AND updated_at < $2) RETURNING 1)"
            " SELECT count(*) FROM removed",
            delivered_before,
            failed_before,
        )
        return int(removed)

    # endregion
    # region event inbox (esprelay.events): verified ESP events, stored once each

    async def put_events(self, events: Sequence[Event]) -> _InboxResults:
        """Store ``events``; return once committed (see EventInbox).

        Concurrent requests' events share a statement and a commit (their own group
        commit, ``_event_puts``): one webhook request with one event each, Mailgun's
        way, costs a fraction of a round trip and of a WAL flush.
        """
        if not events:
            return []
        results: _InboxResults = await self._event_puts.submit(events)
        return results

    async def _insert_events_batch(self, batch: _EventPuts) -> _Answers:
        """Store the events of every request in ``batch`` in one statement (one commit);
        each request's results, in order."""
        # The first of several events with one key is the one stored; the others are
        # duplicates, as they would be in separate requests one after the other.
        first: dict[tuple[str, str], tuple[int, int]] = {}
        columns: list[list[Any]] = [[] for _ in range(11)]
        for request, events in enumerate(batch):
            for index, event in enumerate(events):
                key = (event.provider, event.provider_event_id)
                if key in first:
                    continue
                first[key] = (request, index)
                for column, value in zip(columns, event_row(event), strict=True):
                    column.append(_no_nul(value))
        rows = await self._fetch("storing events", _INSERT_EVENTS, *columns)
        inserted = {(row["provider"], row["event_id"]): row["message_id"] for row in rows}
        answers: _Answers = []
        for request, events in enumerate(batch):
            results = []
            for index, event in enumerate(events):
                key = (event.provider, event.provider_event_id)
                stored = first.get(key) == (request, index)
                stored_key = (_no_nul(event.provider), _no_nul(event.provider_event_id))
                stored = stored and stored_key in inserted
                results.append(InboxResult(stored, inserted.get(stored_key) if stored else None))
            answers.append(results)
        return answers

    async def pending_events(self, limit: int = 100) -> _StoredEvents:
        rows = await self._fetch(
            "reading events",
            f"SELECT {EVENT_COLUMNS} FROM esprelay_events WHERE processed_at IS NULL"
            " ORDER BY seq LIMIT $1",
            limit,
        )
        return [stored_event(tuple(row)) for row in rows]

    async def finish_events(self, seqs: Sequence[int]) -> int:
        if not seqs:
            return 0
        count = await self._fetchval(
            "finishing events",
            "WITH done AS (UPDATE esprelay_events SET processed_at = "
            f"{_NOW} WHERE seq = ANY($1::bigint[]) AND processed_at IS NULL RETURNING 1)"
            " SELECT count(*) FROM done",
            list(seqs),
        )
        return int(count)

    async def purge_events(self, *, processed_before: float) -> int:
        count = await self._fetchval(
            "purging events",
            "WITH removed AS (DELETE FROM esprelay_events"
            " WHERE processed_at IS NOT NULL AND processed_at < $1 RETURNING 1)"
            " SELECT count(*) FROM removed",
            processed_before,
        )
        return int(count)

    # endregion
    # region message status (esprelay.events.status): what the ESP events said

    async def apply_event(
        self, message_id: str, recipient: str, event: Event, *, dsn: str | None = None
    ) -> Applied | None:
        """See :class:`~esprelay.events.status.MessageStatusStore`; None when the message
        is not in the spool (purged meanwhile)."""
        row = [_no_nul(value) for value in (message_id, *entry_row(recipient, event))]
        pool = self._require_pool()
        with _translate_errors("applying an event"):
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
                self.round_trips += 3  # BEGIN, the lookup, COMMIT
                # Locks the message's row: a purge waits, or went first.
                found = await conn.fetchval(
                    "SELECT 1 FROM esprelay_messages WHERE id = $1 FOR SHARE", message_id
                )
                if found is None:
                    return None
                self.round_trips += 1
                new = await conn.fetchval(_INSERT_TIMELINE, *row) is not None
                changed = new and event.kind in STATUS_KINDS
                if changed:
                    self.round_trips += 1
                    changed = await conn.fetchval(_UPSERT_RECIPIENT, *row) is not None
                claimed = False
                if dsn is not None:
                    self.round_trips += 1
                    claimed = await conn.fetchval(_CLAIM_DSN, dsn, row[0], row[3]) is not None
        return Applied(new, changed, claimed)

    async def apply_events(self, batch: Sequence[Application]) -> _AppliedList:
        """See :class:`~esprelay.events.status.MessageStatusStore`: one transaction of
        five round trips, whatever the batch holds.

        The batch's messages are locked (``FOR NO KEY UPDATE``, in id order: a purge
        waits, or went first; another instance applying events to one of them waits
        for this one), then what their timelines and recipients hold of the batch is
        read, the batch is applied to that in memory one event after the other
        (:func:`~esprelay.events.status.plan_batch`, the rules of ``apply_event``),
        and what changed is written by one statement of arrays.
        """
        if not batch:
            return []
        items = [
            Application(
                _no_nul(item.message_id), _no_nul(item.recipient), _clean(item.event), item.dsn
            )
            for item in batch
        ]
        ids = sorted({item.message_id for item in items})
        pool = self._require_pool()
        with _translate_errors("applying events"):
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
                self.round_trips += 3  # BEGIN, the lock, COMMIT
                locked = await conn.fetch(_LOCK_MESSAGES, ids)
                present = {row[0] for row in locked}
                wanted = [item for item in items if item.message_id in present]
                if not wanted:
                    return [None] * len(items)
                self.round_trips += 2  # what the batch finds, what it writes
                found = await conn.fetch(
                    _BATCH_STATE,
                    [item.message_id for item in wanted],
                    [item.event.provider for item in wanted],
                    [item.event.provider_event_id for item in wanted],
                    [item.recipient for item in wanted],
                )
                plan = plan_batch(
                    items,
                    messages=present,
                    timeline=[(row["message_id"], row["a"], row["b"]) for row in found if row["t"]],
                    recipients={
                        (row["message_id"], row["a"]): (row["at"], row["dsn"])
                        for row in found
                        if not row["t"]
                    },
                )
                await conn.execute(_WRITE_BATCH, *_batch_columns(plan))
        return plan.results

    async def get_messages(
        self, ids: Sequence[str], *, with_body: bool = False
    ) -> dict[str, SpooledMessage]:
        """The messages of ``ids`` still in the spool, by id, in one statement (without
        their attempts' history; with their bodies if asked, a large one read apart)."""
        wanted = list(dict.fromkeys(_no_nul(id) for id in ids))
        if not wanted:
            return {}
        rows = await self._fetch(
            "reading messages",
            f"SELECT {_COLUMNS}, has_body,"
            f" {_small_body('m') if with_body else 'NULL::bytea'} AS raw"
            " FROM esprelay_messages AS m WHERE id = ANY($1::text[])",
            wanted,
        )
        found: dict[str, SpooledMessage] = {}
        for row in rows:
            raw = row["raw"]
            if with_body and raw is None and row["has_body"]:
                raw = await self._read_large_body(row["id"], row["size"])
            found[row["id"]] = _record_to_message(row, raw=raw)
        return found

    async def release_dsn(self, message_id: str, recipient: str, kind: str) -> None:
        await self._fetch(
            "releasing a DSN",
            "UPDATE esprelay_message_recipients SET dsn = array_remove(dsn, $3)"
            " WHERE message_id = $1 AND recipient = $2",
            message_id,
            _no_nul(recipient),
            kind,
        )

    async def message_status(self, message_id: str) -> MessageStatus:
        pool = self._require_pool()
        with _translate_errors("reading a message's status"):
            async with (
                pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                self.round_trips += 4  # BEGIN, two reads, COMMIT
                recipients = await conn.fetch(
                    f"SELECT {ENTRY_COLUMNS}, dsn FROM esprelay_message_recipients"
                    " WHERE message_id = $1 ORDER BY recipient",
                    message_id,
                )
                timeline = await conn.fetch(
                    f"SELECT {ENTRY_COLUMNS} FROM esprelay_message_timeline"
                    " WHERE message_id = $1 ORDER BY at, seq",
                    message_id,
                )
        return MessageStatus(
            recipients=tuple(RecipientStatus(entry(tuple(r)), tuple(r["dsn"])) for r in recipients),
            timeline=tuple(entry(tuple(r)) for r in timeline),
        )

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
        rows = await self._fetch(
            "searching messages",
            f"SELECT {_COLUMNS} FROM esprelay_messages"
            " WHERE ($1::text IS NULL OR meta->>'message_id_header' = $1)"
            " AND ($2::text IS NULL OR EXISTS"
            " (SELECT 1 FROM unnest(rcpt_tos) AS r WHERE lower(r) = $2))"
            " AND ($3::float8 IS NULL OR created_at >= $3)"
            " AND ($4::float8 IS NULL OR created_at < $4)"
            " ORDER BY created_at, id LIMIT $5",
            None if header_message_id is None else _no_nul(header_message_id),
            None if recipient is None else _no_nul(recipient.lower()),
            since,
            until,
            limit,
        )
        return [_record_to_message(row) for row in rows]

    # endregion
    # region lookup by the ESP's message id (events that carry no esprelay id)

    async def find_by_provider_message_id(
        self, provider: str, provider_message_id: str
    ) -> SpooledMessage | None:
        """The message ``provider`` (its configured name) accepted as
        ``provider_message_id`` (the id its send API answered), without its body; the
        newest if the ESP gave one id twice; None if none."""
        rows = await self._fetch(
            "finding a message by its ESP id",
            f"SELECT {_COLUMNS} FROM esprelay_messages {_BY_PROVIDER_ID}",
            _no_nul(provider),
            _no_nul(provider_message_id),
        )
        return _record_to_message(rows[0]) if rows else None

    # endregion


def _put_weight(put: tuple[list[_NewRow], bytes]) -> int:
    rows, raw = put
    return len(rows) * len(raw)


def _events_weight(events: Sequence[Event]) -> int:
    """About the bytes a request's events take in a batch (their raw JSON dominates)."""
    return sum(512 + len(event.recipient or "") for event in events)


def _outcome_id(outcome: _Outcome) -> str:
    return outcome[0]


def _in_order(ids: Sequence[str] | None, changed: list[str]) -> tuple[str, ...]:
    """``changed`` in the order of ``ids`` (as given), or sorted when all were asked for."""
    if ids is None:
        return tuple(sorted(changed))
    done = set(changed)
    return tuple(id for id in dict.fromkeys(ids) if id in done)


def _set_event(event: asyncio.Event, *_: object) -> None:
    event.set()


def _qualified(alias: str) -> str:
    return ", ".join(f"{alias}.{column.strip()}" for column in _COLUMNS.split(","))


def _record_to_message(
    row: asyncpg.Record, *, raw: bytes | None = None, history: tuple[Attempt, ...] = ()
) -> SpooledMessage:
    return SpooledMessage(
        id=row["id"],
        envelope=Envelope(mail_from=row["mail_from"], rcpt_tos=tuple(row["rcpt_tos"])),
        size=row["size"],
        state=MessageState(row["state"]),
        attempts=row["attempts"],
        created_at=row["created_at"],
        next_attempt_at=row["next_attempt_at"],
        provider=row["provider"],
        # asyncpg hands bytea over as one bytes object: no further copy here.
        raw=raw,
        last_error=row["last_error"],
        provider_message_id=row["provider_message_id"],
        lease_owner=row["lease_owner"],
        lease_expires_at=row["lease_expires_at"],
        updated_at=row["updated_at"],
        history=history,
        meta=orjson.loads(row["meta"]),
    )


__all__ = [
    "CHANNEL",
    "SCHEMA_VERSION",
    "PostgresSpool",
    "migrate",
    "redact_url",
    "schema_version",
    "upgrade",
]


# region lookup by the ESP's message id (events that carry no esprelay id)

_BY_PROVIDER_ID = (
    "WHERE provider = $1 AND provider_message_id = $2 ORDER BY created_at DESC, id DESC LIMIT 1"
)
#: The message an event names by the ESP's id, as a subquery of _INSERT_EVENTS.
_SENT_AS = (
    "SELECT s.id FROM esprelay_messages AS s WHERE s.provider = e.provider"
    " AND s.provider_message_id = e.esp_message_id ORDER BY s.created_at DESC, s.id DESC LIMIT 1"
)

# endregion
# region event inbox statements (esprelay.events)

# (``list`` in the class is its method of that name.)
_InboxResults = list[InboxResult]
_StoredEvents = list[StoredEvent]
# A batch of put_events (each request's events) and their results.
_EventPuts = list[Sequence[Event]]
_Answers = list[_InboxResults]

# One statement for a whole request's events: arrays of columns, unnested; the
# spool message an echoed id names is looked up on the way in.
_INSERT_EVENTS = (
    "INSERT INTO esprelay_events (provider, event_id, kind, recipient, at, smtp_status,"
    " diagnostic, esp_message_id, esprelay_id, remote_mta, raw, received_at, message_id)"
    " SELECT e.provider, e.event_id, e.kind, e.recipient, e.at, e.smtp_status, e.diagnostic,"
    f" e.esp_message_id, e.esprelay_id, e.remote_mta, e.raw, {_NOW},"
    " COALESCE((SELECT m.id FROM esprelay_messages AS m WHERE m.id = e.esprelay_id),"
    f" ({_SENT_AS}))"
    " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[], $6::text[],"
    " $7::text[], $8::text[], $9::text[], $10::text[], $11::text[])"
    " AS e(provider, event_id, kind, recipient, at, smtp_status, diagnostic, esp_message_id,"
    " esprelay_id, remote_mta, raw)"
    " ON CONFLICT (provider, event_id) DO NOTHING"
    " RETURNING provider, event_id, message_id"
)


def _no_nul(value: Any) -> Any:
    """PostgreSQL text holds no NUL character: an ESP's string loses them."""
    return value.replace("\x00", "") if isinstance(value, str) else value


# endregion


# region message status statements (esprelay.events.status)

_Messages = list[SpooledMessage]
_AppliedList = list[Applied | None]

# ($1 message_id, $2 provider, $3 event_id, $4 recipient, $5 kind, $6 at, $7 smtp_status,
# $8 diagnostic, $9 remote_mta)
_INSERT_TIMELINE = (
    "INSERT INTO esprelay_message_timeline (message_id, provider, event_id, recipient, kind,"
    " at, smtp_status, diagnostic, remote_mta) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
    " ON CONFLICT DO NOTHING RETURNING 1"
)
# The same parameters: the recipient's status, unless it holds a more recent event.
_UPSERT_RECIPIENT = (
    "INSERT INTO esprelay_message_recipients AS r (message_id, provider, event_id, recipient,"
    " kind, at, smtp_status, diagnostic, remote_mta)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
    " ON CONFLICT (message_id, recipient) DO UPDATE SET provider = excluded.provider,"
    " event_id = excluded.event_id, kind = excluded.kind, at = excluded.at,"
    " smtp_status = excluded.smtp_status, diagnostic = excluded.diagnostic,"
    " remote_mta = excluded.remote_mta WHERE excluded.at >= r.at RETURNING 1"
)
# ($1 kind, $2 message_id, $3 recipient): claimed only if no DSN of that kind was.
_CLAIM_DSN = (
    "UPDATE esprelay_message_recipients SET dsn = array_append(dsn, $1)"
    " WHERE message_id = $2 AND recipient = $3 AND NOT ($1 = ANY (dsn)) RETURNING 1"
)

# apply_events: the batch's messages locked, in id order (two instances lock theirs in
# one order, and never wait on each other in a circle).
_LOCK_MESSAGES = (
    "SELECT id FROM esprelay_messages WHERE id = ANY($1::text[]) ORDER BY id FOR NO KEY UPDATE"
)
# What the timelines hold of the batch's events ($1 message_id, $2 provider, $3
# event_id; t true, a and b the provider and event id), and the status of its
# recipients ($1 message_id, $4 recipient; a the recipient): in one statement, after
# the lock (a statement of its own: its snapshot is taken once the locks are held).
_BATCH_STATE = (
    "WITH u AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])"
    " AS u(message_id, provider, event_id, recipient))"
    " SELECT true AS t, tl.message_id, tl.provider AS a, tl.event_id AS b,"
    " NULL::float8 AS at, NULL::text[] AS dsn FROM esprelay_message_timeline AS tl"
    " WHERE (tl.message_id, tl.provider, tl.event_id)"
    " IN (SELECT message_id, provider, event_id FROM u)"
    " UNION ALL"
    " SELECT false, r.message_id, r.recipient, NULL, r.at, r.dsn"
    " FROM esprelay_message_recipients AS r"
    " WHERE (r.message_id, r.recipient) IN (SELECT message_id, recipient FROM u)"
)
# What a batch writes (status.BatchPlan), in one statement: the new timeline rows
# ($1-$9); each recipient's new status with the DSN kinds it claims ($10-$19, the
# kinds comma-separated); and the kinds claimed for a recipient whose status stays
# ($20-$22; never one of $10's, so no row is changed twice).
_WRITE_BATCH = (
    "WITH t AS (INSERT INTO esprelay_message_timeline (message_id, provider, event_id,"
    " recipient, kind, at, smtp_status, diagnostic, remote_mta)"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],"
    " $6::float8[], $7::text[], $8::text[], $9::text[]) ON CONFLICT DO NOTHING),"
    " s AS (INSERT INTO esprelay_message_recipients AS r (message_id, provider, event_id,"
    " recipient, kind, at, smtp_status, diagnostic, remote_mta, dsn)"
    " SELECT u.message_id, u.provider, u.event_id, u.recipient, u.kind, u.at, u.smtp_status,"
    " u.diagnostic, u.remote_mta, string_to_array(u.claims, ',')"
    " FROM unnest($10::text[], $11::text[], $12::text[], $13::text[], $14::text[],"
    " $15::float8[], $16::text[], $17::text[], $18::text[], $19::text[])"
    " AS u(message_id, provider, event_id, recipient, kind, at, smtp_status, diagnostic,"
    " remote_mta, claims)"
    " ON CONFLICT (message_id, recipient) DO UPDATE SET provider = excluded.provider,"
    " event_id = excluded.event_id, kind = excluded.kind, at = excluded.at,"
    " smtp_status = excluded.smtp_status, diagnostic = excluded.diagnostic,"
    " remote_mta = excluded.remote_mta, dsn = r.dsn"
    " || ARRAY(SELECT k FROM unnest(excluded.dsn) AS k WHERE NOT (k = ANY (r.dsn))))"
    " UPDATE esprelay_message_recipients AS r SET dsn = r.dsn"
    " || ARRAY(SELECT k FROM unnest(string_to_array(c.claims, ',')) AS k"
    " WHERE NOT (k = ANY (r.dsn)))"
    " FROM unnest($20::text[], $21::text[], $22::text[]) AS c(message_id, recipient, claims)"
    " WHERE r.message_id = c.message_id AND r.recipient = c.recipient"
)


def _batch_columns(plan: BatchPlan) -> list[list[Any]]:
    """``_WRITE_BATCH``'s arrays for ``plan``."""
    columns: list[list[Any]] = [[] for _ in range(22)]
    for row in plan.timeline:
        for column, value in zip(columns[:9], row, strict=True):
            column.append(value)
    for key, row in plan.statuses.items():
        for column, value in zip(columns[9:18], row, strict=True):
            column.append(value)
        columns[18].append(",".join(plan.claims.get(key, ())))
    for (message_id, recipient), kinds in plan.claims.items():
        if (message_id, recipient) not in plan.statuses:
            columns[19].append(message_id)
            columns[20].append(recipient)
            columns[21].append(",".join(kinds))
    return columns


def _clean(event: Event) -> Event:
    """``event`` with the NUL characters of its strings dropped, as they are stored."""
    values = (event.provider, event.provider_event_id, event.smtp_status, event.diagnostic)
    if not any(isinstance(v, str) and "\x00" in v for v in (*values, event.remote_mta)):
        return event
    return replace(
        event,
        provider=_no_nul(event.provider),
        provider_event_id=_no_nul(event.provider_event_id),
        smtp_status=_no_nul(event.smtp_status),
        diagnostic=_no_nul(event.diagnostic),
        remote_mta=_no_nul(event.remote_mta),
    )


# endregion


def _lease_sql(by_size: bool) -> str:
    """Claiming up to $1 due messages for owner $2 for $3 seconds, with their small
    bodies; ``by_size``: only those whose sizes add up to at most $4, the first whatever
    its size (``Spool.lease``).  Rows locked and left out stay due.

    One locking scan per partial index, each in its index's order, and the update by
    primary key: an ``OR`` of the two conditions was served by neither index, and a join
    with the chosen rows may be planned as a scan of every message, so a lease read and
    sorted the whole backlog (11.5 ms with 5,000 queued; bench/README.md).
    """
    picked = (
        ", within AS (SELECT id FROM (SELECT id,"
        " sum(size) OVER (ORDER BY next_attempt_at, id) AS total,"
        " row_number() OVER (ORDER BY next_attempt_at, id) AS n FROM due) AS running"
        " WHERE n = 1 OR total <= $4)"
        if by_size
        else ""
    )
    source = "within" if by_size else "due"
    return (
        "WITH queued AS ("
        " SELECT id, size, next_attempt_at FROM esprelay_messages"
        f" WHERE state = 'queued' AND next_attempt_at <= {_NOW} AND NOT held"
        " ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)"
        ", expired AS ("
        " SELECT id, size, next_attempt_at FROM esprelay_messages"
        f" WHERE state = 'in_flight' AND lease_expires_at <= {_NOW} AND NOT held"
        " ORDER BY lease_expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)"
        ", due AS ("
        " SELECT id, size, next_attempt_at FROM"
        " (SELECT * FROM queued UNION ALL SELECT * FROM expired) AS c"
        f" ORDER BY next_attempt_at, id LIMIT $1){picked}"
        ", leased AS ("
        " UPDATE esprelay_messages AS m SET state = 'in_flight', lease_owner = $2,"
        f" lease_expires_at = {_NOW} + $3, updated_at = {_NOW}"
        f" WHERE m.id = ANY(ARRAY(SELECT id FROM {source}))"
        f" RETURNING {_qualified('m')}, m.has_body)"
        f" SELECT leased.*, {_small_body('leased')} AS raw FROM leased"
    )


_LEASE = _lease_sql(False)
_LEASE_WITHIN_BYTES = _lease_sql(True)
