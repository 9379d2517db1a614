"""Crash and chaos tests: real esprelay processes, SIGKILL, a PostgreSQL outage, an
ESP outage.  The claim under test: every message answered ``250`` is delivered at
least once.  Duplicates are counted and reported (they can only come from a kill
between the ESP's answer and the spool update) and bounded.

Everything runs on loopback and is bounded in time and in messages.  The far end is
the outbox provider; its ``deliveries.log`` records every write, so a message
delivered twice shows up twice.  PostgreSQL cases use a database of their own on
the local server, and reach it through a TCP proxy when they need to cut it off:
the machine's real cluster is never restarted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
import signal
import smtplib
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from esprelay.models import MessageState
from esprelay.spool import open_spool
from tests.pgutil import server_address, temporary_database, with_port
from tests.relayproc import RelayProcess

pytestmark = pytest.mark.slow

#: Deliveries at once per instance; duplicates per kill can never exceed it.
CONCURRENCY = 4
LEASE_TIME = 2.0


@pytest.fixture(params=["sqlite", "postgresql"])
def spool_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'data' / 'spool.db'}"
        return
    with temporary_database() as url:
        yield url


@pytest.fixture
def pg_url() -> Iterator[str]:
    with temporary_database() as url:
        yield url


def base_env(spool_url: str, **extra: str) -> dict[str, str]:
    return {
        "ESPRELAY_SPOOL_URL": spool_url,
        "ESPRELAY_DELIVERY_CONCURRENCY": str(CONCURRENCY),
        "ESPRELAY_LEASE_TIME": str(LEASE_TIME),
        "ESPRELAY_POLL_INTERVAL": "0.2",
        "ESPRELAY_RETRY_INITIAL": "0.5",
        "ESPRELAY_RETRY_MAX": "1",
        "ESPRELAY_RETRY_CONFIG_ERROR": "0",
        **extra,
    }


# region SMTP load


def message(token: str) -> bytes:
    return (
        f"From: app@example.com\r\nTo: ops@example.org\r\nSubject: chaos {token}\r\n"
        f"X-Chaos-Token: {token}\r\n\r\nbody of {token}\r\n"
    ).encode()


def send_one(port: int, token: str) -> tuple[int, str]:
    """One message over one connection: (DATA reply code, text), or (0, error)."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=15) as smtp:
            smtp.ehlo("chaos.test")
            smtp.mail("app@example.com")
            smtp.rcpt("ops@example.org")
            code, reply = smtp.data(message(token))
            return code, reply.decode(errors="replace")
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code, str(exc.smtp_error)
    except (OSError, smtplib.SMTPException) as exc:
        return 0, f"{type(exc).__name__}: {exc}"


def queued_id(reply: str) -> str:
    return reply.rsplit("queued as ", 1)[1].strip()


class Load:
    """Threads sending messages to whichever relay ``target()`` names, until stopped.

    Every 250 is recorded with its spool id; ``accepted_event`` fires on each one.
    Each thread starts at most one message per ``pace`` seconds, so that ``limit``
    lasts for the whole test however fast the relay answers: a load that has run out
    would leave a later phase waiting for a 250 that can never come.
    """

    def __init__(
        self,
        target: Callable[[], int],
        threads: int = 3,
        limit: int = 10_000,
        pace: float = 0.0,
    ) -> None:
        self.target = target
        self.pace = pace
        self.accepted: dict[str, str] = {}  # spool id -> token
        self.replies: collections.Counter[int] = collections.Counter()
        self.accepted_event = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sent = 0
        self._limit = limit
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            port = self.target()
            if not port:  # between a kill and the restart
                time.sleep(0.02)
                continue
            with self._lock:
                if self._sent >= self._limit:
                    return
                self._sent += 1
                token = f"t{self._sent:05d}-{random.getrandbits(32):08x}"
            started = time.monotonic()
            code, reply = send_one(port, token)
            with self._lock:
                self.replies[code] += 1
                if code == 250:
                    self.accepted[queued_id(reply)] = token
            if code == 250:
                self.accepted_event.set()
            elif code == 0:
                time.sleep(0.02)  # the relay is down: a real client would back off too
            self._stop.wait(max(0.0, self.pace - (time.monotonic() - started)))

    @property
    def exhausted(self) -> bool:
        with self._lock:
            return self._sent >= self._limit


