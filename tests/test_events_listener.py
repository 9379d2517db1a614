"""ESP events through the real listener over loopback HTTP: each fake ESP signs its
events the way the ESP does; genuine ones are stored once, the rest refused."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from esprelay.config import Settings
from esprelay.errors import ConfigError
from esprelay.events.fakes import CertServer, FakeMailgun, FakePostmark, FakeSendgrid, FakeSns
from esprelay.events.listener import EventsListener
from esprelay.events.service import start_events
from esprelay.metrics import RelayMetrics
from esprelay.models import Envelope
from esprelay.routing import parse_routing
from esprelay.spool.sqlite import SqliteSpool
from tests.fakeclock import FakeClock

ROUTES: dict[str, Any] = {
    "providers": {
        "sendgrid": {"kind": "sendgrid", "api_key": "SG.x", "api_url": "http://127.0.0.1:9"},
        "mailgun": {"kind": "mailgun", "api_key": "k", "domain": "mg.example.com"},
        "ses": {"kind": "ses", "region": "eu-west-1"},
        "postmark": {"kind": "postmark", "server_token": "t"},
        "brand-a": {"kind": "mailgun", "api_key": "k", "domain": "mg.brand-a.example"},
        "outbox": {"kind": "outbox"},
    }
}


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.sendgrid = FakeSendgrid()
        self.mailgun = FakeMailgun()
        self.brand_a = FakeMailgun()
        self.sns = FakeSns()
        self.postmark = FakePostmark()
        self.certs = CertServer(self.sns.certificate_pem)
        self.metrics = RelayMetrics()
        self.spool: SqliteSpool | None = None
        self.listener: EventsListener | None = None
        self.http = httpx.AsyncClient(timeout=10.0)
        self.fetcher: httpx.AsyncClient | None = None

    def environ(self) -> dict[str, str]:
        return {
            "ESPRELAY_SENDGRID_WEBHOOK_PUBLIC_KEY": self.sendgrid.public_key,
            "ESPRELAY_MAILGUN_WEBHOOK_SIGNING_KEY": self.mailgun.signing_key,
            "ESPRELAY_BRAND_A_WEBHOOK_SIGNING_KEY": self.brand_a.signing_key,
            "ESPRELAY_SES_SNS_TOPIC_ARNS": self.sns.topic_arn,
            "ESPRELAY_POSTMARK_WEBHOOK_USER": self.postmark.user,
            "ESPRELAY_POSTMARK_WEBHOOK_PASSWORD": self.postmark.password,
        }

    async def start(
        self, environ: dict[str, str] | None = None, *, clock: FakeClock | None = None, **kw: Any
    ) -> Harness:
        if self.certs.port == 0:
            await self.certs.start()
            self.fetcher = self.certs.client()
        self.spool = SqliteSpool(self.tmp_path / "spool.db", exclusive=True)
        await self.spool.open()
        settings = Settings(_env_file=None, events_port=0, **kw)  # type: ignore[call-arg]
        settings._environ = self.environ() if environ is None else environ
        routing = parse_routing(ROUTES, settings, settings.environ)
        extra: dict[str, Any] = {} if clock is None else {"clock": clock}
        self.listener = await start_events(
            settings,
            routing=routing,
            spool=self.spool,
            metrics=self.metrics,
            client=self.fetcher,
            overrides={"sns_url_allowed": self.certs.url_allowed},
            **extra,
        )
        return self

    async def stop(self) -> None:
        if self.listener is not None:
            await self.listener.close()
            self.listener = None
        if self.spool is not None:
            await self.spool.close()
            self.spool = None

    async def close(self) -> None:
        await self.stop()
        await self.http.aclose()
        if self.fetcher is not None:
            await self.fetcher.aclose()
        await self.certs.close()

    async def post(self, name: str, request: tuple[bytes, dict[str, str]]) -> httpx.Response:
        assert self.listener is not None
        body, headers = request
        return await self.http.post(
            f"http://127.0.0.1:{self.listener.port}/webhooks/{name}",
            content=body,
            headers=headers,
        )

    async def stored(self) -> list[Any]:
        assert self.spool is not None
        return await self.spool.pending_events(1000)

    def count(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name + "_total", labels) or 0.0


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path)
    try:
        yield await h.start()
    finally:
        await h.close()


# region SendGrid


async def test_sendgrid_signed_batch_is_stored_normalised(harness: Harness) -> None:
    """A signed batch: every event stored, normalised, with esprelay's id and SendGrid's."""
    bounce = harness.sendgrid.event(
        "bounce",
        "nobody@example.net",
        esprelay_id="abc123",
        status="5.1.1",
        reason="550 5.1.1 The email account does not exist",
        type="bounce",
    )
    delivered = harness.sendgrid.event("delivered", "ok@example.net", response="250 OK")
    response = await harness.post("sendgrid", harness.sendgrid.request([bounce, delivered]))
    assert response.status_code == 200, response.text
    assert response.json() == {"received": 2, "stored": 2, "duplicates": 0}
    stored = await harness.stored()
    assert [s.event.kind for s in stored] == ["bounced", "delivered"]
    event = stored[0].event
    assert event.provider == "sendgrid"
    assert event.provider_event_id == bounce["sg_event_id"]
    assert event.recipient == "nobody@example.net"
    assert event.smtp_status == "5.1.1"
    assert event.diagnostic == "550 5.1.1 The email account does not exist"
    assert event.esp_message_id == "Lry_Mn4iQQ2wvqZkGdaUuw"
    assert event.esprelay_id == "abc123"
    assert event.raw == bounce
    assert stored[1].event.smtp_status == "2.0.0"
    assert harness.count("esprelay_events_received", provider="sendgrid", kind="bounced") == 1


async def test_sendgrid_retry_is_stored_once(harness: Harness) -> None:
    """SendGrid sends a batch again (a retry): nothing changes."""
    events = [harness.sendgrid.event("delivered", f"r{i}@example.net") for i in range(3)]
    first = await harness.post("sendgrid", harness.sendgrid.request(events))
    again = await harness.post("sendgrid", harness.sendgrid.request(events))
    assert first.json()["stored"] == 3
    assert again.status_code == 200
    assert again.json() == {"received": 3, "stored": 0, "duplicates": 3}
    assert len(await harness.stored()) == 3
    assert harness.count("esprelay_events_duplicates", provider="sendgrid") == 3


@pytest.mark.parametrize(
    ("mangle", "status", "reason"),
    [
        pytest.param(lambda b, h: (b + b" ", h), 403, "signature", id="body-changed"),
        pytest.param(
            lambda b, h: (
                b,
                {**h, "X-Twilio-Email-Event-Webhook-Timestamp": str(int(time.time()) + 1)},
            ),
            403,
            "signature",
            id="timestamp-changed",
        ),
        pytest.param(
            lambda b, h: (b, {k: v for k, v in h.items() if "Signature" not in k}),
            401,
            "signature",
            id="unsigned",
        ),
        pytest.param(
            lambda b, h: (b, {**h, "X-Twilio-Email-Event-Webhook-Signature": "!!"}),
            403,
            "signature",
            id="not-base64",
        ),
    ],
)
async def test_sendgrid_forged_requests_store_nothing(
    harness: Harness, mangle: Any, status: int, reason: str
) -> None:
    """A body or header changed after signing, or no signature: refused, nothing stored."""
    body, headers = harness.sendgrid.request([harness.sendgrid.event("bounce", "x@example.net")])
    response = await harness.post("sendgrid", mangle(body, headers))
    assert response.status_code == status
    assert response.json() == {"error": reason}
    assert await harness.stored() == []
    assert harness.count("esprelay_events_rejected", provider="sendgrid", reason=reason) == 1


async def test_sendgrid_signed_by_another_key_is_refused(harness: Harness) -> None:
    """A valid signature of another key (anyone can make one) is no signature of SendGrid's."""
    other = FakeSendgrid()
    response = await harness.post(
        "sendgrid", other.request([other.event("bounce", "x@example.net")])
    )
    assert response.status_code == 403
    assert await harness.stored() == []


