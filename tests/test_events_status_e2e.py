"""What ESP events do, end to end, per ESP and per spool backend.

A running relay (in this process: its SMTP listener, spool and delivery workers) takes
a message over SMTP (smtplib) and delivers it to a fake ESP on loopback.  The ESP's
fake then posts a signed bounce event for it to the real events listener, with
esprelay's id in it as the ESP would echo it.  The bounce must become the recipient's
status in the admin API and a DSN (``multipart/report``) to the sender, queued on the
message's provider chain and sent to the same ESP.  The fake ESP answers the DSN's send
503, so the DSN stays queued and its bytes can be read back from the spool.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import json
import smtplib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from aiohttp import web

from esprelay.app import Relay
from esprelay.config import Settings
from esprelay.events.fakes import CertServer, FakeMailgun, FakePostmark, FakeSendgrid, FakeSns
from esprelay.events.listener import EventsListener
from esprelay.events.service import start_events
from esprelay.models import MessageState
from esprelay.providers.http import secret_key, sign
from esprelay.testing.fakeesp import FakeESP, Recorded, Reply
from tests.pgutil import temporary_database

ESPS = ("sendgrid", "mailgun", "ses", "postmark")
SENDER = "app@sender.example"
RCPT = "gone@rcpt.example"
TOKEN = "admin-token-for-tests-0123456789"


def is_dsn_request(request: Recorded) -> bool:
    """Is this send a DSN (from the bounce address)?  SES carries the message in base64."""
    if b"MAILER-DAEMON" in request.body:
        return True
    try:
        data = json.loads(request.body)["Content"]["Raw"]["Data"]
    except (ValueError, KeyError, TypeError):
        return False
    return b"MAILER-DAEMON" in base64.b64decode(data)


def esp_reply(kind: str) -> Callable[[Recorded], Reply]:
    """Each ESP's success answer for a message; 503 for a DSN (kept queued)."""
    count = 0

    def reply(request: Recorded) -> Reply:
        nonlocal count
        if is_dsn_request(request):
            return Reply(503, {"message": "try again later"})
        count += 1
        if kind == "sendgrid":
            return Reply(202, b"", {"X-Message-Id": f"sg-{count}"})
        if kind == "mailgun":
            return Reply(200, {"id": f"<mg-{count}@mg.example.com>", "message": "Queued."})
        if kind == "ses":
            return Reply(200, {"MessageId": f"ses-{count}"})
        return Reply(200, {"ErrorCode": 0, "Message": "OK", "MessageID": f"pm-{count}"})

    return reply


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with temporary_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def spool_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'spool.db'}"
    return str(request.getfixturevalue("pg_url"))


async def empty_postgres(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "DROP TABLE IF EXISTS esprelay_message_timeline, esprelay_message_recipients,"
            " esprelay_events, esprelay_attempts, esprelay_bodies, esprelay_messages,"
            " esprelay_schema"
        )
    finally:
        await conn.close()


