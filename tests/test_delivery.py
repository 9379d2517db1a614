"""The outcome of each attempt maps to one spool transition (delivery.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from esprelay.backoff import RetryPolicy
from esprelay.delivery import Deliverer
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


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[SqliteSpool]:
    spool = SqliteSpool(tmp_path / "spool.db", exclusive=True)
    await spool.open()
    yield spool
    await spool.close()


def make_deliverer(
    spool: SqliteSpool, provider: Provider, policy: RetryPolicy | None = None
) -> Deliverer:
    return Deliverer(
        spool,
        ProviderSet({provider.name: provider}, breaker_threshold=1000),
        default_chain=(provider.name,),
        owner="test",
        concurrency=4,
        lease_time=30,
        poll_interval=0.05,
        policy=policy or RetryPolicy(retry_initial=0.1, retry_max=0.2, retry_config_error=0.3),
    )


async def wait_until(predicate: Callable[[], object], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():  # type: ignore[misc]
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def put(spool: SqliteSpool, provider: str = "scripted") -> str:
    return await spool.put(
        Envelope("a@example.com", ("b@example.org",)), b"Subject: t\r\n\r\nx\r\n", provider=provider
    )


async def run_until_state(
    spool: SqliteSpool, deliverer: Deliverer, message_id: str, state: MessageState
) -> None:
    deliverer.start()
    try:

        async def done() -> bool:
            message = await spool.get(message_id)
            return message is not None and message.state == state

        await wait_until(done)
    finally:
        await deliverer.stop(grace=1)


async def test_success_records_provider_id_and_drops_body(spool: SqliteSpool) -> None:
    provider = ScriptedProvider(["esp"])
    message_id = await put(spool)
    await run_until_state(
        spool, make_deliverer(spool, provider), message_id, MessageState.DELIVERED
    )
    message = await spool.get(message_id, with_body=True)
    assert message is not None
    assert message.provider_message_id == "esp-1"
    assert message.attempts == 1
    assert message.raw is None
    assert provider.sent[0].raw == b"Subject: t\r\n\r\nx\r\n"


async def test_transient_then_success(spool: SqliteSpool) -> None:
    provider = ScriptedProvider([ProviderUnavailable("503"), RateLimited("429"), "esp"])
    message_id = await put(spool)
    await run_until_state(
        spool, make_deliverer(spool, provider), message_id, MessageState.DELIVERED
    )
    message = await spool.get(message_id)
    assert message is not None
    assert [a.outcome for a in message.history] == ["deferred", "deferred", "delivered"]
    assert message.history[0].error is not None and "503" in message.history[0].error
    assert len(provider.sent) == 3


async def test_permanent_fails_without_retry(spool: SqliteSpool) -> None:
    provider = ScriptedProvider([MessageRejected("bad recipient", status_code=422)])
    message_id = await put(spool)
    await run_until_state(spool, make_deliverer(spool, provider), message_id, MessageState.FAILED)
    await asyncio.sleep(0.3)
    message = await spool.get(message_id, with_body=True)
    assert message is not None
    assert message.state == MessageState.FAILED
    assert message.raw is not None  # kept, so it can be retried by hand
    assert "bad recipient" in (message.last_error or "")
    assert len(provider.sent) == 1


async def test_retry_hint_is_honoured(spool: SqliteSpool) -> None:
    provider = ScriptedProvider([RateLimited("429", retry_after=120)])
    message_id = await put(spool)
    deliverer = make_deliverer(spool, provider)
    deliverer.start()

    async def deferred() -> bool:
        message = await spool.get(message_id)
        return message is not None and message.attempts == 1

    await wait_until(deferred)
    await deliverer.stop(grace=1)
    message = await spool.get(message_id)
    assert message is not None and message.state == MessageState.QUEUED
    assert message.next_attempt_at - time.time() > 100


async def test_config_error_waits_at_least_the_config_delay(spool: SqliteSpool) -> None:
    provider = ScriptedProvider([ProviderConfigError("401 bad key", status_code=401)])
    message_id = await put(spool)
    policy = RetryPolicy(retry_initial=0.1, retry_max=0.2, retry_config_error=60)
    deliverer = make_deliverer(spool, provider, policy)
    deliverer.start()

    async def deferred() -> bool:
        message = await spool.get(message_id)
        return message is not None and message.attempts == 1

    await wait_until(deferred)
    await deliverer.stop(grace=1)
    message = await spool.get(message_id)
    assert message is not None and message.state == MessageState.QUEUED
    assert message.next_attempt_at - time.time() > 50


async def test_expired_message_fails(spool: SqliteSpool) -> None:
    provider = ScriptedProvider([ProviderUnavailable("503")] * 100)
    message_id = await put(spool)
    policy = RetryPolicy(retry_initial=0.05, retry_max=0.05, max_queue_lifetime=0.5)
    await run_until_state(
        spool, make_deliverer(spool, provider, policy), message_id, MessageState.FAILED
    )
    message = await spool.get(message_id)
    assert message is not None
    assert "expired after" in (message.last_error or "")
    assert message.attempts >= 2


async def test_unexpected_exception_is_retried_not_lost(spool: SqliteSpool) -> None:
    provider = ScriptedProvider([RuntimeError("bug"), "esp"])
    message_id = await put(spool)
    await run_until_state(
        spool, make_deliverer(spool, provider), message_id, MessageState.DELIVERED
    )
    assert len(provider.sent) == 2


async def test_concurrency_is_bounded(spool: SqliteSpool) -> None:
    running = 0
    peak = 0

    class Slow(Provider):
        kind = "scripted"

        async def send(self, message: OutboundMessage) -> SendResult:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.05)
            running -= 1
            return SendResult(provider_message_id="x")

    ids = [await put(spool) for _ in range(20)]
    deliverer = make_deliverer(spool, Slow())
    deliverer.start()

    async def all_done() -> bool:
        stats = await spool.stats()
        return stats.counts.get(MessageState.DELIVERED, 0) == len(ids)

    await wait_until(all_done)
    await deliverer.stop(grace=1)
    assert peak == 4


async def test_stop_cancels_after_grace_and_message_stays(spool: SqliteSpool) -> None:
    class Hang(Provider):
        kind = "scripted"

        async def send(self, message: OutboundMessage) -> SendResult:
            await asyncio.sleep(60)
            raise AssertionError("not reached")

    message_id = await put(spool)
    deliverer = make_deliverer(spool, Hang())
    deliverer.start()

    async def in_flight() -> bool:
        message = await spool.get(message_id)
        return message is not None and message.state == MessageState.IN_FLIGHT

    await wait_until(in_flight)
    started = time.monotonic()
    await deliverer.stop(grace=0.2)
    assert time.monotonic() - started < 5
    message = await spool.get(message_id, with_body=True)
    assert message is not None and message.raw is not None
    assert message.state == MessageState.IN_FLIGHT  # reclaimed at the next start


class CountingSpool(SqliteSpool):
    """Counts lease queries; ``hold`` keeps one answered lease query from returning."""

    leases = 0
    hold: asyncio.Event | None = None

    async def lease(self, owner: str, limit: int, lease_time: float) -> list[Any]:
        self.leases += 1
        found = await super().lease(owner, limit, lease_time)
        if self.hold is not None:  # answered, but not yet seen by the caller
            await self.hold.wait()
            self.hold = None
        return found


async def test_handed_off_messages_cost_no_lease_query(tmp_path: Path) -> None:
    spool = CountingSpool(tmp_path / "spool.db", exclusive=True)
    await spool.open()
    provider = ScriptedProvider([])
    deliverer = make_deliverer(spool, provider)
    deliverer._poll_interval = 60  # only wake-ups, no polling, in this test
    deliverer.start()
    try:
        await asyncio.sleep(0.1)
        queries_at_start = spool.leases  # the one at start-up (recovered work)
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
        await wait_until(lambda: _true(len(provider.sent) == 10))
        await asyncio.sleep(0.1)
        assert spool.leases == queries_at_start
        # A message spooled for the workers to lease still wakes them.
        message_id = await put(spool)
        deliverer.wake()

        async def delivered() -> bool:
            found = await spool.get(message_id)
            return found is not None and found.state == MessageState.DELIVERED

        await wait_until(delivered)
    finally:
        await deliverer.stop(grace=1)
        await spool.close()


async def test_wake_during_a_lease_query_is_not_lost(tmp_path: Path) -> None:
    spool = CountingSpool(tmp_path / "spool.db", exclusive=True)
    await spool.open()
    provider = ScriptedProvider([])
    deliverer = make_deliverer(spool, provider)
    deliverer._poll_interval = 60
    spool.hold = asyncio.Event()
    deliverer.start()
    try:
        await asyncio.sleep(0.1)  # the start-up query found nothing, and waits on ``hold``
        message_id = await put(spool)
        deliverer.wake()  # while that query runs: it may not see the message
        spool.hold.set()

        async def delivered() -> bool:
            found = await spool.get(message_id)
            return found is not None and found.state == MessageState.DELIVERED

        await wait_until(delivered, timeout=5)
    finally:
        await deliverer.stop(grace=1)
        await spool.close()


async def _true(value: bool) -> bool:
    return value
