"""esprelay's id on the send, where each ESP echoes it in its events
(esprelay.providers.stamp): the request builders show the stamp and the rule when the
message's own control headers use the reserved key; end to end, a message sent through a
running relay reaches the fake ESP with its spool id, and the ESP's event built from
what the fake received is normalised (esprelay.events) back to that spool id, while the
spool finds the message by the id the ESP answered."""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from esprelay.events import mailgun as mailgun_events
from esprelay.events import postmark as postmark_events
from esprelay.events import sendgrid as sendgrid_events
from esprelay.events import ses as ses_events
from esprelay.events.fakes import CertServer, FakeMailgun, FakePostmark, FakeSendgrid, FakeSns
from esprelay.events.model import Event, WebhookRequest
from esprelay.events.settings import SourceContext
from esprelay.models import Envelope, OutboundMessage
from esprelay.providers import mailgun, postmark, resend, sendgrid, ses
from esprelay.providers.stamp import ID_KEY
from esprelay.spool.sqlite import SqliteSpool
from esprelay.testing.fakeesp import FakeESP, Recorded
from tests.providers import test_mailgun, test_postmark, test_sendgrid, test_ses
from tests.relayproc import RelayProcess
from tests.test_e2e_smtp import queued_id, send_raw

SENDER = "app@example.com"
RCPT = "ops@example.org"
TOP = b"From: App <app@example.com>\r\nTo: ops@example.org\r\nSubject: hello\r\n"
BODY = b"Content-Type: text/plain\r\n\r\nHello\r\n"
TOPIC = "arn:aws:sns:eu-west-1:123456789012:ses-events"


def message(*fields: bytes, id: str = "m1") -> OutboundMessage:
    return OutboundMessage(id, Envelope(SENDER, (RCPT,)), TOP + b"".join(fields) + BODY)


def dropped(where: str) -> str:
    return f"{where}: the message's own 'esprelay_id' was dropped (the key is esprelay's id)"


def test_every_esp_reads_the_key_esprelay_sends() -> None:
    assert ID_KEY == "esprelay_id"
    assert sendgrid_events.ID_ARG == ID_KEY
    assert mailgun_events.ID_VARIABLE == ID_KEY
    assert ses_events.ID_TAG == ID_KEY
    assert postmark_events.ID_KEY == ID_KEY
    assert resend.ID_TAG == ID_KEY


# -- SendGrid: a custom argument of every personalization -------------------------------


def sendgrid_built(msg: OutboundMessage) -> tuple[dict[str, Any], tuple[str, ...]]:
    provider = sendgrid.SendGridProvider(
        httpx.AsyncClient(), SecretStr(test_sendgrid.KEY), "https://api.sendgrid.com"
    )
    built = provider.build_request(msg)
    payload = json.loads(built.request.read())
    assert test_sendgrid.validate(payload) == []
    return payload, built.warnings


def smtpapi(value: dict[str, Any]) -> bytes:
    return b"X-SMTPAPI: " + json.dumps(value).encode() + b"\r\n"


def test_sendgrid_stamps_every_personalization() -> None:
    payload, warnings = sendgrid_built(message())
    assert payload["personalizations"] == [
        {"to": [{"email": RCPT}], "custom_args": {"esprelay_id": "m1"}}
    ]
    assert "custom_args" not in payload  # not message-level: a personalization's would win
    assert warnings == ()
    # Only blind recipients: a personalization each, each with the id.
    blind = OutboundMessage(
        "m2",
        Envelope(SENDER, ("a@example.org", "b@example.org")),
        b"From: app@example.com\r\nTo: undisclosed-recipients:;\r\nSubject: x\r\n\r\nhi\r\n",
    )
    payload, _ = sendgrid_built(blind)
    assert [p["custom_args"] for p in payload["personalizations"]] == [{"esprelay_id": "m2"}] * 2


def test_sendgrid_unique_args_keep_theirs_but_the_reserved_key() -> None:
    msg = message(smtpapi({"unique_args": {"order": 7, "esprelay_id": "theirs", "x": "y"}}))
    payload, warnings = sendgrid_built(msg)
    assert payload["personalizations"][0]["custom_args"] == {
        "order": "7",
        "x": "y",
        "esprelay_id": "m1",
    }
    assert warnings == (dropped("X-SMTPAPI unique_args"),)