@dataclass
class Stack:
    """The relay, its events listener, the ESP's fake and the event signers."""

    kind: str
    relay: Relay
    esp: FakeESP
    listener: EventsListener
    http: httpx.AsyncClient
    sendgrid: FakeSendgrid
    mailgun: FakeMailgun
    sns: FakeSns
    postmark: FakePostmark
    certs: CertServer
    extra: list[Any] = field(default_factory=list)
    mailgun_data: dict[str, Any] = field(default_factory=dict)

    @property
    def spool(self) -> Any:
        assert self.relay.spool is not None
        return self.relay.spool

    async def send(
        self,
        *,
        mail_from: str = SENDER,
        rcpt: str = RCPT,
        rcpt_options: tuple[str, ...] = (),
        mail_options: tuple[str, ...] = (),
        headers: str = "",
        subject: str = "status test",
    ) -> str:
        """A message through SMTP; its spool id once delivered to the ESP."""
        port = self.relay.smtp_port
        assert port is not None
        raw = (
            f"From: {SENDER}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@sender.example>\r\n{headers}"
            f"\r\nthe body of {subject}\r\n"
        ).encode()

        def client() -> str:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                smtp.ehlo("client.test")
                smtp.mail(mail_from, list(mail_options))
                assert smtp.rcpt(rcpt, list(rcpt_options))[0] == 250
                code, reply = smtp.data(raw)
            assert code == 250, reply
            return reply.decode().rsplit("queued as ", 1)[1].strip()

        id = await asyncio.to_thread(client)
        await self.wait(lambda m: m.state is MessageState.DELIVERED, id)
        return id

    async def wait(self, predicate: Callable[[Any], bool], id: str, timeout: float = 20) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = await self.spool.get(id)
            if message is not None and predicate(message):
                return message
            await asyncio.sleep(0.05)
        raise AssertionError(f"message {id} did not get there in {timeout}s")

    def bounce(self, id: str | None, rcpt: str = RCPT, *, kind: str = "bounced") -> Any:
        """A signed request of this ESP reporting ``rcpt``'s bounce (``kind``: bounced,
        delivered or deferred) of the message ``id``."""
        if self.kind == "sendgrid":
            if kind == "bounced":
                item = self.sendgrid.event(
                    "bounce", rcpt, esprelay_id=id, status="5.1.1",
                    reason="550 5.1.1 The email account does not exist", type="bounce",
                )  # fmt: skip
            else:  # a second on: SendGrid's times are whole seconds
                item = self.sendgrid.event(
                    kind, rcpt, esprelay_id=id, timestamp=int(time.time()) + 1,
                    response="250 2.0.0 OK" if kind == "delivered" else "452 4.2.2 full",
                )  # fmt: skip
            return self.sendgrid.request([item])
        if self.kind == "mailgun":
            data = self.mailgun.event(
                "failed", rcpt, esprelay_id=id, severity="permanent", reason="bounce",
                **{"delivery-status": {
                    "code": 550, "message": "5.1.1 The email account does not exist",
                    "mx-host": "mx.rcpt.example",
                }},
            )  # fmt: skip
            self.mailgun_data = data
            return self.mailgun.request(data)
        if self.kind == "ses":
            return self.sns.notification(
                self.sns.bounce(rcpt, esprelay_id=id), cert_url=self.certs.cert_url
            )
        return self.postmark.request(self.postmark.bounce(rcpt, esprelay_id=id))

    def retried(self, request: tuple[bytes, dict[str, str]]) -> tuple[bytes, dict[str, str]]:
        """The ESP's retry of ``request`` (Mailgun signs each with a fresh token)."""
        return self.mailgun.request(self.mailgun_data) if self.kind == "mailgun" else request

    def forged(self, id: str) -> tuple[bytes, dict[str, str]]:
        """A bounce for ``id`` this ESP did not send: its body changed after signing
        (SendGrid, SES), signed with another key (Mailgun signs no body), or posted
        with the wrong credentials (Postmark signs nothing)."""
        if self.kind == "mailgun":
            return FakeMailgun().request(self.mailgun.event("failed", RCPT, esprelay_id=id))
        if self.kind == "postmark":
            return self.postmark.request(self.postmark.bounce(RCPT, esprelay_id=id), password="x")
        body, headers = self.bounce(id)
        return body.replace(b"5.1.1", b"5.7.1"), headers

    async def post(self, request: tuple[bytes, dict[str, str]]) -> httpx.Response:
        body, headers = request
        return await self.http.post(
            f"http://127.0.0.1:{self.listener.port}/webhooks/{self.kind}",
            content=body,
            headers=headers,
        )

    async def processed(self) -> None:
        """Until the inbox has nothing pending."""
        deadline = time.monotonic() + 20
        while await self.spool.pending_events(1):
            assert time.monotonic() < deadline, "events not processed"
            await asyncio.sleep(0.05)

    async def api(self, path: str) -> Any:
        assert self.relay.http is not None and self.relay.http.port is not None
        response = await self.http.get(
            f"http://127.0.0.1:{self.relay.http.port}{path}",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert response.status_code == 200, response.text
        return response.json()

    async def dsns(self) -> list[EmailMessage]:
        """The DSNs queued in the spool (their sends answered 503), parsed."""
        found = []
        for message in await self.spool.list(limit=1000):
            if message.meta.get("dsn_for"):
                full = await self.spool.get(message.id, with_body=True)
                assert full.raw is not None
                parsed = email.message_from_bytes(full.raw, policy=email.policy.default)
                assert isinstance(parsed, EmailMessage)
                found.append(parsed)
        return found


def environment(kind: str, esp: FakeESP, signers: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    env = {
        "ESPRELAY_PROVIDER": kind,
        "ESPRELAY_SENDGRID_API_KEY": "SG.test",
        "ESPRELAY_SENDGRID_API_URL": esp.url,
        "ESPRELAY_MAILGUN_API_KEY": "key-test",
        "ESPRELAY_MAILGUN_DOMAIN": "mg.example.com",
        "ESPRELAY_MAILGUN_API_URL": esp.url,
        "ESPRELAY_SES_REGION": "eu-west-1",
        "ESPRELAY_SES_ENDPOINT_URL": esp.url,
        "AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKE1234",
        "AWS_SECRET_ACCESS_KEY": "fake/secret/key/for/tests/only/0123456789",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "ESPRELAY_POSTMARK_SERVER_TOKEN": "pm-token",
        "ESPRELAY_POSTMARK_API_URL": esp.url,
        "ESPRELAY_SENDGRID_WEBHOOK_PUBLIC_KEY": signers["sendgrid"].public_key,
        "ESPRELAY_MAILGUN_WEBHOOK_SIGNING_KEY": signers["mailgun"].signing_key,
        "ESPRELAY_SES_SNS_TOPIC_ARNS": signers["sns"].topic_arn,
        "ESPRELAY_POSTMARK_WEBHOOK_USER": signers["postmark"].user,
        "ESPRELAY_POSTMARK_WEBHOOK_PASSWORD": signers["postmark"].password,
    }
    return env


@pytest.fixture
async def stack_factory(
    spool_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Any]]:
    stacks: list[Stack] = []

    async def make(kind: str, **settings: Any) -> Stack:
        if spool_url.startswith("postgresql"):
            await empty_postgres(spool_url)
        signers = {
            "sendgrid": FakeSendgrid(),
            "mailgun": FakeMailgun(),
            "sns": FakeSns(),
            "postmark": FakePostmark(),
        }
        esp = FakeESP(esp_reply(kind)).__enter__()
        for name, value in environment(kind, esp, signers, tmp_path).items():
            monkeypatch.setenv(name, value)
        certs = await CertServer(signers["sns"].certificate_pem).start()
        options: dict[str, Any] = {
            "smtp_host": "127.0.0.1",
            "smtp_port": 0,
            "http_host": "127.0.0.1",
            "http_port": 0,
            "admin_token": TOKEN,
            "spool_url": spool_url,
            "poll_interval": 0.2,
            "retry_initial": 3600.0,
            "retry_max": 3600.0,
            "hostname": "relay.test",
            "repair_headers": False,
            "shutdown_grace": 2.0,
            **settings,
        }
        config = Settings(_env_file=None, **options)  # type: ignore[call-arg]
        relay = Relay(config)
        await relay.start()
        assert relay.intake is not None
        # The relay's own listener (ESPRELAY_EVENTS_PORT) cannot be pointed at a
        # loopback SNS: this one is, with everything else as the relay makes it.
        relay.intake.keep_headers = True
        fetcher = certs.client()
        events_settings = config.model_copy(update={"events_port": 0})
        events_settings._environ = config.environ
        listener = await start_events(
            events_settings,
            routing=relay.routing,
            spool=relay.spool,
            metrics=relay.metrics,
            client=fetcher,
            overrides={"sns_url_allowed": certs.url_allowed},
            process=True,
            wake_delivery=relay.deliverer.wake if relay.deliverer else None,
        )
        assert listener is not None
        stack = Stack(
            kind=kind,
            relay=relay,
            esp=esp,
            listener=listener,
            http=httpx.AsyncClient(timeout=10),
            sendgrid=signers["sendgrid"],
            mailgun=signers["mailgun"],
            sns=signers["sns"],
            postmark=signers["postmark"],
            certs=certs,
            extra=[fetcher],
        )
        stacks.append(stack)
        return stack

    try:
        yield make
    finally:
        for stack in stacks:
            await stack.listener.close()
            await stack.relay.shutdown()
            await stack.http.aclose()
            for client in stack.extra:
                await client.aclose()
            await stack.certs.close()
            stack.esp.__exit__(None, None, None)


def delivery_status(dsn: EmailMessage) -> tuple[Any, list[Any]]:
    part = next(p for p in dsn.iter_parts() if p.get_content_type() == "message/delivery-status")
    per_message, *per_recipient = part.get_payload()
    return per_message, per_recipient


@pytest.mark.parametrize("kind", ESPS)
async def test_a_bounce_becomes_a_dsn_and_the_status(
    stack_factory: Callable[..., Any], kind: str
) -> None:
    stack: Stack = await stack_factory(kind)
    id = await stack.send(
        rcpt_options=("NOTIFY=FAILURE", "ORCPT=rfc822;Gone@rcpt.example"),
        mail_options=("RET=FULL", "ENVID=env-42"),
    )
    assert await stack.dsns() == []

    # A forged event: refused, nothing changes.
    forged = await stack.post(stack.forged(id))
    assert forged.status_code in (400, 401, 403), forged.text
    await stack.processed()
    assert (await stack.api(f"/api/messages/{id}"))["timeline"] == []

    request = stack.bounce(id)
    answer = await stack.post(request)
    assert answer.status_code == 200, answer.text
    await stack.processed()
    # The same event again (the ESP's retry) and another bounce of the same recipient.
    assert (await stack.post(stack.retried(request))).status_code == 200
    assert (await stack.post(stack.bounce(id))).status_code == 200
    await stack.processed()

    shown = await stack.api(f"/api/messages/{id}")
    [recipient] = shown["recipients"]
    assert recipient["recipient"] == RCPT
    assert recipient["status"] == "bounced"
    assert recipient["smtp_status"] == "5.1.1"
    assert recipient["dsn_sent"] == ["failure"]
    assert len(shown["timeline"]) == 2  # the retry is stored once; two distinct bounces
    assert all(entry["status"] == "bounced" for entry in shown["timeline"])

    [dsn] = await stack.dsns()  # one DSN for the recipient, however many bounces
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    assert dsn["To"] == SENDER
    per_message, [block] = delivery_status(dsn)
    assert per_message["Reporting-MTA"] == "dns; relay.test"
    assert per_message["Original-Envelope-Id"] == "env-42"
    assert per_message["X-Esprelay-Queue-ID"] == id
    assert block["Action"] == "failed"
    assert block["Status"] == "5.1.1"
    assert block["Final-Recipient"] == f"rfc822; {RCPT}"
    assert block["Original-Recipient"] == "rfc822;Gone@rcpt.example"
    assert block["Diagnostic-Code"]
    # The body was dropped at delivery: the headers kept at intake come back, whatever
    # RET asked.
    returned = next(p for p in dsn.iter_parts() if p.get_content_type() == "text/rfc822-headers")
    text = returned.get_content()
    assert "Message-ID: <status.test@sender.example>" in text
    assert "the body of" not in dsn.as_string()
    # Where bounces go: the DSN was handed to the message's ESP, to the sender.
    await asyncio.to_thread(stack.esp.wait_for, 2)
    assert sum(1 for r in stack.esp.requests if is_dsn_request(r)) == 1

    found = await stack.api("/api/messages?message_id=<status.test@sender.example>")
    assert [m["id"] for m in found["messages"]] == [id]
    found = await stack.api(f"/api/messages?rcpt={RCPT.upper()}&since=2020-01-01T00:00:00")
    assert [m["id"] for m in found["messages"]] == [id]
    assert stack.relay.http is not None
    for query in ("since=yesterday", "until=nan", "limit=0&rcpt=x@y.example"):
        bad = await stack.http.get(
            f"http://127.0.0.1:{stack.relay.http.port}/api/messages?{query}",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert bad.status_code == 400, query
    metrics = stack.relay.metrics.registry
    assert metrics.get_sample_value("esprelay_events_dsns_total", {"kind": "failure"}) == 1
    assert metrics.get_sample_value("esprelay_events_status_changes_total", {"kind": "bounced"})


@pytest.mark.parametrize("kind", ["sendgrid", "postmark"])
async def test_no_dsn_for_notify_never_null_sender_or_auto_submitted(
    stack_factory: Callable[..., Any], kind: str
) -> None:
    stack: Stack = await stack_factory(kind)
    never = await stack.send(rcpt_options=("NOTIFY=NEVER",), subject="never")
    null = await stack.send(mail_from="", subject="null sender")
    auto = await stack.send(headers="Auto-Submitted: auto-generated\r\n", subject="auto")
    for id in (never, null, auto):
        assert (await stack.post(stack.bounce(id))).status_code == 200
    await stack.processed()
    assert await stack.dsns() == []
    for id in (never, null, auto):
        shown = await stack.api(f"/api/messages/{id}")
        assert shown["recipients"][0]["status"] == "bounced"
        assert shown["recipients"][0]["dsn_sent"] == []


async def test_success_and_delay_reports_and_unknown_messages(
    stack_factory: Callable[..., Any],
) -> None:
    stack: Stack = await stack_factory("sendgrid", delay_dsn_after=0.0)
    id = await stack.send(rcpt_options=("NOTIFY=SUCCESS,DELAY",))
    shown = await stack.api(f"/api/messages/{id}")
    assert shown["recipients"][0]["status"] == "accepted"  # by the ESP, no event yet
    assert (await stack.post(stack.bounce(id, kind="deferred"))).status_code == 200
    assert (await stack.post(stack.bounce(id, kind="deferred"))).status_code == 200
    assert (await stack.post(stack.bounce(id, kind="delivered"))).status_code == 200
    # An event for no message of this spool: acknowledged, nothing else.
    assert (await stack.post(stack.bounce("0" * 20))).status_code == 200
    await stack.processed()
    actions = sorted(delivery_status(dsn)[1][0]["Action"] for dsn in await stack.dsns())
    assert actions == ["delayed", "delivered"]  # one delay report however many deferrals
    shown = await stack.api(f"/api/messages/{id}")
    assert shown["recipients"][0]["status"] == "delivered"
    assert [e["status"] for e in shown["timeline"]] == ["deferred", "deferred", "delivered"]


async def test_bounces_forwarded_to_the_failure_webhook_signed(
    stack_factory: Callable[..., Any],
) -> None:
    received: list[tuple[bytes, dict[str, str]]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((await request.read(), dict(request.headers)))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    try:
        stack: Stack = await stack_factory(
            "sendgrid",
            failure_webhook_url=f"http://127.0.0.1:{port}/hook",
            failure_webhook_events="bounced,complained",
            failure_webhook_secret=secret,
        )
        id = await stack.send()
        request = stack.bounce(id)
        assert (await stack.post(request)).status_code == 200
        assert (await stack.post(stack.bounce(id, kind="delivered"))).status_code == 200
        assert (await stack.post(request)).status_code == 200  # a retry: not sent again
        await stack.processed()
        await stack.listener.close()  # waits for the forwards under way
        [(body, headers)] = received
        record = json.loads(body)
        assert (record["type"], record["event"], record["id"]) == ("esprelay.event", "bounced", id)
        assert record["recipient"] == RCPT and record["smtp_status"] == "5.1.1"
        assert record["message_id_header"] == "status.test@sender.example"
        webhook_id = headers["webhook-id"]
        assert webhook_id == f"sendgrid:{record['provider_event_id']}"
        timestamp = int(headers["webhook-timestamp"])
        assert headers["webhook-signature"] == sign(secret_key(secret), webhook_id, timestamp, body)
    finally:
        await runner.cleanup()
