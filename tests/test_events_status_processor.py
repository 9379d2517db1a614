"""The event processor on a real SQLite spool: matching, idempotence across a crash,
at most one DSN, never a bounce of a bounce, what a DSN returns, the inbox's purge."""

from __future__ import annotations

import email
import email.policy
import time
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from esprelay.errors import SpoolError
from esprelay.events.model import Event
from esprelay.events.processor import EventProcessor, no_dsn_reason
from esprelay.intake import header_meta
from esprelay.metrics import RelayMetrics
from esprelay.models import Envelope, MessageState
from esprelay.spool import NewPart
from esprelay.spool.sqlite import SqliteSpool

RAW = (
    b"From: app@sender.example\r\nTo: r@rcpt.example\r\nSubject: hi\r\n"
    b"Message-ID: <hi@sender.example>\r\n\r\nthe body\r\n"
)


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[SqliteSpool]:
    opened = SqliteSpool(tmp_path / "spool.db", exclusive=True)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


def processor(spool: SqliteSpool, **kw: Any) -> EventProcessor:
    options: dict[str, Any] = {
        "inbox": spool,
        "store": spool,
        "spool": spool,
        "hostname": "relay.test",
        "bounce_mode": "sender",
        "bounce_from": None,
        "delay_dsn_after": 3600.0,
        "default_chain": ("outbox",),
        "metrics": RelayMetrics(),
        **kw,
    }
    return EventProcessor(**options)


async def put(
    spool: SqliteSpool,
    *,
    mail_from: str = "app@sender.example",
    raw: bytes = RAW,
    deliver: bool = True,
    **meta: Any,
) -> str:
    part = NewPart(
        Envelope(mail_from, ("r@rcpt.example",)),
        "outbox",
        {"route": "default", **header_meta(raw, keep_headers=True), **meta},
    )
    [id] = await spool.put_parts(raw, [part])
    if deliver:
        [leased] = await spool.lease("w", 1, 60)
        assert await spool.mark_delivered(
            leased.id, owner="w", provider="sendgrid", provider_message_id=f"esp-{id}"
        )
    return id


def bounce(event_id: str, *, esprelay_id: str | None = None, **kw: Any) -> Event:
    return Event(
        provider="sendgrid",
        provider_event_id=event_id,
        kind=kw.pop("kind", "bounced"),
        recipient=kw.pop("recipient", "R@rcpt.example"),
        at=kw.pop("at", time.time()),
        smtp_status=kw.pop("smtp_status", "5.1.1"),
        diagnostic=kw.pop("diagnostic", "550 5.1.1 no such user"),
        esprelay_id=esprelay_id,
        **kw,
    )


async def dsns(spool: SqliteSpool) -> list[EmailMessage]:
    found = []
    for message in await spool.list(state=MessageState.QUEUED):
        if message.meta.get("dsn_for"):
            full = await spool.get(message.id, with_body=True)
            assert full is not None and full.raw is not None
            assert full.envelope.mail_from == ""
            parsed = email.message_from_bytes(full.raw, policy=email.policy.default)
            assert isinstance(parsed, EmailMessage)
            found.append(parsed)
    return found


async def test_matched_by_the_esps_message_id_without_esprelays(spool: SqliteSpool) -> None:
    id = await put(spool)
    await spool.put_events([bounce("e1", esp_message_id=f"esp-{id}")])
    assert await processor(spool).process_pending() == 1
    status = await spool.message_status(id)
    # The envelope's spelling of the address, whatever the ESP's.
    assert [r.status.recipient for r in status.recipients] == ["r@rcpt.example"]
    assert len(await dsns(spool)) == 1
    assert await spool.pending_events() == []


async def test_a_crash_between_apply_and_finish_changes_nothing(spool: SqliteSpool) -> None:
    id = await put(spool)
    await spool.put_events([bounce("e1", esprelay_id=id)])
    first = processor(spool)
    [stored] = await spool.pending_events()
    await first.apply(stored)  # ... and the process dies before finish_events
    again = processor(spool)
    assert await again.process_pending() == 1
    assert len(await dsns(spool)) == 1
    assert len((await spool.message_status(id)).timeline) == 1
    metrics = again.metrics
    assert metrics is not None
    assert (
        metrics.registry.get_sample_value("esprelay_events_dsns_total", {"kind": "failure"}) is None
    )