async def test_sendgrid_stale_and_future_timestamps_are_refused(harness: Harness) -> None:
    """A request signed outside the tolerance (a replay, later) is refused as stale."""
    events = [harness.sendgrid.event("bounce", "x@example.net")]
    for offset in (-301, 301):
        request = harness.sendgrid.request(events, timestamp=time.time() + offset)
        response = await harness.post("sendgrid", request)
        assert response.status_code == 403
        assert response.json() == {"error": "stale"}
    assert await harness.stored() == []


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b'{"event": "bounce"}', id="not-an-array"),
        pytest.param(b'[{"event": "bounce"}]', id="no-event-id"),
        pytest.param(b"[1]", id="not-an-object"),
    ],
)
async def test_sendgrid_malformed_but_signed_is_refused(harness: Harness, body: bytes) -> None:
    """Signed but not SendGrid's format: 400, nothing stored (not even the good events)."""
    response = await harness.post("sendgrid", harness.sendgrid.request(body))
    assert response.status_code == 400
    assert response.json() == {"error": "malformed"}
    assert await harness.stored() == []


# endregion
# region Mailgun


def _mailgun_failure(fake: FakeMailgun, **kw: Any) -> dict[str, Any]:
    return fake.event(
        "failed",
        "nobody@example.net",
        severity="permanent",
        reason="bounce",
        **{
            "delivery-status": {
                "code": 550,
                "message": "5.1.1 The email account that you tried to reach does not exist",
                "mx-host": "mx.example.net",
            }
        },
        **kw,
    )