def test_sendgrid_leaves_the_id_out_rather_than_exceed_10000_bytes() -> None:
    # {"k":"..."}: 9,998 bytes of the message's own; with the id, over 10,000.
    own = {"k": "v" * 9990}
    payload, warnings = sendgrid_built(message(smtpapi({"unique_args": own})))
    assert payload["personalizations"][0]["custom_args"] == own
    assert warnings == (
        "esprelay's id was not sent (custom_args would exceed 10000 bytes): the ESP's events"
        " match by its message id",
    )


def test_no_id_no_stamp() -> None:
    """A message with no spool id (the checks at the end of DATA) gets none."""
    payload, _ = sendgrid_built(message(id=""))
    assert "custom_args" not in payload["personalizations"][0]


# -- Mailgun: the user variable v:esprelay_id ------------------------------------------------


def mailgun_options(msg: OutboundMessage) -> tuple[list[tuple[str, str]], tuple[str, ...]]:
    provider = test_mailgun.provider(httpx.AsyncClient(), "https://api.mailgun.net")
    built = provider.build_request(msg)
    recorded = Recorded("POST", "/", {}, dict(built.request.headers), built.request.read())
    fields = test_mailgun.form_fields(recorded)
    return [(n, v.decode()) for n, _, v in fields if n not in ("to", "message")], built.warnings


def test_mailgun_sends_the_id_as_a_user_variable() -> None:
    options, warnings = mailgun_options(message())
    assert options == [("v:esprelay_id", "m1")]
    assert warnings == ()


def test_mailgun_variables_keep_theirs_but_the_reserved_key() -> None:
    variables = b'X-Mailgun-Variables: {"esprelay_id": "theirs", "plan": "pro"}\r\n'
    options, warnings = mailgun_options(message(b"X-Mailgun-Tag: t\r\n", variables))
    assert options == [("o:tag", "t"), ("v:plan", "pro"), ("v:esprelay_id", "m1")]
    assert warnings == (dropped("X-Mailgun-Variables"),)


def test_mailgun_leaves_the_id_out_rather_than_exceed_16_kb() -> None:
    own = (("v:big", "x" * (mailgun.MAX_SEND_OPTIONS - 5 - 10)),)
    assert mailgun.stamp(own, "m1") == (
        own,
        (
            "esprelay's id was not sent (the send options would exceed 16 KB): the ESP's"
            " events match by its message id",
        ),
    )
    assert mailgun.stamp((("v:small", "x"),), "m1")[0][-1] == ("v:esprelay_id", "m1")


# -- SES: the message tag esprelay_id --------------------------------------------------------


def ses_payload(msg: OutboundMessage) -> tuple[dict[str, Any], tuple[str, ...]]:
    built = test_ses.provider(httpx.AsyncClient()).build_request(msg)
    return json.loads(built.request.read()), built.warnings


def test_ses_sends_the_id_as_a_message_tag_with_raw_content() -> None:
    payload, warnings = ses_payload(message())
    assert "Raw" in payload["Content"]
    assert payload["EmailTags"] == [{"Name": "esprelay_id", "Value": "m1"}]
    assert warnings == ()


def test_ses_message_tags_keep_theirs_but_the_reserved_key() -> None:
    tags = b"X-SES-MESSAGE-TAGS: campaign=spring, esprelay_id=theirs, tier=gold\r\n"
    payload, warnings = ses_payload(message(tags))
    assert payload["EmailTags"] == [
        {"Name": "campaign", "Value": "spring"},
        {"Name": "tier", "Value": "gold"},
        {"Name": "esprelay_id", "Value": "m1"},
    ]
    assert warnings == (dropped("X-SES-MESSAGE-TAGS"),)


def test_ses_leaves_out_an_id_that_is_no_tag_value() -> None:
    """Spool ids are hex digits (and "-N" for a part): always a tag value; anything
    else would make SES refuse the whole request."""
    assert ses.stamp((("a", "1"),), "not/a.tag") == (
        (("a", "1"),),
        (
            "esprelay's id was not sent (not an SES tag value): the ESP's events match by"
            " its message id",
        ),
    )
    assert ses.stamp((), "19a1b2c3d4e0123456789-1") == (
        (("esprelay_id", "19a1b2c3d4e0123456789-1"),),
        (),
    )


# -- Postmark: the metadata field esprelay_id ----------------------------------------------


def postmark_payload(msg: OutboundMessage) -> tuple[dict[str, Any], tuple[str, ...]]:
    provider = postmark.PostmarkProvider(
        httpx.AsyncClient(), SecretStr(test_postmark.TOKEN), "https://api.postmarkapp.com"
    )
    built = provider.build_request(msg)
    payload = json.loads(built.request.read())
    assert test_postmark.validate(payload, stream=None) == []
    return payload, built.warnings


