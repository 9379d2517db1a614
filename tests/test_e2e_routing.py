"""Issue: routing, failover, passthrough and bounces, end to end.

Real esprelay processes, real SMTP clients, and fake Mailgun APIs on loopback
(Mailgun takes raw MIME, so what arrives can be read back with Python's email package).
"""

from __future__ import annotations

import email
import email.policy
import json
import smtplib
import time
from collections.abc import Callable
from pathlib import Path

from esprelay.testing.fakeesp import FakeESP, Recorded, Reply
from tests.providers.common import queue
from tests.providers.test_mailgun import DOMAIN, KEY, form_fields, mailgun
from tests.relayproc import RelayProcess


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "it") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not met within {timeout}s")


def recipients_of(request: Recorded) -> list[str]:
    return [value.decode() for name, _, value in form_fields(request) if name == "to"]


def mime_of(request: Recorded) -> bytes:
    [value] = [value for name, _, value in form_fields(request) if name == "message"]
    return value


def provider_table(name: str, esp: FakeESP) -> str:
    return (
        f'[providers.{name}]\nkind = "mailgun"\napi_key_env = "TEST_MAILGUN_KEY"\n'
        f'domain = "{DOMAIN}"\napi_url = "{esp.url}"\n'
    )


def start(
    relay_factory: type[RelayProcess], tmp_path: Path, routes: str, **env: str
) -> RelayProcess:
    routes_file = tmp_path / "routes.toml"
    routes_file.write_text(routes)
    return relay_factory(
        {
            "TEST_MAILGUN_KEY": KEY,
            "ESPRELAY_ROUTES_FILE": str(routes_file),
            "ESPRELAY_RETRY_INITIAL": "0.3s",
            "ESPRELAY_RETRY_MAX": "0.5s",
            **env,
        }
    ).start()


