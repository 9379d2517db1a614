"""The outcome of each attempt maps to one spool transition (delivery.py).

The spool and the deliverer share a fake clock: a retry comes due, or a shutdown's
grace runs out, when the test moves the clock on, and each test waits for the
outcomes the deliverer reports, never for time to pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from esprelay.backoff import RetryPolicy
from esprelay.delivery import Deliverer, Outcome
from esprelay.dispatch import ProviderSet
from esprelay.errors import (
    MessageRejected,
    ProviderConfigError,
    ProviderUnavailable,
    RateLimited,
)
from esprelay.models import Envelope, MessageState, OutboundMessage, SendResult
from esprelay.providers.base import Provider
from esprelay.spool.base import NewPart
from esprelay.spool.sqlite import SqliteSpool
from tests.fakeclock import FakeClock


class ScriptedProvider(Provider):
    """Answers each send with the next scripted outcome (an exception or an id)."""

    kind = "scripted"

    def __init__(self, script: list[BaseException | str]) -> None:
        super().__init__()
        self.script = script
        self.sent: list[OutboundMessage] = []

    async def send(self, message: OutboundMessage) -> SendResult:
        self.sent.append(message)
        outcome = self.script.pop(0) if self.script else "ok"
        if isinstance(outcome, BaseException):
            raise outcome
        return SendResult(provider_message_id=f"{outcome}-{len(self.sent)}")


#: Seconds between the deliverer's looks at the spool when nothing wakes it.
POLL = 1.0
#: Longer than any retry delay of ``POLICY`` (15 s at most, jitter included).
LATER = 20.0
#: How long a test waits for what the deliverer does at once (a hang fails the test).
PATIENCE = 10.0
POLICY = RetryPolicy(retry_initial=10, retry_max=12.5, retry_config_error=300)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def spool(tmp_path: Path, clock: FakeClock) -> AsyncIterator[SqliteSpool]:
    spool = SqliteSpool(tmp_path / "spool.db", exclusive=True, clock=clock)
    await spool.open()
    yield spool
    await spool.close()


class Run:
    """A deliverer on the fake clock, and the outcomes of its attempts as they come."""

    def __init__(
        self,
        spool: SqliteSpool,
        provider: Provider,
        clock: FakeClock,
        policy: RetryPolicy = POLICY,
        *,
        breaker_threshold: int = 1000,
        breaker_cooldown: float = 30.0,
    ) -> None:
        self.spool = spool
        self.clock = clock
        self.outcomes: asyncio.Queue[Outcome] = asyncio.Queue()
        self.deliverer = Deliverer(
            spool,
            ProviderSet(
                {provider.name: provider},
                breaker_threshold=breaker_threshold,
                breaker_cooldown=breaker_cooldown,
                clock=clock,
            ),
            default_chain=(provider.name,),
            owner="test",
            concurrency=4,
            lease_time=30,
            poll_interval=POLL,
            policy=policy,
            on_outcome=self.outcomes.put_nowait,
            clock=clock,
        )

    async def __aenter__(self) -> Run:
        self.deliverer.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.deliverer.stop(grace=0)

    async def outcome(self) -> Outcome:
        """The next attempt's outcome."""
        return await asyncio.wait_for(self.outcomes.get(), PATIENCE)

    async def idle(self) -> None:
        """Until the deliverer waits for its next poll, a whole interval from now."""
        await asyncio.wait_for(self.clock.waiting(seconds=POLL), PATIENCE)

    async def later(self, seconds: float = LATER) -> None:
        """Move the clock on by ``seconds`` (at least a poll interval), and let the one
        poll that this lets through look at the spool."""
        assert seconds >= POLL
        await self.idle()
        self.clock.advance(seconds)
        await self.idle()


async def put(spool: SqliteSpool, provider: str = "scripted") -> str:
    return await spool.put(
        Envelope("a@example.com", ("b@example.org",)), b"Subject: t\r\n\r\nx\r\n", provider=provider
    )


async def test_success_records_provider_id_and_drops_body(
    spool: SqliteSpool, clock: FakeClock
) -> None:
    provider = ScriptedProvider(["esp"])
    message_id = await put(spool)
    async with Run(spool, provider, clock) as run:
        assert (await run.outcome()).outcome == "delivered"
    message = await spool.get(message_id, with_body=True)
    assert message is not None
    assert message.state == MessageState.DELIVERED
    assert message.provider_message_id == "esp-1"
    assert message.attempts == 1
    assert message.raw is None
    assert provider.sent[0].raw == b"Subject: t\r\n\r\nx\r\n"