def test_postmark_sends_the_id_as_metadata() -> None:
    payload, warnings = postmark_payload(message())
    assert payload["Metadata"] == {"esprelay_id": "m1"}
    assert warnings == ()


def test_postmark_metadata_keep_theirs_but_the_reserved_key_in_any_case() -> None:
    """Postmark refuses "the same key with case differences": theirs in another case
    goes too."""
    fields = (b"X-PM-Metadata-color: blue\r\n", b"X-PM-Metadata-ESPRELAY_ID: theirs\r\n")
    payload, warnings = postmark_payload(message(*fields))
    assert payload["Metadata"] == {"color": "blue", "esprelay_id": "m1"}
    assert warnings == (dropped("X-PM-Metadata-esprelay_id"),)


def test_postmark_leaves_the_id_out_rather_than_add_an_eleventh_field() -> None:
    fields = [b"X-PM-Metadata-k%d: v\r\n" % i for i in range(postmark.MAX_METADATA_FIELDS)]
    payload, warnings = postmark_payload(message(*fields))
    assert payload["Metadata"] == {f"k{i}": "v" for i in range(10)}
    assert warnings == (
        "esprelay's id was not sent (the message has 10 metadata fields, Postmark's most):"
        " the ESP's events match by its message id",
    )
    # Nine of theirs and theirs under the reserved key: room for ours.
    fields[9] = b"X-PM-Metadata-esprelay_id: theirs\r\n"
    payload, warnings = postmark_payload(message(*fields))
    assert payload["Metadata"] == {**{f"k{i}": "v" for i in range(9)}, "esprelay_id": "m1"}


# -- end to end: SMTP in, the id on the wire, the ESP's event back to the spool id -----------


@pytest.fixture
async def context() -> AsyncIterator[SourceContext]:
    async with httpx.AsyncClient() as client:
        yield SourceContext(tolerance=300, now=time.time, client=client, overrides={})


def sent_through(relay: RelayProcess, raw: bytes, provider: str) -> tuple[str, str]:
    """Send ``raw``; its spool id and the ESP's id the relay stored for it."""
    spool_id = queued_id(send_raw(relay, SENDER, [RCPT], raw))
    relay.wait_for_log(rf"delivered id={spool_id} provider={provider} attempt=1")
    found = re.search(rf"delivered id={spool_id} .* provider_id=(\S+)", relay.log)
    assert found
    return spool_id, found.group(1)


async def spool_finds(relay: RelayProcess, provider: str, event: Event) -> str | None:
    """The spool id of the message the ESP accepted as the event's ESP message id."""
    relay.stop()
    spool = SqliteSpool(Path(relay.env["ESPRELAY_SPOOL_URL"].removeprefix("sqlite:///")))
    await spool.open()
    try:
        assert event.esp_message_id is not None
        found = await spool.find_by_provider_message_id(provider, event.esp_message_id)
    finally:
        await spool.close()
    return None if found is None else found.id


async def test_sendgrid_end_to_end(
    relay_factory: type[RelayProcess], context: SourceContext
) -> None:
    raw = TOP + smtpapi({"unique_args": {"esprelay_id": "spoofed", "order": "7"}}) + BODY
    with FakeESP(test_sendgrid.SendGridAPI()) as esp:
        relay = relay_factory(test_sendgrid.relay_env(esp)).start()
        spool_id, esp_id = sent_through(relay, raw, "sendgrid")
        (request,) = esp.requests
    args = request.json()["personalizations"][0]["custom_args"]
    assert args == {"order": "7", "esprelay_id": spool_id}
    # SendGrid's bounce: every custom argument as a key of the event, sg_message_id the
    # X-Message-Id of the send and a filter suffix.
    fake = FakeSendgrid()
    source = sendgrid_events.SendgridEvents(
        "sendgrid", sendgrid_events.SendgridWebhook(webhook_public_key=fake.public_key), context
    )
    body, headers = fake.request(
        [fake.event("bounce", RCPT, message_id=esp_id, reason="550 5.1.1 unknown", **args)]
    )
    [event] = await source.receive(WebhookRequest("POST", headers, body, "127.0.0.1"))
    assert (event.kind, event.esprelay_id, event.esp_message_id) == ("bounced", spool_id, esp_id)
    assert await spool_finds(relay, "sendgrid", event) == spool_id
    assert "the message's own 'esprelay_id' was dropped" in relay.log