async def test_mailgun_signed_event_is_stored_normalised(harness: Harness) -> None:
    data = _mailgun_failure(harness.mailgun, esprelay_id="m-1")
    response = await harness.post("mailgun", harness.mailgun.request(data))
    assert response.status_code == 200, response.text
    [stored] = await harness.stored()
    event = stored.event
    assert (event.kind, event.recipient, event.smtp_status) == (
        "bounced",
        "nobody@example.net",
        "5.1.1",
    )
    assert event.provider_event_id == data["id"]
    assert event.esprelay_id == "m-1"
    assert event.esp_message_id == "20240101120000.1.ABCDEF@mg.example.com"
    assert event.remote_mta == "mx.example.net"
    assert event.diagnostic is not None and event.diagnostic.startswith("550 5.1.1")


async def test_mailgun_temporary_failure_is_deferred(harness: Harness) -> None:
    data = harness.mailgun.event(
        "failed",
        "busy@example.net",
        severity="temporary",
        **{"delivery-status": {"code": 421, "message": "try again later"}},
    )
    assert (await harness.post("mailgun", harness.mailgun.request(data))).status_code == 200
    [stored] = await harness.stored()
    assert (stored.event.kind, stored.event.smtp_status) == ("deferred", "4.0.0")


async def test_mailgun_replayed_token_is_refused(harness: Harness) -> None:
    """The same signed request twice: the second is a replay (its token was seen)."""
    request = harness.mailgun.request(_mailgun_failure(harness.mailgun))
    assert (await harness.post("mailgun", request)).status_code == 200
    replay = await harness.post("mailgun", request)
    assert replay.status_code == 403
    assert replay.json() == {"error": "replayed"}
    assert len(await harness.stored()) == 1


async def test_mailgun_retry_with_a_new_token_is_stored_once(harness: Harness) -> None:
    """Mailgun's own retry (new token, same event id): acknowledged, stored once."""
    data = _mailgun_failure(harness.mailgun)
    assert (await harness.post("mailgun", harness.mailgun.request(data))).status_code == 200
    again = await harness.post("mailgun", harness.mailgun.request(data))
    assert again.json() == {"received": 1, "stored": 0, "duplicates": 1}
    assert len(await harness.stored()) == 1


async def test_mailgun_forged_and_stale_requests_are_refused(harness: Harness) -> None:
    data = _mailgun_failure(harness.mailgun)
    forged = await harness.post("mailgun", harness.mailgun.request(data, key="guessed"))
    stale = await harness.post(
        "mailgun", harness.mailgun.request(data, timestamp=time.time() - 3600)
    )
    unsigned = await harness.post("mailgun", (b'{"event-data": {}}', {}))
    assert (forged.status_code, forged.json()) == (403, {"error": "signature"})
    assert (stale.status_code, stale.json()) == (403, {"error": "stale"})
    assert unsigned.status_code == 401
    assert await harness.stored() == []


