"""ESPRELAY_DELIVERY_MEMORY: the bytes of the messages being delivered at once stay
within the budget, plus one message, and every message is still delivered.

The unit half holds each send until the test lets it go, and reads what is in flight
at each step; the end-to-end half sends large messages (body files on SQLite, body
pieces on PostgreSQL) through a running esprelay with a small budget and checks every
one arrives byte for byte.
"""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from esprelay.backoff import RetryPolicy
from esprelay.delivery import Deliverer, Outcome
from esprelay.dispatch import ProviderSet
from esprelay.models import Envelope, OutboundMessage, SendResult
from esprelay.providers.base import Provider
from esprelay.spool.sqlite import SqliteSpool
from tests.fakeclock import FakeClock
from tests.pgutil import temporary_database
from tests.relayproc import RelayProcess

PATIENCE = 10.0
POLICY = RetryPolicy(retry_initial=10, retry_max=12.5, retry_config_error=300)
ENVELOPE = Envelope("a@example.com", ("b@example.org",))


class HeldProvider(Provider):
    """Each send waits until the test lets it go; the sizes in flight are readable."""

    kind = "held"

    def __init__(self) -> None:
        super().__init__()
        self.in_flight: dict[str, int] = {}
        self.started: asyncio.Queue[str] = asyncio.Queue()
        self._gates: dict[str, asyncio.Event] = {}
        self.sent: list[OutboundMessage] = []

    async def send(self, message: OutboundMessage) -> SendResult:
        gate = self._gates.setdefault(message.id, asyncio.Event())
        self.in_flight[message.id] = len(message.raw)
        self.started.put_nowait(message.id)
        await gate.wait()
        del self.in_flight[message.id]
        self.sent.append(message)
        return SendResult(provider_message_id=f"esp-{message.id}")

    def let_go(self, message_id: str) -> None:
        self._gates.setdefault(message_id, asyncio.Event()).set()

    async def next_started(self) -> str:
        return await asyncio.wait_for(self.started.get(), PATIENCE)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def spool(tmp_path: Path, clock: FakeClock) -> AsyncIterator[SqliteSpool]:
    spool = SqliteSpool(tmp_path / "spool.db", exclusive=True, clock=clock)
    await spool.open()
    yield spool
    await spool.close()


def deliverer(
    spool: SqliteSpool, provider: Provider, clock: FakeClock, budget: int
) -> tuple[Deliverer, asyncio.Queue[Outcome]]:
    outcomes: asyncio.Queue[Outcome] = asyncio.Queue()
    return (
        Deliverer(
            spool,
            ProviderSet({provider.name: provider}, clock=clock),
            default_chain=(provider.name,),
            owner="test",
            concurrency=10,
            lease_time=30,
            poll_interval=1.0,
            policy=POLICY,
            on_outcome=outcomes.put_nowait,
            clock=clock,
            memory_budget=budget,
        ),
        outcomes,
    )


def body(size: int, mark: int) -> bytes:
    head = f"Subject: {mark}\r\n\r\n".encode()
    return head + b"x" * (size - len(head))