# endregion
# region spool inspection


def in_flight(spool_url: str, owner_pid: int | None = None) -> dict[str, float]:
    """Ids leased right now (optionally by one process) and their lease expiry."""
    if spool_url.startswith("sqlite"):
        path = spool_url.removeprefix("sqlite:///")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            rows = conn.execute(
                "SELECT id, lease_expires_at, lease_owner FROM messages WHERE state = 'in_flight'"
            ).fetchall()
        finally:
            conn.close()
    else:

        async def fetch() -> list[tuple[str, float, str]]:
            conn = await asyncpg.connect(spool_url, timeout=5)
            try:
                records = await conn.fetch(
                    "SELECT id, lease_expires_at, lease_owner FROM esprelay_messages"
                    " WHERE state = 'in_flight'"
                )
            finally:
                await conn.close()
            return [(r[0], r[1], r[2]) for r in records]

        rows = asyncio.run(fetch())
    return {
        row[0]: row[1] for row in rows if owner_pid is None or str(row[2]).endswith(f":{owner_pid}")
    }


def kill_while_delivering(
    relay: RelayProcess, spool_url: str, tries: int = 200
) -> dict[str, float]:
    """Freeze the process until the spool shows it holding leases, then SIGKILL it.

    Returns the leases it died with (empty if it never held any while frozen).
    """
    held: dict[str, float] = {}
    for _ in range(tries):
        relay.send_signal(signal.SIGSTOP)
        held = in_flight(spool_url, relay.pid)
        if held:
            break
        relay.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    relay.send_signal(signal.SIGKILL)
    relay.kill()
    return held


