"""A real ``esprelay serve`` with its events listener: what it acknowledged survives
a kill -9 (the events are durable before the 200)."""

from __future__ import annotations

import contextlib
import re
import signal
import sqlite3
from pathlib import Path

import httpx

from esprelay.events.fakes import FakeSendgrid
from esprelay.spool import open_spool
from tests.relayproc import RelayProcess


def _events_port(relay: RelayProcess) -> int:
    relay.wait_for_log(r"events listening on 127\.0\.0\.1:\d+")
    match = re.search(r"events listening on 127\.0\.0\.1:(\d+)", relay.log)
    assert match is not None
    return int(match.group(1))


async def test_acknowledged_events_survive_kill_9(relay_factory: type[RelayProcess]) -> None:
    sendgrid = FakeSendgrid()
    relay = relay_factory(
        {
            "ESPRELAY_PROVIDER": "sendgrid",
            "ESPRELAY_SENDGRID_API_KEY": "SG.test",
            "ESPRELAY_SENDGRID_API_URL": "http://127.0.0.1:9",
            "ESPRELAY_SENDGRID_WEBHOOK_PUBLIC_KEY": sendgrid.public_key,
            "ESPRELAY_EVENTS_HOST": "127.0.0.1",
            "ESPRELAY_EVENTS_PORT": "0",
        }
    ).start()
    port = _events_port(relay)
    assert "/webhooks/sendgrid (sendgrid)" in relay.log
    sent = [sendgrid.event("bounce", f"r{i}@example.net", status="5.1.1") for i in range(5)]
    async with httpx.AsyncClient(timeout=10) as client:
        forged = await client.post(
            f"http://127.0.0.1:{port}/webhooks/sendgrid",
            content=b"[]",
            headers={
                "X-Twilio-Email-Event-Webhook-Signature": "MEUCIQ==",
                "X-Twilio-Email-Event-Webhook-Timestamp": "1",
            },
        )
        assert forged.status_code == 403
        body, headers = sendgrid.request(sent)
        response = await client.post(
            f"http://127.0.0.1:{port}/webhooks/sendgrid", content=body, headers=headers
        )
        assert response.status_code == 200
    relay.send_signal(signal.SIGKILL)
    relay.kill()
    assert "refused a request" in relay.log
    spool = open_spool(relay.env["ESPRELAY_SPOOL_URL"])
    await spool.open()
    await spool.close()
    # Pending, or processed already (the relay applies its events as they come; these
    # name no message, so they are finished at once): in the inbox either way.
    path = relay.env["ESPRELAY_SPOOL_URL"].removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(path)) as conn:
        stored = [row[0] for row in conn.execute("SELECT event_id FROM event_inbox")]
    assert sorted(stored) == sorted(e["sg_event_id"] for e in sent)


def test_events_listener_stops_with_the_relay(
    relay_factory: type[RelayProcess], tmp_path: Path
) -> None:
    sendgrid = FakeSendgrid()
    relay = relay_factory(
        {
            "ESPRELAY_PROVIDER": "sendgrid",
            "ESPRELAY_SENDGRID_API_KEY": "SG.test",
            "ESPRELAY_SENDGRID_API_URL": "http://127.0.0.1:9",
            "ESPRELAY_SENDGRID_WEBHOOK_PUBLIC_KEY": sendgrid.public_key,
            "ESPRELAY_EVENTS_PORT": "0",
        }
    ).start()
    port = _events_port(relay)
    assert relay.stop() == 0
    try:
        httpx.post(f"http://127.0.0.1:{port}/webhooks/sendgrid", content=b"[]", timeout=5)
    except httpx.ConnectError:
        pass
    else:
        raise AssertionError("the events listener still answers after the relay stopped")