async def test_a_dsn_the_spool_cannot_queue_is_tried_again(
    spool: SqliteSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    id = await put(spool)
    await spool.put_events([bounce("e1", esprelay_id=id)])
    events = processor(spool)
    real = spool.put_parts

    async def full(*args: Any, **kw: Any) -> list[str]:
        raise SpoolError("disk full")

    monkeypatch.setattr(spool, "put_parts", full)
    with pytest.raises(SpoolError):
        await events.process_pending()
    assert len(await spool.pending_events()) == 1
    assert (await spool.message_status(id)).recipients[0].dsn_sent == ()
    monkeypatch.setattr(spool, "put_parts", real)
    assert await events.process_pending() == 1
    assert len(await dsns(spool)) == 1


async def test_never_a_bounce_of_a_bounce(spool: SqliteSpool) -> None:
    loop = await put(spool, mail_from="MAILER-DAEMON@relay.test")
    dsn_raw = (
        b"From: MAILER-DAEMON@elsewhere.example\r\nMessage-ID: <r@x>\r\n"
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n--b--\r\n"
    )
    report = await put(spool, raw=dsn_raw)
    ours = await put(spool, dsn_for="x")
    auto = await put(spool, raw=b"Auto-Submitted: auto-replied\r\n" + RAW)
    manual = await put(spool, raw=b"Auto-Submitted: no\r\n" + RAW)
    ids = (loop, report, ours, auto, manual)
    await spool.put_events([bounce(f"e{n}", esprelay_id=id) for n, id in enumerate(ids)])
    assert await processor(spool).process_pending() == 5
    [dsn] = await dsns(spool)
    _, status, _ = dsn.iter_parts()
    assert status.get_payload()[0]["X-Esprelay-Queue-ID"] == manual
    for id in ids:
        assert (await spool.message_status(id)).recipients[0].status.kind == "bounced"


def test_no_dsn_reason_without_headers() -> None:
    """A message spooled before headers were kept: only its envelope can tell."""
    from esprelay.models import SpooledMessage

    message = SpooledMessage(
        id="x", envelope=Envelope("a@b.example", ("c@d.example",)), size=1,
        state=MessageState.DELIVERED, attempts=1, created_at=0.0, next_attempt_at=0.0,
        provider="outbox",
    )  # fmt: skip
    assert no_dsn_reason(message, None, "MAILER-DAEMON@relay.test") is None


async def test_a_failed_message_is_returned_whole_for_ret_full(spool: SqliteSpool) -> None:
    id = await put(spool, deliver=False, dsn_ret="FULL")
    [leased] = await spool.lease("w", 1, 60)
    assert await spool.mark_failed(leased.id, owner="w", provider="outbox", error="gone")
    await spool.put_events([bounce("e1", esprelay_id=id, remote_mta="mx.rcpt.example")])
    await processor(spool, bounce_from="bounces@relay.test").process_pending()
    [dsn] = await dsns(spool)
    assert dsn["From"] == "Mail Delivery System <bounces@relay.test>"
    _, status, returned = dsn.iter_parts()
    assert returned.get_content_type() == "message/rfc822"
    assert b"the body" in dsn.as_bytes()
    [block] = status.get_payload()[1:]
    assert block["Remote-MTA"] == "dns; mx.rcpt.example"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"


async def test_temporary_bounces_and_bounce_mode(spool: SqliteSpool) -> None:
    id = await put(spool)
    await spool.put_events([bounce("soft", esprelay_id=id, smtp_status="4.2.2")])
    await processor(spool).process_pending()
    assert await dsns(spool) == []
    other = await put(spool)
    await spool.put_events([bounce("hard", esprelay_id=other)])
    await processor(spool, bounce_mode="off").process_pending()
    assert await dsns(spool) == []
    third = await put(spool)
    await spool.put_events([bounce("to-ops", esprelay_id=third)])
    await processor(spool, bounce_mode="address:ops@relay.test").process_pending()
    [dsn] = await dsns(spool)
    assert dsn["To"] == "ops@relay.test"


async def test_a_purged_message_and_the_inbox_purge(spool: SqliteSpool) -> None:
    id = await put(spool)
    assert await spool.delete(id)
    await spool.put_events([bounce("late", esprelay_id=id)])
    events = processor(spool, inbox_retention=lambda: 0.0)
    assert await events.process_pending() == 1
    assert await dsns(spool) == []
    await events._purge()  # keeps a day at least
    assert [r.stored for r in await spool.put_events([bounce("late", esprelay_id=id)])] == [False]
    events._next_purge = 0.0
    events._clock = type("Later", (), {"time": staticmethod(lambda: time.time() + 2 * 86400)})()  # type: ignore[assignment]
    await events._purge()
    [result] = await spool.put_events([bounce("late", esprelay_id=id)])
    assert result.stored  # forgotten: an ESP's very late retry is stored (and changes nothing)