def kill_during_data(relay: RelayProcess) -> str:
    """Start a message, send half of its DATA, SIGKILL the relay; return its token."""
    token = f"partial-{random.getrandbits(32):08x}"
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        stream = sock.makefile("rb")
        assert stream.readline().startswith(b"220")
        sock.sendall(b"EHLO chaos.test\r\n")
        while not stream.readline().startswith(b"250 "):
            pass
        sock.sendall(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<ops@example.org>\r\nDATA\r\n")
        assert [stream.readline()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
        sock.sendall(message(token)[:40])
        time.sleep(0.1)
        relay.send_signal(signal.SIGKILL)
        relay.kill()
        rest = stream.read()
    assert b"250" not in rest  # the client never heard "accepted"
    return token


def wait_until_delivered(relay: RelayProcess, ids: set[str], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = relay.deliveries()
        if ids <= set(log):
            return log
        time.sleep(0.1)
    missing = ids - set(relay.deliveries())
    raise AssertionError(
        f"{len(missing)} accepted message(s) never delivered: {sorted(missing)[:5]}"
        f"\n{relay.log[-6000:]}"
    )


def spool_counts(spool_url: str) -> dict[MessageState, int]:
    async def read() -> dict[MessageState, int]:
        spool = open_spool(spool_url)
        await spool.open()
        try:
            return (await spool.stats()).counts
        finally:
            await spool.close()

    return asyncio.run(read())


def wait_spool_settled(spool_url: str, timeout: float) -> dict[MessageState, int]:
    """Wait until nothing is queued or in flight; return the final counts."""
    deadline = time.monotonic() + timeout
    while True:
        counts = spool_counts(spool_url)
        if not counts.get(MessageState.QUEUED) and not counts.get(MessageState.IN_FLIGHT):
            return counts
        if time.monotonic() > deadline:
            raise AssertionError(f"spool never settled: {counts}")
        time.sleep(0.2)


def report(capsys: pytest.CaptureFixture[str], title: str, **numbers: object) -> None:
    with capsys.disabled():
        details = " ".join(f"{key}={value}" for key, value in numbers.items())
        print(f"\n[chaos] {title}: {details}")


# endregion


def test_sigkill_at_random_points_loses_nothing(
    relay_factory: type[RelayProcess],
    spool_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    relay = relay_factory(base_env(spool_url))
    current = {"port": 0}
    kills = 0
    partial_tokens: list[str] = []
    # Five phases of at most about 1 s each (plus restarts): 3 threads at one
    # message per 20 ms each stay well inside the limit even on a fast relay.
    with Load(lambda: current["port"], threads=3, limit=1200, pace=0.02) as load:
        for point in ("during-data", "after-250", "during-delivery", "random", "random"):
            relay.start()
            current["port"] = relay.port
            if point == "during-data":
                time.sleep(rng.uniform(0.1, 0.5))
                current["port"] = 0
                partial_tokens.append(kill_during_data(relay))
            elif point == "after-250":
                load.accepted_event.clear()
                assert not load.exhausted, "the load ran out before this phase"
                assert load.accepted_event.wait(15), relay.log
                relay.send_signal(signal.SIGKILL)
            elif point == "during-delivery":
                time.sleep(rng.uniform(0.2, 0.6))
                kill_while_delivering(relay, spool_url)
            else:
                time.sleep(rng.uniform(0.1, 1.0))
                relay.send_signal(signal.SIGKILL)
            current["port"] = 0
            relay.kill()
            kills += 1
    accepted = dict(load.accepted)
    assert len(accepted) >= 20, f"too little load to prove anything: {load.replies}"

    relay.start()
    log = wait_until_delivered(relay, set(accepted), timeout=30 + LEASE_TIME)
    final = wait_spool_settled(spool_url, timeout=10 + LEASE_TIME)
    relay.stop()
    assert set(final) == {MessageState.DELIVERED}, final

    counts = collections.Counter(log)
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    unacknowledged = set(counts) - set(accepted)  # committed, but the 250 died with the process
    report(
        capsys,
        f"sigkill {spool_url.split(':')[0]} seed={seed}",
        accepted=len(accepted),
        delivered=len(counts),
        duplicates=duplicates,
        committed_without_250=len(unacknowledged),
        kills=kills,
        replies=dict(load.replies),
    )
    # Never a reply other than 250, or no reply at all because the process died.
    assert set(load.replies) <= {250, 0}, load.replies
    # A duplicate needs a kill between the outbox write and the spool update.
    assert duplicates <= kills * CONCURRENCY
    # A message cut off in DATA was never committed, so never delivered.
    outbox = relay.outbox
    for token in partial_tokens:
        assert not any(token.encode() in p.read_bytes() for p in outbox.glob("*.eml"))
    # Every delivered message is exactly the one sent.
    for spool_id, token in accepted.items():
        assert (outbox / f"{spool_id}.eml").read_bytes() == message(token)


def test_two_instances_one_killed_the_other_finishes_its_work(
    relay_factory: type[RelayProcess],
    pg_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = base_env(pg_url)
    a = relay_factory(env).start()
    b = relay_factory(env).start()
    ports = [a.port, b.port]
    turn = {"n": 0}

    def balancer() -> int:
        # Round robin over the live instances, as a TCP load balancer would.
        turn["n"] += 1
        return ports[turn["n"] % len(ports)]

    # Paced, so that A still has work coming in while the test waits to freeze it
    # holding a lease, however fast both instances answer.
    with Load(balancer, threads=4, limit=600, pace=0.02) as load:
        deadline = time.monotonic() + 30
        while len(load.accepted) < 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(load.accepted) >= 20, f"too little load: {load.replies}"
        orphans = kill_while_delivering(a, pg_url)
        killed_at = time.time()
        ports.remove(a.port)
        while len(load.accepted) < 150 and time.time() - killed_at < 20:
            time.sleep(0.05)
    assert orphans, "instance A never held a lease while frozen"
    accepted = set(load.accepted)

    log = wait_until_delivered(b, accepted | set(orphans), timeout=30 + LEASE_TIME)
    final = wait_spool_settled(pg_url, timeout=10 + LEASE_TIME)
    b.stop()
    assert set(final) == {MessageState.DELIVERED}, final

    async def delivered_at() -> dict[str, float]:
        conn = await asyncpg.connect(pg_url, timeout=5)
        try:
            rows = await conn.fetch(
                "SELECT message_id, at FROM esprelay_attempts"
                " WHERE outcome = 'delivered' AND message_id = ANY($1::text[])",
                list(orphans),
            )
        finally:
            await conn.close()
        return {r[0]: r[1] for r in rows}

    finished = asyncio.run(delivered_at())
    assert set(finished) == set(orphans)
    for message_id, expiry in orphans.items():
        # B took it only once A's lease had expired...
        assert finished[message_id] >= expiry - 0.05
        # ...and says so in its log.
        assert f"delivered id={message_id}" in b.log
    counts = collections.Counter(log)
    report(
        capsys,
        "two instances, one killed",
        accepted=len(accepted),
        orphaned_leases=len(orphans),
        delivered=len(counts),
        duplicates=sum(n - 1 for n in counts.values() if n > 1),
    )
    assert sum(n - 1 for n in counts.values() if n > 1) <= CONCURRENCY


# region PostgreSQL outage through a TCP proxy


class TcpProxy:
    """A loopback TCP proxy to PostgreSQL that can be cut and restored.

    ``cut()`` closes the listening socket (new connections are refused) and aborts
    every connection passing through; ``restore()`` listens on the same port again.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        self.restore()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def restore(self) -> None:
        self._call(self._listen())

    def cut(self) -> None:
        self._call(self._cut())

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._transports.update((writer.transport, up_writer.transport))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._transports.discard(writer.transport)
        self._transports.discard(up_writer.transport)


def test_postgres_outage_answers_451_then_recovers_by_itself(
    relay_factory: type[RelayProcess],
    pg_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with TcpProxy(server_address()) as proxy:
        relay = relay_factory(base_env(with_port(pg_url, proxy.port))).start()
        before = {}
        for n in range(5):
            code, reply = send_one(relay.port, f"before-{n}")
            assert code == 250, reply
            before[queued_id(reply)] = f"before-{n}"

        proxy.cut()
        during = [send_one(relay.port, f"during-{n}") for n in range(8)]
        time.sleep(1.0)  # let workers and the listener notice too
        during += [send_one(relay.port, f"during-late-{n}") for n in range(4)]
        codes = collections.Counter(code for code, _ in during)
        # Never 250 while nothing can be committed; 451 tells the client to retry.
        assert codes == {451: len(during)}, during
        assert "451 4.3.0" in during[0][1] or "local error" in during[0][1]

        proxy.restore()
        deadline = time.monotonic() + 20
        after: dict[str, str] = {}
        while time.monotonic() < deadline and len(after) < 5:
            token = f"after-{len(after)}-{random.getrandbits(16)}"
            code, reply = send_one(relay.port, token)
            if code == 250:
                after[queued_id(reply)] = token
            else:
                assert code == 451, reply
                time.sleep(0.2)
        assert len(after) == 5, relay.log

        log = wait_until_delivered(relay, set(before) | set(after), timeout=20 + LEASE_TIME)
        relay.stop()
    for spool_id, token in {**before, **after}.items():
        assert (relay.outbox / f"{spool_id}.eml").read_bytes() == message(token)
    assert "not accepted: spool error" in relay.log
    # The LISTEN connection noticed the cut and came back by itself.
    assert "spool: lost the listening connection; reconnecting" in relay.log
    report(
        capsys,
        "postgres outage",
        answered_451=len(during),
        delivered=len(set(log)),
        duplicates=len(log) - len(set(log)),
    )


# endregion


def test_esp_outage_messages_wait_then_go_in_due_order(
    relay_factory: type[RelayProcess],
    tmp_path: Path,
    spool_url: str,
) -> None:
    # The outbox's directory sits under a plain file: every write fails (the "ESP"
    # is down) until the file is replaced by a directory.
    blocker = tmp_path / "esp"
    blocker.write_text("down\n")
    relay = relay_factory(
        base_env(
            spool_url,
            ESPRELAY_OUTBOX_DIR=str(blocker / "outbox"),
            ESPRELAY_DELIVERY_CONCURRENCY="1",
            ESPRELAY_RETRY_INITIAL="6",
            ESPRELAY_RETRY_MAX="6",
            # About the spool's ordering, not the circuit breaker: keep it closed, or
            # it would push due times past the snapshot below.
            ESPRELAY_BREAKER_THRESHOLD="1000",
        )
    ).start()
    sent = []
    for n in range(8):
        code, reply = send_one(relay.port, f"wait-{n}")
        assert code == 250, reply
        sent.append(queued_id(reply))
    relay.wait_for_log(r"deferred id=\w+ provider=outbox attempt=1", count=len(sent), timeout=20)

    async def due_times() -> dict[str, float]:
        spool = open_spool(spool_url)
        await spool.open()
        try:
            queued = await spool.list(state=MessageState.QUEUED)
        finally:
            await spool.close()
        return {m.id: m.next_attempt_at for m in queued if m.attempts == 1}

    due = asyncio.run(due_times())
    assert set(due) == set(sent)
    assert relay.deliveries() == []

    blocker.unlink()
    blocker.mkdir()
    log = wait_until_delivered(relay, set(sent), timeout=30)
    relay.stop()
    # With one worker, the spool hands them out strictly by due time (jittered
    # backoff makes that differ from the order they arrived in).
    assert log == sorted(sent, key=lambda i: (due[i], i)), relay.log
    for message_id in sent:
        assert f"delivered id={message_id} provider=outbox attempt=2" in relay.log


def large_message(token: str, size: int) -> bytes:
    head = message(token)
    line = b"y" * 76 + b"\r\n"
    return head + line * (size // len(line))


def test_sigkill_with_large_bodies_in_files_loses_nothing_and_leaves_no_file(
    relay_factory: type[RelayProcess], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bodies over ``BODY_FILE_MIN`` live in files beside the SQLite spool: a kill at any
    point (during DATA, between a file's write and its row's commit, after the 250,
    during delivery) loses no accepted message, and no file outlives its message."""
    from esprelay.spool.sqlite import BODY_FILE_MIN

    spool_path = tmp_path / "data" / "spool.db"
    relay = relay_factory(base_env(f"sqlite:///{spool_path}"))
    rng = random.Random()
    accepted: dict[str, bytes] = {}
    replies: collections.Counter[int] = collections.Counter()
    kills = 0
    for round_ in range(4):
        relay.start()
        stop = threading.Event()

        def send(
            port: int = relay.port, round_: int = round_, stop: threading.Event = stop
        ) -> None:
            n = 0
            while not stop.is_set() and n < 100:  # bounded; the kill comes long before
                n += 1
                token = f"big{round_}-{n}-{random.getrandbits(32):08x}"
                raw = large_message(token, BODY_FILE_MIN + rng.randrange(200_000))
                try:
                    with smtplib.SMTP("127.0.0.1", port, timeout=15) as smtp:
                        smtp.ehlo("chaos.test")
                        smtp.mail("app@example.com")
                        smtp.rcpt("ops@example.org")
                        code, reply = smtp.data(raw)
                except smtplib.SMTPResponseException as exc:
                    code, reply = exc.smtp_code, exc.smtp_error
                except (OSError, smtplib.SMTPException):
                    code, reply = 0, b""
                replies[code] += 1
                if code == 250:
                    accepted[queued_id(reply.decode())] = raw
                elif code == 0:
                    time.sleep(0.02)  # killed: back off as a client would

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        time.sleep(rng.uniform(0.1, 0.6))
        relay.send_signal(signal.SIGKILL)
        relay.kill()
        kills += 1
        stop.set()
        sender.join(30)
    assert len(accepted) >= 5, f"too little load to prove anything: {replies}"

    relay.start()
    log = wait_until_delivered(relay, set(accepted), timeout=30 + LEASE_TIME)
    final = wait_spool_settled(f"sqlite:///{spool_path}", timeout=10 + LEASE_TIME)
    relay.stop()
    assert set(final) == {MessageState.DELIVERED}, final
    assert set(replies) <= {250, 0}, replies
    for spool_id, raw in accepted.items():
        assert (relay.outbox / f"{spool_id}.eml").read_bytes() == raw
    # Delivered bodies are removed; files of messages committed without a 250 too,
    # once delivered; files whose row never committed went at the restart.
    assert os.listdir(spool_path.with_name("spool.db.bodies")) == []
    counts = collections.Counter(log)
    report(
        capsys,
        "sigkill with body files",
        accepted=len(accepted),
        delivered=len(counts),
        duplicates=sum(n - 1 for n in counts.values() if n > 1),
        kills=kills,
        replies=dict(replies),
    )
