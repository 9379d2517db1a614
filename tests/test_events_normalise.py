"""Each ESP's events normalised: kinds, statuses, ids (the sources called directly)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from esprelay.events.fakes import FakeMailgun, FakePostmark, FakeSendgrid
from esprelay.events.mailgun import MailgunEvents, MailgunWebhook
from esprelay.events.model import Event, Rejected, WebhookRequest
from esprelay.events.postmark import PostmarkEvents, PostmarkWebhook
from esprelay.events.sendgrid import SendgridEvents, SendgridWebhook
from esprelay.events.ses import SesEvents, SesWebhook
from esprelay.events.settings import SourceContext

TOPIC = "arn:aws:sns:eu-west-1:123456789012:ses-events"


@pytest.fixture
async def context() -> AsyncIterator[SourceContext]:
    async with httpx.AsyncClient() as client:
        yield SourceContext(tolerance=300, now=time.time, client=client, overrides={})


async def _sendgrid(context: SourceContext, **item: Any) -> Event:
    fake = FakeSendgrid()
    source = SendgridEvents(
        "sendgrid", SendgridWebhook(webhook_public_key=fake.public_key), context
    )
    body, headers = fake.request([fake.event(item.pop("event"), "r@example.net", **item)])
    [event] = await source.receive(WebhookRequest("POST", headers, body, "127.0.0.1"))
    return event


@pytest.mark.parametrize(
    ("item", "kind", "status", "diagnostic"),
    [
        (
            {"event": "deferred", "response": "451 4.7.1 greylisted", "attempt": "2"},
            "deferred",
            "4.7.1",
            "451 4.7.1 greylisted",
        ),
        (
            {"event": "dropped", "reason": "Bounced Address"},
            "dropped",
            None,
            "Bounced Address",
        ),
        ({"event": "spamreport"}, "complained", None, None),
        (
            {"event": "bounce", "type": "blocked", "reason": "550 blocked"},
            "bounced",
            "5.0.0",
            "550 blocked",
        ),
        ({"event": "group_resubscribe"}, "other", None, None),
    ],
)
async def test_sendgrid_kinds(
    context: SourceContext,
    item: dict[str, Any],
    kind: str,
    status: str | None,
    diagnostic: str | None,
) -> None:
    event = await _sendgrid(context, **item)
    assert (event.kind, event.smtp_status, event.diagnostic) == (kind, status, diagnostic)


async def test_mailgun_suppressed_address_is_dropped(context: SourceContext) -> None:
    fake = FakeMailgun()
    source = MailgunEvents(
        "mailgun",
        MailgunWebhook(webhook_signing_key=fake.signing_key),
        context,  # type: ignore[arg-type]
    )
    data = fake.event("failed", "r@example.net", severity="permanent", reason="suppress-bounce")
    body, headers = fake.request(data)
    [event] = await source.receive(WebhookRequest("POST", headers, body, None))
    assert (event.kind, event.smtp_status) == ("dropped", None)


def _ses_source(context: SourceContext) -> SesEvents:
    return SesEvents("ses", SesWebhook(sns_topic_arns=(TOPIC,)), context)


def _notification(ses: dict[str, Any]) -> dict[str, Any]:
    return {"Type": "Notification", "MessageId": "sns-1", "Message": orjson.dumps(ses).decode()}


def test_ses_delivery_complaint_delay_reject(context: SourceContext) -> None:
    source = _ses_source(context)
    mail = {
        "messageId": "ses-1",
        "timestamp": "2026-12-05T10:00:00.000Z",
        "destination": ["a@example.net", "b@example.net"],
        "headers": [{"name": "X-Esprelay-Id", "value": "e-1"}],
    }
    delivery = source._events(
        _notification(
            {
                "eventType": "Delivery",
                "mail": mail,
                "delivery": {
                    "timestamp": "2026-12-05T10:00:02.000Z",
                    "recipients": ["a@example.net"],
                    "smtpResponse": "250 2.6.0 Message received",
                    "remoteMtaIp": "192.0.2.1",
                },
            }
        )
    )
    assert [(e.kind, e.recipient, e.smtp_status, e.esprelay_id) for e in delivery] == [
        ("delivered", "a@example.net", "2.6.0", "e-1")
    ]
    assert delivery[0].provider_event_id == "sns-1:a@example.net"
    assert delivery[0].at == 1_796_464_802.0
    complaint = source._events(
        _notification(
            {
                "notificationType": "Complaint",
                "mail": mail,
                "complaint": {
                    "timestamp": "2026-12-05T11:00:00.000Z",
                    "complainedRecipients": [{"emailAddress": "b@example.net"}],
                },
            }
        )
    )
    assert [(e.kind, e.recipient) for e in complaint] == [("complained", "b@example.net")]
    delay = source._events(
        _notification(
            {
                "eventType": "DeliveryDelay",
                "mail": mail,
                "deliveryDelay": {
                    "timestamp": "2026-12-05T10:30:00.000Z",
                    "delayType": "MailboxFull",
                    "delayedRecipients": [
                        {
                            "emailAddress": "a@example.net",
                            "status": "4.2.2",
                            "diagnosticCode": "452 full",
                        }
                    ],
                },
            }
        )
    )
    assert [(e.kind, e.smtp_status, e.diagnostic) for e in delay] == [
        ("deferred", "4.2.2", "452 full")
    ]
    reject = source._events(
        _notification({"eventType": "Reject", "mail": mail, "reject": {"reason": "Bad content"}})
    )
    assert [(e.kind, e.recipient, e.diagnostic) for e in reject] == [
        ("dropped", "a@example.net", "Bad content"),
        ("dropped", "b@example.net", "Bad content"),
    ]
    with pytest.raises(Rejected) as info:
        source._events(_notification({"eventType": "Bounce", "mail": mail, "bounce": {}}))
    assert info.value.status == 400


async def test_postmark_records(context: SourceContext) -> None:
    fake = FakePostmark()
    source = PostmarkEvents(
        "postmark",
        PostmarkWebhook(webhook_user=fake.user, webhook_password=fake.password),  # type: ignore[arg-type]
        context,
    )

    async def one(record: dict[str, Any]) -> Event:
        body, headers = fake.request(record)
        [event] = await source.receive(WebhookRequest("POST", headers, body, "127.0.0.1"))
        return event

    soft = await one(fake.bounce("r@example.net", bounce_type="SoftBounce"))
    assert (soft.kind, soft.smtp_status) == ("deferred", "5.1.1")  # the MTA's own words
    delivery = await one(
        {
            "RecordType": "Delivery",
            "MessageID": "pm-1",
            "Recipient": "r@example.net",
            "DeliveredAt": "2026-12-05T10:00:00.1234567Z",
            "Details": "Test delivery webhook details",
            "Metadata": {"esprelay_id": "e-2"},
        }
    )
    assert (delivery.kind, delivery.smtp_status, delivery.esprelay_id) == (
        "delivered",
        "2.0.0",
        "e-2",
    )
    assert delivery.at == pytest.approx(1_796_464_800.123456)
    assert delivery.provider_event_id.startswith("Delivery:pm-1:r@example.net:")
    with pytest.raises(Rejected):
        await one({"RecordType": "Inbound"})
