"""A provider that accepts a message for some recipients only (``SendResult.rejected``).

``Deliverer._record`` bounces the recipients refused for good, queues the message again
for those refused for now alone, and never sends to an accepted recipient again.  The
spool is a real SQLite spool on the same fake clock as the deliverer (see
tests/test_delivery.py); the PostgreSQL spool's ``mark_partial`` is covered in
tests/spool/test_partial.py and end to end in tests/test_e2e_partial.py.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from esprelay.backoff import RetryPolicy
from esprelay.delivery import Deliverer, Outcome
from esprelay.dispatch import ProviderSet
from esprelay.errors import (
    DeliveryError,
    MessageRejected,
    ProviderUnavailable,
    RateLimited,
)
from esprelay.failures import FailureNotifier
from esprelay.message.dsn import EnvelopeDSN, RecipientDSN, build_dsn
from esprelay.metrics import RelayMetrics
from esprelay.models import Envelope, MessageState, OutboundMessage, SendResult
from esprelay.providers.base import Provider
from esprelay.spool import NewPart
from esprelay.spool.sqlite import SqliteSpool
from tests.fakeclock import FakeClock

A, B, C = "a@example.org", "b@example.org", "c@example.org"
SENDER = "app@example.com"
RAW = b"From: app@example.com\r\nTo: a@example.org\r\nSubject: t\r\n\r\nx\r\n"
POLL = 1.0
PATIENCE = 10.0
POLICY = RetryPolicy(retry_initial=10, retry_max=12.5, retry_config_error=300)

Script = list[dict[str, DeliveryError] | BaseException]


class PartialProvider(Provider):
    """Answers each send with the next scripted answer: the recipients it refuses (an
    empty dict accepts them all), or an exception for the whole message."""

    kind = "partial"

    def __init__(self, script: Script) -> None:
        super().__init__()
        self.script = script
        self.sent: list[OutboundMessage] = []

    async def send(self, message: OutboundMessage) -> SendResult:
        self.sent.append(message)
        answer = self.script.pop(0) if self.script else {}
        if isinstance(answer, BaseException):
            raise answer
        return SendResult(
            provider_message_id=f"esp-{len(self.sent)}", rejected=tuple(answer.items())
        )


def refused(text: str = "mailbox unknown") -> MessageRejected:
    return MessageRejected(text, provider="partial", status_code=200)


def later_please(text: str = "mailbox busy", retry_after: float | None = None) -> RateLimited:
    return RateLimited(text, provider="partial", status_code=200, retry_after=retry_after)


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
    """A deliverer on the fake clock; its outcomes and the ones it hands to on_failed."""

    def __init__(
        self,
        spool: SqliteSpool,
        provider: Provider,
        clock: FakeClock,
        policy: RetryPolicy = POLICY,
        on_failed: Callable[[Outcome], None] | None = None,
    ) -> None:
        self.clock = clock
        self.outcomes: asyncio.Queue[Outcome] = asyncio.Queue()
        self.failed: list[Outcome] = []
        self.metrics = RelayMetrics()

        def on_outcome(outcome: Outcome) -> None:
            self.metrics.delivery_outcome(outcome)
            self.outcomes.put_nowait(outcome)

        self.deliverer = Deliverer(
            spool,
            ProviderSet({provider.name: provider}, clock=clock),
            default_chain=(provider.name,),
            owner="test",
            concurrency=2,
            lease_time=30,
            poll_interval=POLL,
            policy=policy,
            on_outcome=on_outcome,
            on_failed=on_failed or self.failed.append,
            clock=clock,
        )

    async def __aenter__(self) -> Run:
        self.deliverer.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.deliverer.stop(grace=0)

    async def outcome(self) -> Outcome:
        return await asyncio.wait_for(self.outcomes.get(), PATIENCE)

    async def later(self, seconds: float = 20.0) -> None:
        await asyncio.wait_for(self.clock.waiting(seconds=POLL), PATIENCE)
        self.clock.advance(seconds)
        await asyncio.wait_for(self.clock.waiting(seconds=POLL), PATIENCE)

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


async def put(spool: SqliteSpool, *rcpts: str, meta: dict[str, Any] | None = None) -> str:
    return await spool.put(Envelope(SENDER, rcpts or (A, B, C)), RAW, provider="partial", meta=meta)


async def test_accepted_once_permanent_bounced_transient_retried_alone(
    spool: SqliteSpool, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "esprelay")
    provider = PartialProvider([{B: refused(), C: later_please()}, {}])
    message_id = await put(spool)
    async with Run(spool, provider, clock) as run:
        first = await run.outcome()
        assert first.outcome == "partial"
        assert first.accepted == (A,)
        assert [r for r, _ in first.bounced] == [B]
        assert first.retried == (C,)
        assert run.failed == [first]  # B is bounced at once

        message = await spool.get(message_id, with_body=True)
        assert message is not None
        assert message.state is MessageState.QUEUED
        assert message.envelope.rcpt_tos == (C,)
        assert message.raw == RAW
        assert message.provider_message_id == "esp-1"
        assert 8 <= message.next_attempt_at - clock.time() <= 12  # the first backoff
        [attempt] = message.history
        assert attempt.outcome == "partial" and attempt.provider_message_id == "esp-1"
        assert attempt.error is not None
        assert f"accepted <{A}>" in attempt.error
        assert f"bounced <{B}> (mailbox unknown" in attempt.error
        assert f"retried <{C}> (mailbox busy" in attempt.error

        await run.later()
        second = await run.outcome()
        assert second.outcome == "delivered"
        assert (
            run.metric(
                "esprelay_delivery_partial_recipients_total", provider="partial", fate="accepted"
            )
            == 1
        )
        assert run.metric("esprelay_deliveries_total", provider="partial", outcome="partial") == 1
    assert [m.envelope.rcpt_tos for m in provider.sent] == [(A, B, C), (C,)]
    assert len(run.failed) == 1
    message = await spool.get(message_id)
    assert message is not None and message.state is MessageState.DELIVERED
    assert [(a.outcome, a.provider_message_id) for a in message.history] == [
        ("partial", "esp-1"),
        ("delivered", "esp-2"),
    ]
    assert "rcpts=1 provider_id=esp-1 rejected=2" in caplog.text
    assert f"rcpt=<{B}> action=bounce error=mailbox unknown" in caplog.text
    assert f"rcpt=<{C}> action=retry error=mailbox busy" in caplog.text


async def test_permanent_refusals_only_deliver_and_bounce(
    spool: SqliteSpool, clock: FakeClock
) -> None:
    provider = PartialProvider([{B: refused()}])
    message_id = await put(spool, A, B)
    async with Run(spool, provider, clock) as run:
        outcome = await run.outcome()
        assert outcome.outcome == "partial" and outcome.retried == ()
        assert [r for r, _ in outcome.bounced] == [B]
        await run.later(86400)
    assert len(provider.sent) == 1
    message = await spool.get(message_id, with_body=True)
    assert message is not None
    assert message.state is MessageState.DELIVERED
    assert message.envelope.rcpt_tos == (A, B)
    assert message.raw is None
    assert [a.outcome for a in message.history] == ["partial"]


async def test_every_recipient_refused_for_good_fails_the_message(
    spool: SqliteSpool, clock: FakeClock
) -> None:
    provider = PartialProvider([{A: refused("no such user"), B: refused("suppressed")}])
    message_id = await put(spool, A, B)
    async with Run(spool, provider, clock) as run:
        outcome = await run.outcome()
    assert outcome.outcome == "failed" and not outcome.expired
    assert [r for r, _ in outcome.bounced] == [A, B]
    assert outcome.error is not None and "no such user" in str(outcome.error)
    assert "suppressed" in str(outcome.error)
    assert run.failed == [outcome]
    message = await spool.get(message_id)
    assert message is not None and message.state is MessageState.FAILED


async def test_every_recipient_refused_for_now_defers_the_message_whole(
    spool: SqliteSpool, clock: FakeClock
) -> None:
    provider = PartialProvider([{A: later_please(retry_after=100), B: later_please()}, {}])
    message_id = await put(spool, A, B)
    async with Run(spool, provider, clock) as run:
        outcome = await run.outcome()
        assert outcome.outcome == "deferred"
        message = await spool.get(message_id)
        assert message is not None and message.envelope.rcpt_tos == (A, B)
        assert message.next_attempt_at == pytest.approx(clock.time() + 100)  # retry_after
        await run.later(99)
        assert len(provider.sent) == 1
        await run.later(2)
        assert (await run.outcome()).outcome == "delivered"
    assert [m.envelope.rcpt_tos for m in provider.sent] == [(A, B), (A, B)]
    assert run.failed == []


async def test_no_recipient_accepted_still_splits_bounce_and_retry(
    spool: SqliteSpool, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "esprelay")
    provider = PartialProvider([{B: refused(), C: later_please(retry_after=60)}, {}])
    message_id = await put(spool, B, C)
    async with Run(spool, provider, clock) as run:
        outcome = await run.outcome()
        assert outcome.outcome == "partial" and outcome.accepted == ()
        assert [r for r, _ in outcome.bounced] == [B] and outcome.retried == (C,)
        message = await spool.get(message_id)
        assert message is not None and message.envelope.rcpt_tos == (C,)
        assert message.next_attempt_at == pytest.approx(clock.time() + 60)
        await run.later(61)
        assert (await run.outcome()).outcome == "delivered"
    assert [m.envelope.rcpt_tos for m in provider.sent] == [(B, C), (C,)]
    assert f"partial id={message_id} provider=partial attempt=1 " in caplog.text
    assert "rcpts=0 provider_id=esp-1 rejected=2" in caplog.text


async def test_a_retried_recipient_expires_and_is_bounced_alone(
    spool: SqliteSpool, clock: FakeClock
) -> None:
    provider = PartialProvider([{C: later_please()}, *([ProviderUnavailable("503")] * 20)])
    message_id = await put(spool)
    policy = RetryPolicy(retry_initial=10, retry_max=12.5, max_queue_lifetime=50)
    async with Run(spool, provider, clock, policy) as run:
        assert (await run.outcome()).outcome == "partial"
        while True:
            await run.later()
            outcome = await run.outcome()
            if outcome.outcome == "failed":
                break
            assert outcome.outcome == "deferred"
    assert outcome.expired
    assert outcome.message.envelope.rcpt_tos == (C,)  # the bounce names C alone
    assert run.failed == [outcome]
    assert all(m.envelope.rcpt_tos == (C,) for m in provider.sent[1:])
    message = await spool.get(message_id)
    assert message is not None and message.state is MessageState.FAILED


async def test_a_partial_answer_past_the_lifetime_bounces_the_transient_ones(
    spool: SqliteSpool, clock: FakeClock
) -> None:
    provider = PartialProvider([ProviderUnavailable("503"), {C: later_please()}])
    message_id = await put(spool)
    policy = RetryPolicy(retry_initial=10, retry_max=12.5, max_queue_lifetime=15)
    async with Run(spool, provider, clock, policy) as run:
        assert (await run.outcome()).outcome == "deferred"
        await run.later()
        outcome = await run.outcome()
    assert outcome.outcome == "partial" and outcome.expired
    assert [r for r, _ in outcome.bounced] == [C] and outcome.retried == ()
    message = await spool.get(message_id)
    assert message is not None and message.state is MessageState.DELIVERED


async def test_refusals_name_recipients_in_any_case_and_unknown_ones_are_ignored(
    spool: SqliteSpool, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    provider = PartialProvider([{B.upper(): refused(), "stranger@example.net": refused()}])
    await put(spool, A, B)
    async with Run(spool, provider, clock) as run:
        outcome = await run.outcome()
    assert [r for r, _ in outcome.bounced] == [B]
    assert "refused <stranger@example.net>, which is not an envelope recipient" in caplog.text

    idn = "b@bücher.example"
    provider.script = [{"B@xn--bcher-kva.example": refused()}]  # as an ASCII-only ESP got it
    await put(spool, A, idn)
    async with Run(spool, provider, clock) as run:
        outcome = await run.outcome()
    assert [r for r, _ in outcome.bounced] == [idn]

    provider.script = [{"stranger@example.net": refused()}]
    await put(spool, A)
    async with Run(spool, provider, clock) as run:
        assert (await run.outcome()).outcome == "delivered"


def failure_notifier(
    spool: SqliteSpool, client: httpx.AsyncClient, bounce_mode: str = "sender"
) -> FailureNotifier:
    """A FailureNotifier as the relay builds one, for the "partial" provider."""
    return FailureNotifier(
        spool=spool,
        client=client,
        hostname="relay.test",
        bounce_mode=bounce_mode,
        bounce_from=None,
        webhook_url=None,
        default_chain=("partial",),
        wake=lambda: None,
    )


async def notify(spool: SqliteSpool, outcome: Outcome, bounce_mode: str = "sender") -> None:
    """Hand ``outcome`` to a notifier and wait until it has acted on it."""
    async with httpx.AsyncClient() as client:
        notifier = failure_notifier(spool, client, bounce_mode)
        notifier.on_failed(outcome)
        await notifier.wait(PATIENCE)


async def test_an_inline_attempt_answers_250_and_bounces_the_refused(
    spool: SqliteSpool, clock: FakeClock
) -> None:
    provider = PartialProvider([{B: refused()}])
    async with Run(spool, provider, clock) as run:
        [message_id] = await spool.put_parts(
            RAW,
            [NewPart(Envelope(SENDER, (A, B)), "partial")],
            lease_owner="test",
            lease_time=30,
        )
        message = await spool.get(message_id, with_body=True)
        assert message is not None
        outcome = await run.deliverer.attempt_inline(message, PATIENCE)
    assert outcome is not None and outcome.outcome == "partial"
    assert run.failed == [outcome]  # the client heard 250: B is bounced by DSN


async def test_the_bounce_names_only_the_refused_with_their_dsn_parameters(
    spool: SqliteSpool, clock: FakeClock
) -> None:
    parameters = EnvelopeDSN(
        ret="HDRS",
        envid="env-1",
        recipients={
            B: RecipientDSN(notify=("FAILURE",), orcpt="rfc822;orig-b@example.org"),
            C: RecipientDSN(notify=("NEVER",)),
        },
    )
    provider = PartialProvider([{B: refused("mailbox unknown"), C: refused("suppressed")}])
    message_id = await put(spool, meta=parameters.meta())
    async with httpx.AsyncClient() as client:
        notifier = failure_notifier(spool, client)
        async with Run(spool, provider, clock, on_failed=notifier.on_failed) as run:
            outcome = await run.outcome()
            assert outcome.outcome == "partial"
            await notifier.wait(PATIENCE)
    bounces = [m for m in await spool.list(limit=10) if m.id != message_id]
    [bounce] = bounces
    assert bounce.envelope == Envelope("", (SENDER,))
    assert bounce.meta["dsn_for"] == message_id
    stored = await spool.get(bounce.id, with_body=True)
    assert stored is not None and stored.raw is not None
    report = email.message_from_bytes(stored.raw, policy=email.policy.default)
    status = report.get_payload()[1]
    blocks = status.get_payload()
    recipients = [b["Final-Recipient"] for b in blocks[1:]]
    assert recipients == [f"rfc822; {B}"]  # not A (delivered), not C (NOTIFY=NEVER)
    assert blocks[1]["Original-Recipient"] == "rfc822;orig-b@example.org"
    assert blocks[1]["Status"] == "5.0.0"
    assert "mailbox unknown" in blocks[1]["Diagnostic-Code"]
    assert blocks[0]["Original-Envelope-Id"] == "env-1"


@pytest.mark.parametrize(
    ("mail_from", "mode", "bounced_to"),
    [
        (SENDER, "sender", SENDER),
        (SENDER, "address:postmaster@example.net", "postmaster@example.net"),
        (SENDER, "off", None),
        ("", "sender", None),  # a null sender gets no bounce
    ],
)
async def test_the_bounce_of_a_partial_outcome_follows_the_bounce_rules(
    spool: SqliteSpool, clock: FakeClock, mail_from: str, mode: str, bounced_to: str | None
) -> None:
    message_id = await spool.put(Envelope(mail_from, (A, B)), RAW, provider="partial")
    [message] = await spool.lease("test", 1, 30)
    outcome = Outcome(
        message, "partial", "partial", None, 0.1, bounced=((B, refused()),), accepted=(A,)
    )
    await notify(spool, outcome, bounce_mode=mode)
    bounces = [m for m in await spool.list(limit=10) if m.id != message_id]
    if bounced_to is None:
        assert bounces == []
        return
    [bounce] = bounces
    assert bounce.envelope == Envelope("", (bounced_to,))
    stored = await spool.get(bounce.id, with_body=True)
    assert stored is not None and stored.raw is not None
    report = email.message_from_bytes(stored.raw, policy=email.policy.default)
    blocks = report.get_payload()[1].get_payload()
    assert [b["Final-Recipient"] for b in blocks[1:]] == [f"rfc822; {B}"]


async def test_a_bounce_refused_in_part_is_not_bounced(spool: SqliteSpool) -> None:
    dsn = build_dsn(
        raw=RAW,
        failed_recipients=[A],
        original_sender=SENDER,
        reason="x",
        status="5.0.0",
        reporting_mta="relay.test",
        from_address="MAILER-DAEMON@relay.test",
        to_address=SENDER,
        arrival_date=0.0,
        message_id="m0",
    )
    message_id = await spool.put(Envelope(SENDER, (A, B)), dsn, provider="partial")
    [message] = await spool.lease("test", 1, 30)
    outcome = Outcome(message, "partial", "partial", None, 0.1, bounced=((B, refused()),))
    await notify(spool, outcome)
    assert [m.id for m in await spool.list(limit=10)] == [message_id]


@pytest.mark.parametrize(
    ("raw", "mail_from"),
    [
        (b"Auto-Submitted: auto-generated\r\n" + RAW, SENDER),
        (RAW, "MAILER-DAEMON@relay.test"),  # from the bounce address: a loop
    ],
)
async def test_delivery_failures_follow_the_one_no_bounce_rule(
    spool: SqliteSpool, raw: bytes, mail_from: str
) -> None:
    """The rule ESP bounce events follow (``failures.no_dsn_reason``) holds for delivery
    failures too: no DSN for Auto-Submitted mail or mail from the bounce address."""
    message_id = await spool.put(Envelope(mail_from, (A, B)), raw, provider="partial")
    [message] = await spool.lease("test", 1, 30)
    outcome = Outcome(message, "partial", "partial", None, 0.1, bounced=((B, refused()),))
    await notify(spool, outcome)
    assert [m.id for m in await spool.list(limit=10)] == [message_id]
