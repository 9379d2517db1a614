"""A provider's rate and concurrency limits around each send, as the dispatcher keeps
them: waits within the lease, deferral or failover past it, breakers untouched, and
what the metrics report of it all."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from esprelay.dispatch import ProviderSet
from esprelay.errors import RateLimited
from esprelay.metrics import RelayMetrics
from esprelay.models import Envelope, OutboundMessage, SendResult
from esprelay.providers.base import Provider
from esprelay.ratelimit import ConcurrencyLimit, RateLimit
from esprelay.testing.fakeesp import FakeESP, Reply
from tests.fakeclock import FakeClock
from tests.test_provider_base import EchoProvider


class Recording(Provider):
    kind = "recording"

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.sent: list[str] = []
        self.gate: asyncio.Event | None = None

    async def send(self, message: OutboundMessage) -> SendResult:
        if self.gate is not None:
            await self.gate.wait()
        self.sent.append(message.id)
        return SendResult(provider_message_id=f"{self.name}-{len(self.sent)}")


def message(number: int) -> OutboundMessage:
    return OutboundMessage(f"m{number}", Envelope("a@example.com", ("b@example.org",)), b"x\r\n")


def samples(metrics: RelayMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return (name, frozenset(labels.items()))


async def test_a_short_wait_is_waited_and_counted() -> None:
    clock = FakeClock()
    esp = Recording("esp")
    esp.rate_limit = RateLimit(1.0, burst=1, clock=clock)
    providers = ProviderSet({"esp": esp}, max_wait=10.0, clock=clock)
    await providers.send(message(1), ["esp"])
    second = asyncio.create_task(providers.send(message(2), ["esp"]))
    await clock.waiting(1)
    assert esp.sent == ["m1"]
    clock.advance(1.0)
    sent = await asyncio.wait_for(second, 1)
    assert (sent.provider, esp.sent) == ("esp", ["m1", "m2"])
    metrics = RelayMetrics()
    metrics.watch_providers(providers)
    found = samples(metrics)
    assert found[key("esprelay_provider_rate_limit", provider="esp")] == 1.0
    assert found[key("esprelay_provider_rate_limit_burst", provider="esp")] == 1.0
    assert found[key("esprelay_provider_throttled_total", provider="esp", limit="rate")] == 1
    waited = key("esprelay_provider_throttle_wait_seconds_total", provider="esp", limit="rate")
    assert found[waited] == pytest.approx(1.0)
    deferred = key("esprelay_provider_throttle_deferred_total", provider="esp", limit="rate")
    assert found[deferred] == 0


async def test_a_wait_past_the_lease_defers_without_touching_the_breaker() -> None:
    clock = FakeClock()
    esp = Recording("esp")
    esp.rate_limit = RateLimit(1 / 60, burst=1, clock=clock)  # 1/min
    providers = ProviderSet({"esp": esp}, max_wait=10.0, breaker_threshold=1, clock=clock)
    await providers.send(message(1), ["esp"])
    with pytest.raises(RateLimited) as deferred:
        await providers.send(message(2), ["esp"])
    assert deferred.value.provider == "esp"
    assert deferred.value.retry_after == pytest.approx(60.0)
    assert "past the lease" in str(deferred.value)
    assert providers.breakers["esp"].state.value == "closed"
    assert esp.sent == ["m1"]
    # Another instant: the token is due at once, and the message goes.
    clock.advance(60.0)
    assert (await providers.send(message(3), ["esp"])).provider == "esp"


async def test_a_throttled_provider_is_passed_over_for_the_next_of_the_route() -> None:
    clock = FakeClock()
    first, second = Recording("first"), Recording("second")
    first.rate_limit = RateLimit(1 / 60, burst=1, clock=clock)
    providers = ProviderSet({"first": first, "second": second}, max_wait=10.0, clock=clock)
    chain = ["first", "second"]
    assert [(await providers.send(message(n), chain)).provider for n in (1, 2, 3)] == [
        "first",
        "second",
        "second",
    ]
    assert providers.breakers["first"].state.value == "closed"


async def test_the_concurrency_cap_holds_messages_back_until_a_slot_frees() -> None:
    clock = FakeClock()
    esp = Recording("esp")
    esp.gate = asyncio.Event()
    esp.concurrency = ConcurrencyLimit(2, clock=clock)
    providers = ProviderSet({"esp": esp}, max_wait=30.0, clock=clock)
    tasks = [asyncio.create_task(providers.send(message(n), ["esp"])) for n in range(4)]
    await clock.waiting(2)  # two in the ESP's hands, two waiting for a slot
    assert esp.concurrency.in_flight == 2
    metrics = RelayMetrics()
    metrics.watch_providers(providers)
    found = samples(metrics)
    assert found[key("esprelay_provider_concurrency_limit", provider="esp")] == 2
    assert found[key("esprelay_provider_in_flight", provider="esp")] == 2
    esp.gate.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 1)
    assert sorted(esp.sent) == ["m0", "m1", "m2", "m3"]
    found = samples(metrics)
    assert found[key("esprelay_provider_in_flight", provider="esp")] == 0
    assert found[key("esprelay_provider_throttled_total", provider="esp", limit="concurrency")] == 2


async def test_breaker_states_are_reported_per_provider() -> None:
    clock = FakeClock()
    providers = ProviderSet(
        {"a": Recording("a"), "b": Recording("b")}, breaker_threshold=1, clock=clock
    )
    providers.breakers["b"].record_failure()
    metrics = RelayMetrics()
    metrics.watch_providers(providers)
    found = samples(metrics)
    state = "esprelay_provider_circuit_state"
    assert found[key(state, provider="a", state="closed")] == 1
    assert found[key(state, provider="a", state="open")] == 0
    assert found[key(state, provider="b", state="open")] == 1
    assert found[key(state, provider="b", state="half_open")] == 0
    assert found[key("esprelay_provider_circuit_opens_total", provider="b")] == 1
    # No limits configured: no limit series for them.
    assert not any(name == "esprelay_provider_rate_limit" for name, _ in found)


async def test_an_http_provider_spends_one_token_per_message_through_the_dispatcher() -> None:
    """The dispatcher's token is the first request's: not one more taken in _exchange;
    a provider called directly still takes its own."""
    clock = FakeClock()
    with FakeESP(lambda request: Reply(200, {"id": "esp"})) as esp:
        async with httpx.AsyncClient() as client:
            echo = EchoProvider(client, esp.url)
            echo.rate_limit = RateLimit(1 / 60, burst=2, clock=clock)
            providers = ProviderSet({"echo": echo}, max_wait=10.0, clock=clock)
            for number in (1, 2):
                assert (await providers.send(message(number), ["echo"])).provider == "echo"
            with pytest.raises(RateLimited):
                await providers.send(message(3), ["echo"])
            assert len(esp.requests) == 2
            clock.advance(60.0)
            assert (await echo.send(message(4))).provider_message_id == "esp"
            direct = asyncio.create_task(echo.send(message(5)))
            await clock.waiting(1)  # the bucket is empty again: the direct send waits
            assert len(esp.requests) == 3
            clock.advance(60.0)
            await asyncio.wait_for(direct, 10)
    assert len(esp.requests) == 4