async def test_named_provider_uses_its_own_key(harness: Harness) -> None:
    """brand-a (kind mailgun) has its own path and key; the other account's key fails."""
    data = _mailgun_failure(harness.brand_a)
    good = await harness.post("brand-a", harness.brand_a.request(data))
    assert good.status_code == 200
    wrong_key = await harness.post("brand-a", harness.mailgun.request(data))
    assert wrong_key.status_code == 403
    wrong_path = await harness.post("mailgun", harness.brand_a.request(data))
    assert wrong_path.status_code == 403
    [stored] = await harness.stored()
    assert stored.event.provider == "brand-a"


# endregion
# region SES through SNS


@pytest.mark.parametrize("version", ["1", "2"])
async def test_ses_notification_is_verified_and_stored(harness: Harness, version: str) -> None:
    """SignatureVersion 1 (SHA1) and 2 (SHA256); the certificate fetched once, then kept."""
    for recipient in ("a@example.net", "b@example.net"):
        request = harness.sns.notification(
            harness.sns.bounce(recipient, esprelay_id="s-1"),
            cert_url=harness.certs.cert_url,
            version=version,
        )
        response = await harness.post("ses", request)
        assert response.status_code == 200, response.text
    assert harness.certs.certificate_fetches == 1
    stored = await harness.stored()
    assert [s.event.recipient for s in stored] == ["a@example.net", "b@example.net"]
    event = stored[0].event
    assert (event.kind, event.smtp_status, event.esprelay_id) == ("bounced", "5.1.1", "s-1")
    assert event.esp_message_id == "0102018c-ses-message-id-000000"
    assert event.diagnostic == "smtp; 550 5.1.1 user unknown"
    assert event.remote_mta == "192.0.2.25"


async def test_ses_sns_retry_is_stored_once(harness: Harness) -> None:
    request = harness.sns.notification(
        harness.sns.bounce("a@example.net"), cert_url=harness.certs.cert_url
    )
    assert (await harness.post("ses", request)).json()["stored"] == 1
    assert (await harness.post("ses", request)).json()["duplicates"] == 1
    assert len(await harness.stored()) == 1


async def test_ses_forged_notifications_are_refused(harness: Harness) -> None:
    """Another topic, another signer, a changed message, a certificate elsewhere: refused,
    and for an unknown topic or a foreign certificate URL nothing is even fetched."""
    bounce = harness.sns.bounce("a@example.net")
    cert_url = harness.certs.cert_url
    other_topic = harness.sns.notification(
        bounce, cert_url=cert_url, topic_arn="arn:aws:sns:eu-west-1:999999999999:evil"
    )
    response = await harness.post("ses", other_topic)
    assert (response.status_code, response.json()) == (403, {"error": "topic"})
    elsewhere = harness.sns.notification(bounce, cert_url="https://sns.evil.example/cert.pem")
    response = await harness.post("ses", elsewhere)
    assert (response.status_code, response.json()) == (403, {"error": "signature"})
    assert harness.certs.certificate_fetches == 0
    impostor = FakeSns(harness.sns.topic_arn)  # its own key, the real certificate URL
    response = await harness.post("ses", impostor.notification(bounce, cert_url=cert_url))
    assert response.status_code == 403
    body, headers = harness.sns.notification(bounce, cert_url=cert_url)
    tampered = body.replace(b"a@example.net", b"z@example.net")
    response = await harness.post("ses", (tampered, headers))
    assert (response.status_code, response.json()) == (403, {"error": "signature"})
    assert await harness.stored() == []


async def test_ses_subscription_is_confirmed_only_for_configured_topics(
    harness: Harness,
) -> None:
    certs = harness.certs
    other = harness.sns.subscription_confirmation(
        subscribe_url=certs.subscribe_url,
        cert_url=certs.cert_url,
        topic_arn="arn:aws:sns:eu-west-1:999999999999:evil",
    )
    assert (await harness.post("ses", other)).status_code == 403
    assert certs.confirmations == 0
    ours = harness.sns.subscription_confirmation(
        subscribe_url=certs.subscribe_url, cert_url=certs.cert_url
    )
    response = await harness.post("ses", ours)
    assert response.status_code == 200
    assert response.json()["received"] == 0
    assert certs.confirmations == 1
    assert await harness.stored() == []