async def test_mailgun_end_to_end(
    relay_factory: type[RelayProcess], context: SourceContext
) -> None:
    raw = TOP + b'X-Mailgun-Variables: {"esprelay_id": "spoofed", "plan": "pro"}\r\n' + BODY
    with FakeESP(test_mailgun.mailgun) as esp:
        relay = relay_factory(test_mailgun.mailgun_env(esp.url)).start()
        spool_id, esp_id = sent_through(relay, raw, "mailgun")
        (request,) = esp.requests
    variables = {
        name.removeprefix("v:"): value.decode()
        for name, _, value in test_mailgun.form_fields(request)
        if name.startswith("v:")
    }
    assert variables == {"plan": "pro", "esprelay_id": spool_id}
    assert not esp_id.startswith("<")  # stored as the events carry it
    fake = FakeMailgun()
    source = mailgun_events.MailgunEvents(
        "mailgun", mailgun_events.MailgunWebhook(webhook_signing_key=fake.signing_key), context
    )
    data = fake.event("failed", RCPT, message_id=esp_id, **{"user-variables": variables})
    data.update(severity="permanent", reason="bounce")
    body, headers = fake.request(data)
    [event] = await source.receive(WebhookRequest("POST", headers, body, "127.0.0.1"))
    assert (event.kind, event.esprelay_id, event.esp_message_id) == ("bounced", spool_id, esp_id)
    assert await spool_finds(relay, "mailgun", event) == spool_id


async def test_ses_end_to_end(relay_factory: type[RelayProcess], tmp_path: Path) -> None:
    raw = TOP + b"X-SES-MESSAGE-TAGS: campaign=spring, esprelay_id=spoofed\r\n" + BODY
    with FakeESP(test_ses.fake_ses) as esp:
        env = test_ses.ses_env(esp.url, test_ses.FAKE_KEY, test_ses.FAKE_SECRET, tmp_path)
        relay = relay_factory(env).start()
        spool_id, esp_id = sent_through(relay, raw, "ses")
        (request,) = esp.requests
    tags = request.json()["EmailTags"]
    assert tags == [
        {"Name": "campaign", "Value": "spring"},
        {"Name": "esprelay_id", "Value": spool_id},
    ]
    # The bounce a configuration set publishes through SNS: mail.tags are the EmailTags
    # of the send, mail.messageId its MessageId; signed, and verified with the
    # certificate fetched from a loopback HTTPS server in the role of SNS's.
    sns = FakeSns(TOPIC)
    cert = await CertServer(sns.certificate_pem).start()
    try:
        async with cert.client() as client:
            context = SourceContext(
                tolerance=300,
                now=time.time,
                client=client,
                overrides={"sns_url_allowed": cert.url_allowed},
            )
            source = ses_events.SesEvents(
                "ses", ses_events.SesWebhook(sns_topic_arns=(TOPIC,)), context
            )
            bounce = sns.bounce(RCPT, message_id=esp_id)
            bounce["mail"]["tags"] = {t["Name"]: [t["Value"]] for t in tags}
            body, headers = sns.notification(bounce, cert_url=cert.cert_url)
            [event] = await source.receive(WebhookRequest("POST", headers, body, "127.0.0.1"))
    finally:
        await cert.close()
    assert (event.kind, event.esprelay_id, event.esp_message_id) == ("bounced", spool_id, esp_id)
    # A notification without tags (an identity's bounce topic): the MessageId finds it.
    assert await spool_finds(relay, "ses", event) == spool_id


async def test_postmark_end_to_end(
    relay_factory: type[RelayProcess], context: SourceContext
) -> None:
    raw = TOP + b"X-PM-Metadata-color: blue\r\nX-PM-Metadata-esprelay_id: spoofed\r\n" + BODY
    with FakeESP(test_postmark.PostmarkAPI()) as esp:
        relay = relay_factory(test_postmark.relay_env(esp)).start()
        spool_id, esp_id = sent_through(relay, raw, "postmark")
        (request,) = esp.requests
    metadata = request.json()["Metadata"]
    assert metadata == {"color": "blue", "esprelay_id": spool_id}
    fake = FakePostmark()
    source = postmark_events.PostmarkEvents(
        "postmark",
        postmark_events.PostmarkWebhook(
            webhook_user=fake.user, webhook_password=SecretStr(fake.password)
        ),
        context,
    )
    record = fake.bounce(RCPT, message_id=esp_id)
    record["Metadata"] = metadata
    body, headers = fake.request(record)
    [event] = await source.receive(WebhookRequest("POST", headers, body, "127.0.0.1"))
    assert (event.kind, event.esprelay_id, event.esp_message_id) == ("bounced", spool_id, esp_id)
    assert await spool_finds(relay, "postmark", event) == spool_id
