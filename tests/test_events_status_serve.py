"""A real ``esprelay serve`` with its own events listener: a bounce posted by
SendGrid's fake becomes the status ``esprelay queue show`` prints, the admin page's
timeline, and a DSN to the sender sent through the ESP."""

from __future__ import annotations

import json
import os
import re
import smtplib
import subprocess
import sys

import httpx

from esprelay.events.fakes import FakeSendgrid
from esprelay.testing.fakeesp import FakeESP, Recorded, Reply
from tests.relayproc import RelayProcess

TOKEN = "admin-token-for-tests-0123456789"


def sendgrid(request: Recorded) -> Reply:
    return Reply(202, b"", {"X-Message-Id": "sg-message-1"})


def show(relay: RelayProcess, id: str) -> dict[str, object]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ESPRELAY_")}
    result = subprocess.run(
        [sys.executable, "-m", "esprelay", "queue", "show", id],
        cwd=relay.workdir,
        env={**environ, **relay.env},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    data: dict[str, object] = json.loads(result.stdout)
    return data


def test_serve_applies_a_bounce(relay_factory: type[RelayProcess]) -> None:
    fake = FakeSendgrid()
    with FakeESP(sendgrid) as esp:
        relay = relay_factory(
            {
                "ESPRELAY_PROVIDER": "sendgrid",
                "ESPRELAY_SENDGRID_API_KEY": "SG.test",
                "ESPRELAY_SENDGRID_API_URL": esp.url,
                "ESPRELAY_SENDGRID_WEBHOOK_PUBLIC_KEY": fake.public_key,
                "ESPRELAY_EVENTS_HOST": "127.0.0.1",
                "ESPRELAY_EVENTS_PORT": "0",
                "ESPRELAY_ADMIN_TOKEN": TOKEN,
                "ESPRELAY_HOSTNAME": "relay.test",
            }
        ).start()
        relay.wait_for_log(r"events listening on 127\.0\.0\.1:\d+")
        match = re.search(r"events listening on 127\.0\.0\.1:(\d+)", relay.log)
        assert match is not None
        events_port = int(match.group(1))
        raw = (
            b"From: app@sender.example\r\nTo: gone@rcpt.example\r\nSubject: served\r\n"
            b"Message-ID: <served@sender.example>\r\n\r\nbody\r\n"
        )
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
            assert smtp.sendmail("app@sender.example", ["gone@rcpt.example"], raw) == {}
        relay.wait_for_log(r"delivered id=\w+ provider=sendgrid")
        delivered = re.search(r"delivered id=(\w+) provider=sendgrid", relay.log)
        assert delivered is not None
        id = delivered.group(1)
        event = fake.event(
            "bounce", "gone@rcpt.example", esprelay_id=id, status="5.1.1",
            reason="550 5.1.1 no such user", type="bounce",
        )  # fmt: skip
        body, headers = fake.request([event])
        answer = httpx.post(
            f"http://127.0.0.1:{events_port}/webhooks/sendgrid",
            content=body,
            headers=headers,
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        relay.wait_for_log(rf"dsn id=\w+ kind=failure for={id} to=<app@sender\.example>")
        [_, dsn_request] = esp.wait_for(2)
        payload = dsn_request.json()
        assert payload["personalizations"][0]["to"] == [{"email": "app@sender.example"}]
        assert payload["subject"] == "Undelivered Mail Returned to Sender"

        shown = show(relay, id)
        assert shown["recipients"] == [
            {
                "recipient": "gone@rcpt.example",
                "status": "bounced",
                "at": shown["timeline"][0]["at"],  # type: ignore[index]
                "smtp_status": "5.1.1",
                "diagnostic": "550 5.1.1 no such user",
                "remote_mta": None,
                "provider": "sendgrid",
                "event_id": event["sg_event_id"],
                "dsn_sent": ["failure"],
            }
        ]
        assert shown["meta"]["message_id_header"] == "served@sender.example"  # type: ignore[index]
        assert "Subject: served" in shown["meta"]["headers"]  # type: ignore[index]

        page = httpx.get(
            f"http://127.0.0.1:{relay.http_port}/queue/{id}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )
        assert page.status_code == 200
        assert "timeline" in page.text and "5.1.1" in page.text and "bounced" in page.text
        listing = httpx.get(
            f"http://127.0.0.1:{relay.http_port}/queue",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )
        assert f'href="/queue/{id}"' in listing.text
        assert relay.stop() == 0
