"""A batch of events applied at once (``apply_events``, ``EventProcessor.apply_batch``)
does what applying them one after the other does, on both spool backends, and costs
PostgreSQL a bounded number of round trips whatever the batch holds.

Random event sequences (a fixed seed each): duplicates, several events of one
recipient, out-of-order times, DSN claims of every kind, events of a message that is
not (or no longer) in the spool.  One set of messages gets the events one at a time,
a twin set (same envelopes, other ids) gets them in batches; their statuses,
timelines and claims must be the same.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from esprelay.errors import SpoolError
from esprelay.events.model import Event
from esprelay.events.processor import EventProcessor
from esprelay.events.status import Application, Applied
from esprelay.intake import header_meta
from esprelay.metrics import RelayMetrics
from esprelay.models import Envelope, MessageState
from esprelay.spool import NewPart, open_spool
from tests.pgutil import temporary_database
from tests.test_events_status import empty_postgres

RAW = (
    b"From: app@sender.example\r\nTo: a@rcpt.example\r\nSubject: hi\r\n"
    b"Message-ID: <hi@sender.example>\r\n\r\nthe body\r\n"
)
RECIPIENTS = ("a@rcpt.example", "b@rcpt.example")
KINDS = ("delivered", "deferred", "bounced", "dropped", "complained", "opened", "clicked")
SEEDS = range(8)
#: PostgreSQL round trips of one apply_events, however many events it holds.
APPLY_ROUND_TRIPS = 5


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with temporary_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def spool_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'spool.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def spool(spool_url: str) -> AsyncIterator[Any]:
    url = spool_url
    if url.startswith("postgresql"):
        await empty_postgres(url)
    opened = open_spool(url, exclusive=True)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def twins(spool: Any, count: int, **meta: Any) -> tuple[list[str], list[str]]:
    """``count`` messages delivered, and as many twins: (ids, twin ids)."""
    ids: list[str] = []
    for _ in range(2 * count):
        part = NewPart(
            Envelope("app@sender.example", RECIPIENTS),
            "outbox",
            {"route": "default", **header_meta(RAW, keep_headers=True), **meta},
        )
        [id] = await spool.put_parts(RAW, [part])
        ids.append(id)
    for leased in await spool.lease("w", 2 * count, 60):
        assert await spool.mark_delivered(
            leased.id, owner="w", provider="sendgrid", provider_message_id=f"esp-{leased.id}"
        )
    return ids[:count], ids[count:]


def random_events(rng: random.Random, targets: list[str], count: int) -> list[tuple[int, Event]]:
    """``count`` events of the messages of ``targets`` (by index), some of them the same
    event again (an ESP's retry), at times out of order."""
    base = time.time() - 3600
    made: list[tuple[int, Event]] = []
    for n in range(count):
        if made and rng.random() < 0.25:
            made.append(rng.choice(made))
            continue
        kind = rng.choice(KINDS)
        made.append(
            (
                rng.randrange(len(targets)),
                Event(
                    provider=rng.choice(("sendgrid", "mailgun")),
                    provider_event_id=f"ev{n}",
                    kind=kind,  # type: ignore[arg-type]
                    recipient=rng.choice(RECIPIENTS),
                    at=base + rng.choice((0, 10, 10, 20, 30, 40)),  # ties too
                    smtp_status="5.1.1" if kind in ("bounced", "dropped") else None,
                    diagnostic=f"text {n}",
                ),
            )
        )
    return made


@pytest.mark.parametrize("seed", SEEDS)
async def test_apply_events_is_apply_event_one_after_the_other(spool: Any, seed: int) -> None:
    rng = random.Random(seed)
    ones, batched = await twins(spool, 3)
    # A message deleted before its events, and one no spool ever held.
    gone, gone_twin = await twins(spool, 1)
    assert await spool.delete(gone[0]) and await spool.delete(gone_twin[0])
    ones, batched = [*ones, gone[0], "nope-1"], [*batched, gone_twin[0], "nope-2"]
    events = random_events(rng, ones, 60)
    dsns = [rng.choice((None, None, "failure", "success", "delay")) for _ in events]

    expected: list[Applied | None] = []
    for (target, event), dsn in zip(events, dsns, strict=True):
        recipient = event.recipient or ""
        expected.append(await spool.apply_event(ones[target], recipient, event, dsn=dsn))
    batch = [
        Application(batched[target], event.recipient or "", event, dsn)
        for (target, event), dsn in zip(events, dsns, strict=True)
    ]
    got: list[Applied | None] = []
    start = 0
    while start < len(batch):  # batches of random sizes, the last ones seeing the first
        size = rng.randint(1, 25)
        before = getattr(spool, "round_trips", 0)
        got.extend(await spool.apply_events(batch[start : start + size]))
        if hasattr(spool, "round_trips"):
            assert spool.round_trips - before <= APPLY_ROUND_TRIPS
        start += size
    assert got == expected
    assert any(a is not None and not a.new for a in got)  # duplicates were there
    assert any(a is not None and a.dsn for a in got)
    assert any(a is not None and not a.dsn for a, d in zip(got, dsns, strict=True) if d)
    for one, twin in zip(ones, batched, strict=True):
        assert await spool.message_status(one) == await spool.message_status(twin)
    # Given back in both: claimed again in both.
    for target in range(2):
        await spool.release_dsn(ones[target], RECIPIENTS[0], "failure")
        await spool.release_dsn(batched[target], RECIPIENTS[0], "failure")
    again = [
        e for e in random_events(random.Random(seed + 100), ones, 20) if e[0] < 2 and e[1].recipient
    ]
    one_by_one = [
        await spool.apply_event(ones[t], e.recipient or "", e, dsn="failure") for t, e in again
    ]
    assert one_by_one == await spool.apply_events(
        [Application(batched[t], e.recipient or "", e, "failure") for t, e in again]
    )
    for one, twin in zip(ones, batched, strict=True):
        assert await spool.message_status(one) == await spool.message_status(twin)


@pytest.mark.parametrize("spool_url", ["postgresql"], indirect=True)  # SQLite: no round trips
async def test_a_large_batch_costs_postgresql_five_round_trips(spool: Any) -> None:
    ids, _ = await twins(spool, 20)
    events = random_events(random.Random(1), ids, 500)
    before = spool.round_trips
    results = await spool.apply_events(
        [Application(ids[t], e.recipient or "", e, "failure") for t, e in events]
    )
    assert spool.round_trips - before == APPLY_ROUND_TRIPS
    assert len(results) == 500 and all(r is not None for r in results)
    claimed = sum(r.dsn for r in results if r is not None)
    assert 0 < claimed <= 20 * len(RECIPIENTS)
    before = spool.round_trips
    assert await spool.apply_events([Application("nope", "r@x", events[0][1])]) == [None]
    assert spool.round_trips - before == 3  # BEGIN, the lock (no message), COMMIT


def processor(spool: Any, **kw: Any) -> EventProcessor:
    options: dict[str, Any] = {
        "inbox": spool,
        "store": spool,
        "spool": spool,
        "hostname": "relay.test",
        "bounce_mode": "sender",
        "bounce_from": None,
        "delay_dsn_after": -86400.0,  # the events' times are before intake
        "default_chain": ("outbox",),
        "metrics": RelayMetrics(),
        **kw,
    }
    return EventProcessor(**options)


async def dsns_for(spool: Any) -> dict[str, list[str]]:
    """The DSN kinds queued, by the message they report on, sorted."""
    found: dict[str, list[str]] = {}
    for message in await spool.list(state=MessageState.QUEUED, limit=10_000):
        if message.meta.get("dsn_for"):
            found.setdefault(message.meta["dsn_for"], []).append(message.meta["dsn_kind"])
    return {id: sorted(kinds) for id, kinds in found.items()}


@pytest.mark.parametrize("seed", SEEDS[:4])
async def test_the_processor_batched_and_one_at_a_time_agree(spool: Any, seed: int) -> None:
    rng = random.Random(seed)
    notify = {r: {"notify": ["SUCCESS", "FAILURE", "DELAY"]} for r in RECIPIENTS}
    ones, batched = await twins(spool, 3, dsn_rcpts=notify)
    events = random_events(rng, ones, 60)
    # The same events, as the ESP would send them for the twins (their own ids).
    twin_events = [
        (t, Event(**{**_fields(e), "provider_event_id": "t" + e.provider_event_id}))
        for t, e in events
    ]
    for (target, event), (_, twin_event) in zip(events, twin_events, strict=True):
        await spool.put_events(
            [
                Event(**{**_fields(event), "esprelay_id": ones[target]}),
                Event(**{**_fields(twin_event), "esprelay_id": batched[target]}),
            ]
        )
    # Taken from the inbox as processed: the twins in batches, the others one at a time.
    events_processor = processor(spool, batch=rng.randint(5, 40))
    pending = await spool.pending_events(1000)
    theirs = [s for s in pending if s.event.provider_event_id.startswith("t")]
    mine = [s for s in pending if not s.event.provider_event_id.startswith("t")]
    done: list[int] = []
    await events_processor._apply_each(mine, done)
    assert len(done) == len(mine)
    await spool.finish_events(done)
    before = getattr(spool, "round_trips", 0)
    assert await events_processor.process_pending() == len(theirs)
    spent = getattr(spool, "round_trips", 0) - before
    if hasattr(spool, "round_trips"):
        # Per batch: the pending read, the messages, their bodies for DSNs, the apply,
        # the finish; a statement per DSN queued; and the last, empty read.
        batches = -(-len(theirs) // events_processor.batch)
        queued = sum(len(kinds) for id, kinds in (await dsns_for(spool)).items() if id in batched)
        assert spent <= batches * (4 + APPLY_ROUND_TRIPS) + 2 * queued + 1
    for one, twin in zip(ones, batched, strict=True):
        mine_status = await spool.message_status(one)
        their_status = await spool.message_status(twin)
        assert [r.dsn_sent for r in mine_status.recipients] == [
            r.dsn_sent for r in their_status.recipients
        ]
        assert [r.status.kind for r in mine_status.recipients] == [
            r.status.kind for r in their_status.recipients
        ]
        assert [(e.kind, e.at) for e in mine_status.timeline] == [
            (e.kind, e.at) for e in their_status.timeline
        ]
    queued = await dsns_for(spool)
    assert [queued.get(id) for id in ones] == [queued.get(id) for id in batched]
    assert any(queued.values())
    assert await spool.pending_events() == []


def _fields(event: Event) -> dict[str, Any]:
    return {name: getattr(event, name) for name in Event.__dataclass_fields__}


async def test_a_dsn_not_queued_mid_batch_gives_back_the_claims_after_it(
    spool: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, _ = await twins(spool, 3)
    await spool.put_events(
        [
            Event(
                provider="sendgrid",
                provider_event_id=f"b{n}",
                kind="bounced",
                recipient=RECIPIENTS[0],
                at=time.time(),
                smtp_status="5.1.1",
                esprelay_id=id,
            )
            for n, id in enumerate(ids)
        ]
    )
    real = spool.put_parts
    calls = 0

    async def full_after_one(*args: Any, **kw: Any) -> list[str]:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise SpoolError("disk full")
        return list(await real(*args, **kw))

    monkeypatch.setattr(spool, "put_parts", full_after_one)
    events = processor(spool)
    with pytest.raises(SpoolError):
        await events.process_pending()
    assert [s.event.provider_event_id for s in await spool.pending_events()] == ["b1", "b2"]
    sent = [(await spool.message_status(id)).recipients[0].dsn_sent for id in ids]
    assert sent == [("failure",), (), ()]
    monkeypatch.setattr(spool, "put_parts", real)
    assert await events.process_pending() == 2
    assert await dsns_for(spool) == {id: ["failure"] for id in ids}


async def test_a_batch_the_store_fails_on_is_applied_one_at_a_time(
    spool: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the batch path must not hold the inbox up."""
    ids, _ = await twins(spool, 2)
    await spool.put_events(
        [
            Event(
                provider="sendgrid",
                provider_event_id=f"d{n}",
                kind="delivered",
                recipient=RECIPIENTS[1],
                at=time.time(),
                esprelay_id=id,
            )
            for n, id in enumerate(ids)
        ]
    )

    async def broken(batch: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(spool, "apply_events", broken)
    assert await processor(spool).process_pending() == 2
    for id in ids:
        [status] = (await spool.message_status(id)).recipients
        assert (status.status.recipient, status.status.kind) == (RECIPIENTS[1], "delivered")
    assert await spool.pending_events() == []