def test_sns_certificate_host_check() -> None:
    from esprelay.events.ses import sns_url_allowed

    assert sns_url_allowed("https://sns.eu-west-1.amazonaws.com/cert.pem", "eu-west-1")
    assert sns_url_allowed("https://sns.cn-north-1.amazonaws.com.cn/x.pem", "cn-north-1")
    for url in (
        "http://sns.eu-west-1.amazonaws.com/cert.pem",  # not HTTPS
        "https://sns.us-east-1.amazonaws.com/cert.pem",  # another region
        "https://sns.eu-west-1.amazonaws.com.evil.example/cert.pem",
        "https://evil.example@sns.eu-west-1.amazonaws.com/cert.pem",
        "https://sns.eu-west-1.amazonaws.com:8443/cert.pem",
        "https://[::1/cert.pem",
    ):
        assert not sns_url_allowed(url, "eu-west-1"), url


# endregion
# region Postmark


async def test_postmark_basic_credentials(harness: Harness) -> None:
    fake = harness.postmark
    record = fake.bounce("nobody@example.net", esprelay_id="p-1")
    wrong = await harness.post("postmark", fake.request(record, password="guess"))
    assert wrong.status_code == 401
    assert wrong.headers["WWW-Authenticate"].startswith("Basic")
    body, _ = fake.request(record)
    missing = await harness.post("postmark", (body, {"Content-Type": "application/json"}))
    assert missing.status_code == 401
    assert await harness.stored() == []
    good = await harness.post("postmark", fake.request(record))
    assert good.status_code == 200, good.text
    [stored] = await harness.stored()
    event = stored.event
    assert (event.kind, event.smtp_status, event.esprelay_id) == ("bounced", "5.1.1", "p-1")
    assert event.esp_message_id == record["MessageID"]
    assert event.provider_event_id == f"Bounce:{record['ID']}"
    again = await harness.post("postmark", fake.request(record))
    assert again.json()["duplicates"] == 1


async def test_postmark_source_address_allow_list(harness: Harness) -> None:
    await harness.stop()
    environ = {**harness.environ(), "ESPRELAY_POSTMARK_WEBHOOK_ALLOWED_IPS": "192.0.2.0/24"}
    await harness.start(environ)
    record = harness.postmark.bounce("nobody@example.net")
    response = await harness.post("postmark", harness.postmark.request(record))
    assert (response.status_code, response.json()) == (403, {"error": "address"})
    assert await harness.stored() == []


# endregion
# region the listener itself


async def test_oversized_request_is_refused_unread(harness: Harness) -> None:
    await harness.stop()
    await harness.start(events_max_request_size="1K")
    events = [harness.sendgrid.event("delivered", f"r{i}@example.net") for i in range(40)]
    response = await harness.post("sendgrid", harness.sendgrid.request(events))
    assert response.status_code == 413
    assert await harness.stored() == []
    assert harness.count("esprelay_events_rejected", provider="sendgrid", reason="too_large")


async def test_paths_and_methods(harness: Harness) -> None:
    assert harness.listener is not None
    base = f"http://127.0.0.1:{harness.listener.port}"
    assert (await harness.http.post(f"{base}/webhooks/nobody", content=b"[]")).status_code == 404
    assert (await harness.http.post(f"{base}/webhooks/outbox", content=b"[]")).status_code == 404
    assert (await harness.http.post(f"{base}/other", content=b"[]")).status_code == 404
    response = await harness.http.get(f"{base}/webhooks/sendgrid")
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"


async def test_per_peer_rate_limit(harness: Harness) -> None:
    """Beyond the burst a peer gets 429 until the bucket refills (a fake clock: no waiting)."""
    await harness.stop()
    clock = FakeClock(start=time.time())
    await harness.start(clock=clock, events_rate_limit=1, events_rate_burst=2)
    statuses = []
    for _ in range(3):
        event = harness.sendgrid.event("delivered", "ok@example.net")
        statuses.append(
            (await harness.post("sendgrid", harness.sendgrid.request([event]))).status_code
        )
    assert statuses == [200, 200, 429]
    clock.advance(1.0)
    event = harness.sendgrid.event("delivered", "ok@example.net")
    assert (await harness.post("sendgrid", harness.sendgrid.request([event]))).status_code == 200
    assert len(await harness.stored()) == 3