async def test_transient_then_success(spool: SqliteSpool, clock: FakeClock) -> None:
    provider = ScriptedProvider([ProviderUnavailable("503"), RateLimited("429"), "esp"])
    message_id = await put(spool)
    async with Run(spool, provider, clock) as run:
        assert (await run.outcome()).outcome == "deferred"
        message = await spool.get(message_id)
        assert message is not None and message.state == MessageState.QUEUED
        # Due after the first backoff delay (10 s, give or take the jitter), not before.
        assert 8 <= message.next_attempt_at - clock.time() <= 12
        await run.later(7.9)
        assert len(provider.sent) == 1
        await run.later()
        assert (await run.outcome()).outcome == "deferred"
        await run.later()
        assert (await run.outcome()).outcome == "delivered"
    message = await spool.get(message_id)
    assert message is not None
    assert [a.outcome for a in message.history] == ["deferred", "deferred", "delivered"]
    assert message.history[0].error is not None and "503" in message.history[0].error
    assert len(provider.sent) == 3


async def test_permanent_fails_without_retry(spool: SqliteSpool, clock: FakeClock) -> None:
    provider = ScriptedProvider([MessageRejected("bad recipient", status_code=422)])
    message_id = await put(spool)
    async with Run(spool, provider, clock) as run:
        assert (await run.outcome()).outcome == "failed"
        await run.later(86400)  # a day later: never tried again
    message = await spool.get(message_id, with_body=True)
    assert message is not None
    assert message.state == MessageState.FAILED
    assert message.raw is not None  # kept, so it can be retried by hand
    assert "bad recipient" in (message.last_error or "")
    assert len(provider.sent) == 1


async def test_retry_hint_is_honoured(spool: SqliteSpool, clock: FakeClock) -> None:
    provider = ScriptedProvider([RateLimited("429", retry_after=120)])
    message_id = await put(spool)
    async with Run(spool, provider, clock) as run:
        assert (await run.outcome()).outcome == "deferred"
        message = await spool.get(message_id)
        assert message is not None and message.state == MessageState.QUEUED
        assert message.next_attempt_at == pytest.approx(clock.time() + 120)
        await run.later(119)
        assert len(provider.sent) == 1
        await run.later(1)
        assert (await run.outcome()).outcome == "delivered"


async def test_config_error_waits_at_least_the_config_delay(
    spool: SqliteSpool, clock: FakeClock
) -> None:
    provider = ScriptedProvider([ProviderConfigError("401 bad key", status_code=401)])
    message_id = await put(spool)
    policy = RetryPolicy(retry_initial=10, retry_max=12.5, retry_config_error=300)
    async with Run(spool, provider, clock, policy) as run:
        assert (await run.outcome()).outcome == "deferred"
        message = await spool.get(message_id)
        assert message is not None and message.state == MessageState.QUEUED
        assert message.next_attempt_at == pytest.approx(clock.time() + 300)
        await run.later(299)
        assert len(provider.sent) == 1
        await run.later(1)
        assert (await run.outcome()).outcome == "delivered"


async def test_expired_message_fails(spool: SqliteSpool, clock: FakeClock) -> None:
    provider = ScriptedProvider([ProviderUnavailable("503")] * 100)
    message_id = await put(spool)
    policy = RetryPolicy(retry_initial=10, retry_max=12.5, max_queue_lifetime=100)
    async with Run(spool, provider, clock, policy) as run:
        # Tried at 0, 20, ... 80 s after it was queued; at 100 s it has expired.
        for _ in range(5):
            assert (await run.outcome()).outcome == "deferred"
            await run.later()
        outcome = await run.outcome()
        assert outcome.outcome == "failed" and outcome.expired
    message = await spool.get(message_id)
    assert message is not None and message.state == MessageState.FAILED
    assert "expired after 6 attempt(s)" in (message.last_error or "")
    assert message.attempts == 6


async def test_unexpected_exception_is_retried_not_lost(
    spool: SqliteSpool, clock: FakeClock
) -> None:
    provider = ScriptedProvider([RuntimeError("bug"), "esp"])
    await put(spool)
    async with Run(spool, provider, clock) as run:
        assert (await run.outcome()).outcome == "deferred"
        await run.later()
        assert (await run.outcome()).outcome == "delivered"
    assert len(provider.sent) == 2


async def test_an_open_circuit_defers_until_its_cool_down_ends(
    spool: SqliteSpool, clock: FakeClock
) -> None:
    provider = ScriptedProvider([ProviderUnavailable("503"), "esp"])
    message_id = await put(spool)
    async with Run(spool, provider, clock, breaker_threshold=1, breaker_cooldown=600) as run:
        assert (await run.outcome()).outcome == "deferred"  # and the circuit opens
        await run.later()
        # Due again, but the circuit is open: not sent, deferred to the end of the cool-down.
        outcome = await run.outcome()
        assert outcome.outcome == "deferred" and "circuit open" in str(outcome.error)
        assert len(provider.sent) == 1
        message = await spool.get(message_id)
        assert message is not None
        assert message.next_attempt_at == pytest.approx(clock.time() + 600 - LATER)
        await run.later(600 - LATER)
        assert (await run.outcome()).outcome == "delivered"  # the trial call closes it
    assert len(provider.sent) == 2


