"""The token bucket keeps the rate, serves waiters in turn, and holds after a 429; the
limits' settings for every kind; no wait past a deadline."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from esprelay.errors import ConfigError
from esprelay.providers.registry import configure, get_kind
from esprelay.ratelimit import ConcurrencyLimit, RateLimit, Throttled, parse_rate
from tests.fakeclock import FakeClock


async def test_bursts_then_paces() -> None:
    clock = FakeClock()
    limit = RateLimit(2.0, burst=2, clock=clock)
    sent: list[float] = []

    async def send() -> None:
        await limit.acquire()
        sent.append(clock.monotonic())

    tasks = [asyncio.create_task(send()) for _ in range(5)]
    for _ in range(10):
        await asyncio.sleep(0)
        clock.advance(0.25)
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    start = sent[0]
    assert [round(t - start, 2) for t in sent] == [0.0, 0.0, 0.5, 1.0, 1.5]


async def test_hold_until_stops_every_request() -> None:
    clock = FakeClock()
    limit = RateLimit(100.0, burst=10, clock=clock)
    await limit.acquire()
    limit.hold_until(3.0)
    task = asyncio.create_task(limit.acquire())
    await clock.waiting(1)
    clock.advance(2.9)
    await asyncio.sleep(0)
    assert not task.done()
    clock.advance(0.2)
    await asyncio.wait_for(task, 1)


def test_nonsense_is_refused() -> None:
    with pytest.raises(ValueError):
        RateLimit(0)


# --- settings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "per_second"),
    [
        ("2", 2.0),
        ("0.5", 0.5),
        ("10/s", 10.0),
        ("600/min", 10.0),
        ("30 / minute", 0.5),
        ("3600/h", 1.0),
        ("7/SEC", 7.0),
    ],
)
def test_rates_are_read_per_second_or_minute(text: str, per_second: float) -> None:
    assert parse_rate(text) == per_second


@pytest.mark.parametrize("text", ["fast", "10/day", "/min", "1e3", "-1", "10/m/s"])
def test_rates_that_mean_nothing_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)


@pytest.mark.parametrize("kind", ["sendgrid", "postmark", "mailgun", "outbox", "ses", "brevo"])
def test_every_kind_takes_a_rate_and_a_concurrency(kind: str) -> None:
    config = configure(
        get_kind(kind),
        {**REQUIRED[kind], "rate": "120/min", "concurrency": "3"},
    )
    assert (config.settings.rate, config.settings.concurrency) == (2.0, 3)  # type: ignore[attr-defined]
    provider = config.build(httpx.AsyncClient(), "named")
    assert provider.rate_limit is not None and provider.concurrency is not None
    assert (provider.rate_limit.rate, provider.rate_limit.burst) == (2.0, 2)
    assert provider.concurrency.limit == 3


def test_without_settings_only_the_builtin_limits_remain() -> None:
    client = httpx.AsyncClient()
    outbox = configure(get_kind("outbox"), REQUIRED["outbox"]).build(client)
    assert (outbox.rate_limit, outbox.concurrency) == (None, None)
    # Resend's own default (2/s) keeps its name and value; Brevo's built-in 1000/s stays.
    resend = configure(get_kind("resend"), {"api_key": "re_x"}).build(client)
    assert resend.rate_limit is not None and resend.rate_limit.rate == 2.0
    brevo = configure(get_kind("brevo"), REQUIRED["brevo"]).build(client)
    assert brevo.rate_limit is not None and brevo.rate_limit.rate == 1000.0
    slow = configure(get_kind("resend"), {"api_key": "re_x", "rate": "30/min"}).build(client)
    assert slow.rate_limit is not None and slow.rate_limit.rate == 0.5


@pytest.mark.parametrize(
    ("field", "value"), [("rate", "0"), ("rate", "-3/min"), ("concurrency", "0")]
)
def test_nonsense_limits_name_their_variable(field: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"ESPRELAY_SENDGRID_{field.upper()}"):
        configure(get_kind("sendgrid"), {**REQUIRED["sendgrid"], field: value})


REQUIRED: dict[str, dict[str, str]] = {
    "sendgrid": {"api_key": "SG.x"},
    "postmark": {"server_token": "x"},
    "mailgun": {"api_key": "key-x", "domain": "mg.example.com"},
    "outbox": {},
    "ses": {"region": "eu-west-1"},
    "brevo": {"api_key": "xkeysib-x"},
}


# --- deadlines -----------------------------------------------------------------------


async def test_a_wait_past_the_deadline_is_refused_without_taking_a_token() -> None:
    clock = FakeClock()
    limit = RateLimit(1.0, burst=1, clock=clock)
    await limit.acquire(deadline=clock.monotonic())  # the burst: no wait
    with pytest.raises(Throttled) as refused:
        await limit.acquire(deadline=clock.monotonic() + 0.5)
    assert refused.value.limit == "rate" and refused.value.wait == pytest.approx(1.0)
    assert (limit.waits, limit.deferred) == (0, 1)
    # The refused call reserved nothing: the next one is due after one interval.
    task = asyncio.create_task(limit.acquire(deadline=clock.monotonic() + 1.0))
    await clock.waiting(1)
    clock.advance(1.0)
    await asyncio.wait_for(task, 1)
    assert (limit.waits, limit.deferred) == (1, 1)
    assert limit.waited_seconds == pytest.approx(1.0)


async def test_a_hold_that_comes_while_waiting_is_kept_to_the_deadline() -> None:
    clock = FakeClock()
    limit = RateLimit(1.0, burst=1, clock=clock)
    await limit.acquire()
    task = asyncio.create_task(limit.acquire(deadline=clock.monotonic() + 5.0))
    await clock.waiting(1)
    limit.hold_until(30.0)  # a 429 with a long Retry-After, meanwhile
    clock.advance(1.0)
    with pytest.raises(Throttled):
        await asyncio.wait_for(task, 1)
    assert limit.deferred == 1


async def test_concurrency_waits_for_a_slot_until_the_deadline() -> None:
    clock = FakeClock()
    limit = ConcurrencyLimit(1, clock=clock)
    release = asyncio.Event()

    async def hold() -> None:
        async with limit.slot():
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    assert limit.in_flight == 1

    async def queued(deadline: float | None) -> str:
        async with limit.slot(deadline=deadline):
            return "sent"

    late = asyncio.create_task(queued(clock.monotonic() + 2.0))
    patient = asyncio.create_task(queued(clock.monotonic() + 60.0))
    await clock.waiting(2)
    clock.advance(2.0)
    with pytest.raises(Throttled) as refused:
        await asyncio.wait_for(late, 1)
    assert refused.value.limit == "concurrency"
    clock.advance(1.0)
    release.set()
    assert await asyncio.wait_for(patient, 1) == "sent"
    await holder
    assert (limit.in_flight, limit.waits, limit.deferred) == (0, 2, 1)
    assert limit.waited_seconds == pytest.approx(5.0)