async def test_events_are_durable_before_the_answer(harness: Harness) -> None:
    """What was acknowledged is in the spool file after the spool is closed and reopened."""
    events = [harness.sendgrid.event("bounce", "x@example.net")]
    assert (await harness.post("sendgrid", harness.sendgrid.request(events))).status_code == 200
    await harness.stop()
    await harness.start()
    [stored] = await harness.stored()
    assert stored.event.provider_event_id == events[0]["sg_event_id"]


async def test_event_for_a_known_message_is_linked_unknown_counted(harness: Harness) -> None:
    assert harness.spool is not None
    message_id = await harness.spool.put(
        Envelope("sender@example.com", ("x@example.net",)),
        b"Subject: hi\r\n\r\nhi\r\n",
        provider="sendgrid",
    )
    known = harness.sendgrid.event("bounce", "x@example.net", esprelay_id=message_id)
    unknown = harness.sendgrid.event("bounce", "y@example.net", esprelay_id="nosuchid")
    response = await harness.post("sendgrid", harness.sendgrid.request([known, unknown]))
    assert response.status_code == 200
    stored = await harness.stored()
    assert [s.message_id for s in stored] == [message_id, None]
    assert harness.count("esprelay_events_unknown_message", provider="sendgrid") == 1


async def test_no_port_no_listener(tmp_path: Path) -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    routing = parse_routing(ROUTES, settings, {})
    assert await start_events(settings, routing=routing, spool=None, metrics=None) is None


async def test_needs_the_spool(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, events_port=0)  # type: ignore[call-arg]
    routing = parse_routing(ROUTES, settings, {})
    with pytest.raises(ConfigError, match="ESPRELAY_EVENTS_PORT needs the spool"):
        await start_events(settings, routing=routing, spool=None, metrics=None)


async def test_bad_keys_stop_start_up(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    try:
        for environ, message in (
            (
                {"ESPRELAY_SENDGRID_WEBHOOK_PUBLIC_KEY": "bm90IGEga2V5"},
                "SENDGRID_WEBHOOK_PUBLIC_KEY",
            ),
            ({"ESPRELAY_SES_SNS_TOPIC_ARNS": "topic"}, "ESPRELAY_SES_SNS_TOPIC_ARNS"),
            ({"ESPRELAY_POSTMARK_WEBHOOK_USER": "u"}, "ESPRELAY_POSTMARK_WEBHOOK_PASSWORD"),
        ):
            with pytest.raises(ConfigError, match=message):
                await h.start(environ)
            await h.stop()
    finally:
        await h.close()


# endregion


async def test_listener_over_tls(tmp_path: Path) -> None:
    """With a certificate the listener speaks HTTPS only."""
    import ssl

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from esprelay.events.fakes import self_signed

    key = ec.generate_private_key(ec.SECP256R1())
    cert = self_signed(key, "127.0.0.1", ip="127.0.0.1")
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    h = Harness(tmp_path)
    try:
        await h.start(
            events_tls_cert_file=tmp_path / "cert.pem", events_tls_key_file=tmp_path / "key.pem"
        )
        assert h.listener is not None
        url = f"https://127.0.0.1:{h.listener.port}/webhooks/sendgrid"
        body, headers = h.sendgrid.request([h.sendgrid.event("bounce", "x@example.net")])
        context = ssl.create_default_context(cadata=cert_pem.decode())
        async with httpx.AsyncClient(verify=context) as client:
            response = await client.post(url, content=body, headers=headers)
        assert response.status_code == 200
        with pytest.raises(httpx.HTTPError):
            await h.http.post(url.replace("https", "http"), content=body, headers=headers)
        assert len(await h.stored()) == 1
    finally:
        await h.close()


async def test_tls_files_go_together(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    try:
        with pytest.raises(ConfigError, match="go together"):
            await h.start(events_tls_cert_file=tmp_path / "cert.pem")
    finally:
        await h.close()


async def test_ses_topic_test_message_is_acknowledged_not_stored(harness: Harness) -> None:
    """SES's plain-text test message when an event destination is added: genuine, no event."""
    text = "Successfully validated SNS topic for Amazon SES event publishing."
    body, headers = harness.sns.notification(text, cert_url=harness.certs.cert_url)
    response = await harness.post("ses", (body, headers))
    assert response.status_code == 200
    assert response.json()["received"] == 0
    assert await harness.stored() == []