def send(
    relay: RelayProcess, mail_from: str, rcpts: list[str], subject: str = "hello"
) -> tuple[int, str]:
    raw = (
        f"From: {mail_from}\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@example.com>\r\n\r\nbody of {subject}\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        smtp.mail(mail_from)
        for rcpt in rcpts:
            assert smtp.rcpt(rcpt)[0] == 250
        code, reply = smtp.data(raw)
    return code, reply.decode()


def test_failover_and_circuit_breaker(relay_factory: type[RelayProcess], tmp_path: Path) -> None:
    healthy = {"first": False}

    def first_esp(request: Recorded) -> Reply:
        return mailgun(request) if healthy["first"] else Reply(503, "Service Unavailable")

    with FakeESP(first_esp) as first, FakeESP(mailgun) as second:
        routes = (
            provider_table("first", first)
            + provider_table("second", second)
            + '[default]\nproviders = ["first", "second"]\n'
        )
        relay = start(
            relay_factory,
            tmp_path,
            routes,
            ESPRELAY_BREAKER_THRESHOLD="2",
            ESPRELAY_BREAKER_COOLDOWN="2s",
        )
        for i in range(5):
            assert send(relay, "app@example.com", [f"user{i}@example.org"], f"m{i}")[0] == 250
            second.wait_for(i + 1)
        # Two failures opened the breaker: the next three went straight to the second ESP.
        assert len(first.requests) == 2
        assert [recipients_of(r) for r in second.requests] == [
            [f"user{i}@example.org"] for i in range(5)
        ]
        relay.wait_for_log("provider first failing")

        healthy["first"] = True  # the first ESP recovers; after the cool-down, a trial
        time.sleep(2.2)
        assert send(relay, "app@example.com", ["late@example.org"], "after recovery")[0] == 250
        first.wait_for(3)
        assert recipients_of(first.requests[2]) == ["late@example.org"]
        relay.wait_for_log("provider first recovered: circuit closed")
        assert len(second.requests) == 5
        wait_until(lambda: len(queue(relay, "delivered")) == 6, what="six delivered")


def test_routes_by_sender_and_recipient_domain_with_split(
    relay_factory: type[RelayProcess], tmp_path: Path
) -> None:
    with FakeESP(mailgun) as brand, FakeESP(mailgun) as partner, FakeESP(mailgun) as default:
        routes = (
            provider_table("brand", brand)
            + provider_table("partner", partner)
            + provider_table("fallback", default)
            + '[[routes]]\nrecipient_domains = ["partner.example"]\nproviders = ["partner"]\n'
            + '[[routes]]\nsender_domains = ["brand.example"]\nproviders = ["brand"]\n'
            + '[default]\nproviders = ["fallback"]\n'
        )
        relay = start(relay_factory, tmp_path, routes)
        rcpts = ["x@partner.example", "y@other.example", "z@PARTNER.example", "w@other.example"]
        code, reply = send(relay, "app@brand.example", rcpts, "split")
        assert code == 250
        ids = reply.rsplit("queued as ", 1)[1].split(",")
        assert len(ids) == 2
        partner.wait_for(1)
        brand.wait_for(1)
        assert recipients_of(partner.requests[0]) == ["x@partner.example", "z@PARTNER.example"]
        assert recipients_of(brand.requests[0]) == ["y@other.example", "w@other.example"]
        # The same message bytes went both ways; each recipient exactly once.
        assert mime_of(partner.requests[0]) == mime_of(brand.requests[0])
        every = recipients_of(partner.requests[0]) + recipients_of(brand.requests[0])
        assert sorted(every) == sorted(rcpts)

        assert send(relay, "app@elsewhere.example", ["q@other.example"], "default")[0] == 250
        default.wait_for(1)
        assert recipients_of(default.requests[0]) == ["q@other.example"]
        time.sleep(0.5)
        assert (len(brand.requests), len(partner.requests), len(default.requests)) == (1, 1, 1)
        rows = queue(relay, "delivered")
        assert {r["id"] for r in rows} >= set(ids)


def test_passthrough_replies_with_the_esp_answer(
    relay_factory: type[RelayProcess], tmp_path: Path
) -> None:
    with FakeESP(mailgun) as esp:
        routes = provider_table("esp", esp) + '[default]\nproviders = ["esp"]\n'
        relay = start(
            relay_factory,
            tmp_path,
            routes,
            ESPRELAY_DELIVERY_MODE="passthrough",
            ESPRELAY_PROVIDER_TIMEOUT="1s",
        )
        code, reply = send(relay, "app@example.com", ["a@example.org"], "accepted")
        assert code == 250 and f"@{DOMAIN})" in reply and "esp:" in reply

        esp.then(Reply(429, {"message": "rate limited"}, {"Retry-After": "30"}))
        code, reply = send(relay, "app@example.com", ["a@example.org"], "throttled")
        assert code == 451, reply

        esp.then(Reply(400, {"message": "to parameter is not a valid address"}))
        code, reply = send(relay, "app@example.com", ["a@example.org"], "rejected")
        assert code == 554, reply
        assert "not a valid address" in reply

        esp.then(Reply(200, {"id": "<late@x>", "message": "Queued"}, delay=3))
        code, reply = send(relay, "app@example.com", ["a@example.org"], "slow")
        assert code == 451, reply
        assert len(esp.requests) == 4
        # No spool at all in passthrough mode.
        assert not (relay.workdir / "data").exists()


def test_inline_attempt_and_bounces(relay_factory: type[RelayProcess], tmp_path: Path) -> None:
    def esp_rules(request: Recorded) -> Reply:
        mime = mime_of(request)
        if b"Subject: reject now" in mime:
            return Reply(400, {"message": "recipient is on the suppression list"})
        if b"Subject: reject later" in mime:
            return Reply(400, {"message": "sender not allowed"}, delay=2)
        return mailgun(request)

    with FakeESP(esp_rules) as esp:
        routes = provider_table("esp", esp) + '[default]\nproviders = ["esp"]\n'
        relay = start(relay_factory, tmp_path, routes, ESPRELAY_INLINE_ATTEMPT_SECONDS="1s")

        # Within the window: the client hears the rejection, no bounce is sent.
        code, reply = send(relay, "app@example.com", ["gone@example.org"], "reject now")
        assert code == 554, reply
        assert "suppression list" in reply
        failed = queue(relay, "failed")
        assert len(failed) == 1 and "suppression" in failed[0]["last_error"]

        # A good message inside the window.
        code, reply = send(relay, "app@example.com", ["ok@example.org"], "fine")
        assert code == 250

        # Outside the window: 250 now, a DSN to the sender later.
        code, reply = send(relay, "app@example.com", ["late@example.org"], "reject later")
        assert code == 250
        failed_id = reply.rsplit("queued as ", 1)[1]
        esp.wait_for(4)
        dsn_request = esp.requests[3]
        assert recipients_of(dsn_request) == ["app@example.com"]
        dsn = email.message_from_bytes(mime_of(dsn_request), policy=email.policy.default)
        assert dsn.get_content_type() == "multipart/report"
        assert dsn.get_param("report-type") == "delivery-status"
        status = next(
            p for p in dsn.iter_parts() if p.get_content_type() == "message/delivery-status"
        )
        per_message, *per_recipient = status.get_payload()
        assert len(per_recipient) == 1
        assert per_recipient[0]["Final-Recipient"] == "rfc822; late@example.org"
        assert per_recipient[0]["Action"] == "failed"
        assert per_recipient[0]["Status"].startswith("5.")
        assert per_message["X-Esprelay-Queue-ID"] == failed_id
        relay.wait_for_log(rf"bounce id=\w+ for={failed_id} to=<app@example.com>")
        time.sleep(0.5)
        assert len(esp.requests) == 4  # exactly one bounce, none for the inline rejection
        records = queue(relay, "failed")
        assert {r["id"] for r in records} == {failed[0]["id"], failed_id}


def test_no_bounce_for_null_sender_and_failure_webhook(
    relay_factory: type[RelayProcess], tmp_path: Path
) -> None:
    with (
        FakeESP(lambda r: Reply(400, {"message": "nope"})) as esp,
        FakeESP(lambda r: Reply(204)) as hook,
    ):
        routes = provider_table("esp", esp) + '[default]\nproviders = ["esp"]\n'
        relay = start(
            relay_factory, tmp_path, routes, ESPRELAY_FAILURE_WEBHOOK_URL=hook.url + "/failed"
        )
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
            smtp.ehlo("client.test")
            assert smtp.docmd("MAIL FROM:<>")[0] == 250
            assert smtp.rcpt("x@example.org")[0] == 250
            assert smtp.data(b"Subject: dsn\r\n\r\nx\r\n")[0] == 250
        [posted] = hook.wait_for(1)
        record = json.loads(posted.body)
        assert record["event"] == "failed" and record["rcpt_tos"] == ["x@example.org"]
        assert record["status_code"] == 400 and record["provider"] == "esp"
        relay.wait_for_log("no bounce for id=.*null sender")
        time.sleep(0.5)
        assert len(esp.requests) == 1