async def test_concurrency_is_bounded(spool: SqliteSpool, clock: FakeClock) -> None:
    running = 0
    peak = 0
    full, go = asyncio.Event(), asyncio.Event()

    class Slow(Provider):
        kind = "scripted"

        async def send(self, message: OutboundMessage) -> SendResult:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            if running == 4:
                full.set()
            await go.wait()
            running -= 1
            return SendResult(provider_message_id="x")

    ids = [await put(spool) for _ in range(20)]
    async with Run(spool, Slow(), clock) as run:
        await asyncio.wait_for(full.wait(), PATIENCE)
        await run.idle()  # every slot taken: the deliverer waits
        assert peak == 4
        go.set()
        outcomes = [await run.outcome() for _ in ids]
    assert {o.outcome for o in outcomes} == {"delivered"}
    assert sorted(o.message.id for o in outcomes) == sorted(ids)
    assert peak == 4


async def test_stop_cancels_after_grace_and_message_stays(
    spool: SqliteSpool, clock: FakeClock
) -> None:
    sending = asyncio.Event()

    class Hang(Provider):
        kind = "scripted"

        async def send(self, message: OutboundMessage) -> SendResult:
            sending.set()
            await asyncio.Event().wait()
            raise AssertionError("not reached")

    message_id = await put(spool)
    run = Run(spool, Hang(), clock)
    run.deliverer.start()
    await asyncio.wait_for(sending.wait(), PATIENCE)
    stopping = asyncio.create_task(run.deliverer.stop(grace=30))
    await asyncio.wait_for(clock.waiting(seconds=30), PATIENCE)
    clock.advance(29.5)
    await asyncio.wait_for(clock.waiting(seconds=0.5), PATIENCE)  # still within the grace
    assert not stopping.done()
    clock.advance(0.5)
    await asyncio.wait_for(stopping, PATIENCE)
    assert run.outcomes.empty()
    message = await spool.get(message_id, with_body=True)
    assert message is not None and message.raw is not None
    assert message.state == MessageState.IN_FLIGHT  # reclaimed at the next start


class CountingSpool(SqliteSpool):
    """Counts lease queries; ``hold`` keeps one answered lease query from returning
    (``held`` is set once it is being held)."""

    leases = 0
    hold: asyncio.Event | None = None
    held: asyncio.Event | None = None

    async def lease(self, owner: str, limit: int, lease_time: float) -> list[Any]:
        self.leases += 1
        found = await super().lease(owner, limit, lease_time)
        if self.hold is not None:  # answered, but not yet seen by the caller
            if self.held is not None:
                self.held.set()
            await self.hold.wait()
            self.hold = None
        return found


async def test_handed_off_messages_cost_no_lease_query(tmp_path: Path, clock: FakeClock) -> None:
    spool = CountingSpool(tmp_path / "spool.db", exclusive=True, clock=clock)
    await spool.open()
    provider = ScriptedProvider([])
    try:
        async with Run(spool, provider, clock) as run:
            deliverer = run.deliverer
            await run.idle()
            assert spool.leases == 1  # the one at start-up (recovered work)
            for _ in range(10):
                assert deliverer.reserve(1)
                (message_id,) = await spool.put_parts(
                    b"Subject: t\r\n\r\nx\r\n",
                    [NewPart(Envelope("a@example.com", ("b@example.org",)), "scripted", {})],
                    lease_owner=deliverer.owner,
                    lease_time=30,
                )
                message = await spool.get(message_id, with_body=True)
                assert message is not None
                deliverer.dispatch_reserved(message)
                assert (await run.outcome()).outcome == "delivered"
            assert len(provider.sent) == 10
            # A message spooled for the workers to lease still wakes them.
            message_id = await put(spool)
            deliverer.wake()
            outcome = await run.outcome()
            assert outcome.outcome == "delivered" and outcome.message.id == message_id
        assert spool.leases == 2  # start-up, and the wake-up
    finally:
        await spool.close()


async def test_wake_during_a_lease_query_is_not_lost(tmp_path: Path, clock: FakeClock) -> None:
    spool = CountingSpool(tmp_path / "spool.db", exclusive=True, clock=clock)
    await spool.open()
    spool.hold, spool.held = asyncio.Event(), asyncio.Event()
    try:
        # The clock never moves: without the wake-up, no poll would ever find it.
        async with Run(spool, ScriptedProvider([]), clock) as run:
            # The start-up query found nothing, and waits on ``hold``.
            await asyncio.wait_for(spool.held.wait(), PATIENCE)
            message_id = await put(spool)
            run.deliverer.wake()  # while that query runs: it may not see the message
            spool.hold.set()
            outcome = await run.outcome()
            assert outcome.outcome == "delivered" and outcome.message.id == message_id
    finally:
        await spool.close()