async def test_leases_no_more_bytes_than_the_budget(spool: SqliteSpool, clock: FakeClock) -> None:
    provider = HeldProvider()
    sizes = [400, 400, 400, 300, 2500, 100]
    ids = []
    for i, size in enumerate(sizes):  # due in this order
        ids.append(await spool.put(ENVELOPE, body(size, i), provider="held"))
        clock.advance(0.001)
    size_of = dict(zip(ids, sizes, strict=True))
    run, outcomes = deliverer(spool, provider, clock, budget=1000)
    run.start()
    try:
        # 400 + 400 fit in 1000; the third 400 does not: two sends, not ten, and no
        # more until one of them ends.
        started = {await provider.next_started(), await provider.next_started()}
        assert started == set(ids[:2])
        assert run.bytes_in_flight == 800
        for _ in range(10):
            await asyncio.sleep(0)
        assert provider.started.empty()

        # One ends: 600 left, so of the next two (400 + 300 > 600) only the first goes.
        provider.let_go(ids[0])
        await asyncio.wait_for(outcomes.get(), PATIENCE)
        assert await provider.next_started() == ids[2]
        assert run.bytes_in_flight == 800
        for _ in range(10):
            await asyncio.sleep(0)
        assert provider.started.empty()

        delivered = {ids[0]}
        # Let each go as it starts; the 2500-byte message, larger than the whole budget,
        # goes too (the first of a lease), and nothing is left behind.
        waiting = {ids[1], ids[2]}
        while len(delivered) < len(ids):
            assert sum(provider.in_flight.values()) <= 1000 + max(sizes)
            assert sum(size_of[i] for i in provider.in_flight) == run.bytes_in_flight
            message_id = next(iter(sorted(waiting)))
            waiting.discard(message_id)
            provider.let_go(message_id)
            outcome = await asyncio.wait_for(outcomes.get(), PATIENCE)
            assert outcome.outcome == "delivered"
            delivered.add(outcome.message.id)
            while not provider.started.empty():
                waiting.add(provider.started.get_nowait())
            if not waiting and len(delivered) < len(ids):
                waiting.add(await provider.next_started())
        assert sorted(m.id for m in provider.sent) == sorted(ids)
        assert {m.id: m.raw for m in provider.sent} == {
            i: body(size, n) for n, (i, size) in enumerate(zip(ids, sizes, strict=True))
        }
        assert run.bytes_in_flight == 0
    finally:
        for message_id in ids:
            provider.let_go(message_id)
        await run.stop(grace=1)


async def test_no_hand_off_over_the_budget(spool: SqliteSpool, clock: FakeClock) -> None:
    provider = HeldProvider()
    run, _ = deliverer(spool, provider, clock, budget=1000)
    run.start()
    try:
        assert run.reserve(1, 600)
        assert not run.reserve(1, 600)  # 1200 > 1000: spooled for a lease instead
        assert not run.reserve(2, 300)
        assert run.reserve(1, 400)
        assert run.bytes_in_flight == 1000
        run.release(1, 600)
        run.release(1, 400)
        assert run.bytes_in_flight == 0
        assert not run.reserve(1, 1001)  # larger than the budget: leased, alone
    finally:
        await run.stop(grace=1)


async def test_no_budget_leases_as_before(spool: SqliteSpool, clock: FakeClock) -> None:
    provider = HeldProvider()
    ids = [await spool.put(ENVELOPE, body(5000, i), provider="held") for i in range(4)]
    run, outcomes = deliverer(spool, provider, clock, budget=0)
    run.start()
    try:
        started = {await provider.next_started() for _ in ids}
        assert started == set(ids)
        for message_id in ids:
            provider.let_go(message_id)
        for _ in ids:
            assert (await asyncio.wait_for(outcomes.get(), PATIENCE)).outcome == "delivered"
    finally:
        await run.stop(grace=1)


# region end to end

LARGE = 600 * 1024  # above the SQLite spool's BODY_FILE_MIN; several PostgreSQL pieces
COUNT = 6


@pytest.fixture(params=["sqlite", "postgresql"])
def spool_env(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    if request.param == "sqlite":
        yield {}
        return
    with temporary_database() as url:
        yield {"ESPRELAY_SPOOL_URL": url}


def large_message(index: int) -> bytes:
    line = (b"%06d " % index) + b"abcdefghijklmnopqrstuvwxyz0123456789" * 2 + b"\r\n"
    head = f"From: app@example.com\r\nSubject: large {index}\r\n\r\n".encode()
    return head + line * (LARGE // len(line))


def send(port: int, index: int) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("app@example.com")
        smtp.rcpt(f"user{index}@example.org")
        code, reply = smtp.data(large_message(index))
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[1]


def test_large_messages_within_a_small_budget_all_delivered(
    relay_factory: type[RelayProcess], spool_env: dict[str, str]
) -> None:
    # Room for one of them at a time (plus the one a lease may take over it).
    relay = relay_factory({**spool_env, "ESPRELAY_DELIVERY_MEMORY": "1M"}).start()
    with ThreadPoolExecutor(COUNT) as pool:
        ids = list(pool.map(lambda i: send(relay.port, i), range(COUNT)))
    assert sorted(relay.wait_delivered(COUNT)) == sorted(ids)
    for index, message_id in enumerate(ids):
        assert (relay.outbox / f"{message_id}.eml").read_bytes() == large_message(index)


# endregion
