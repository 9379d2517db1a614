"""The generic HTTP provider in a routes file, failing over to and from an older one
(SendGrid), end to end: a real relay, real SMTP, a fake service that verifies each
signature with the reference library, and the fake SendGrid of its own tests."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from esprelay.testing.fakeesp import FakeESP, Recorded, Reply
from tests.providers.common import queue
from tests.providers.test_http import SECRET, TOKEN, Service, verified
from tests.providers.test_sendgrid import KEY, SendGridAPI, recipients
from tests.relayproc import RelayProcess
from tests.test_e2e_routing import send, wait_until


def routes(own: FakeESP, sendgrid: FakeESP) -> str:
    return f"""
[providers.own]
kind = "http"
api_url = "{own.url}/in"
api_secret_env = "OWN_SECRET"
api_token_env = "OWN_TOKEN"
api_headers = {{ X-Tenant = "acme" }}

[providers.backup]
kind = "sendgrid"
api_key_env = "SENDGRID_KEY"
api_url = "{sendgrid.url}"

[[routes]]
sender_domains = ["legacy.example"]
providers = ["backup", "own"]

[default]
providers = ["own", "backup"]
"""


def test_failover_between_the_http_provider_and_sendgrid(
    relay_factory: type[RelayProcess], tmp_path: Path
) -> None:
    healthy = {"own": False, "backup": True}
    service, sendgrid_api = Service(), SendGridAPI()

    def own(request: Recorded) -> Reply:
        return service(request) if healthy["own"] else Reply(503, "down for maintenance")

    def backup(request: Recorded) -> Reply:
        return sendgrid_api(request) if healthy["backup"] else Reply(500, "internal error")

    with FakeESP(own) as own_esp, FakeESP(backup) as sendgrid:
        routes_file = tmp_path / "routes.toml"
        routes_file.write_text(routes(own_esp, sendgrid))
        relay = relay_factory(
            {
                "ESPRELAY_ROUTES_FILE": str(routes_file),
                "OWN_SECRET": SECRET,
                "OWN_TOKEN": TOKEN,
                "SENDGRID_KEY": KEY,
            }
        ).start()
        relay.wait_for_log(r"providers=own\(http\),backup\(sendgrid\)")

        # 1. Our service is down: the message fails over to SendGrid at once.
        assert send(relay, "app@example.com", ["a@example.org"], "first")[0] == 250
        sendgrid.wait_for(1)
        relay.wait_for_log(r"delivered id=\S+ provider=backup .*provider_id=sg-1")
        assert len(own_esp.requests) == 1  # tried first, signed all the same
        refused = own_esp.requests[0]
        assert verified(refused.body, refused.headers)["envelope"]["rcpt_to"] == ["a@example.org"]
        assert recipients(sendgrid.requests[0].json())["to"] == ["a@example.org"]

        # 2. Back up: the next message goes to our service, SendGrid is not asked.
        healthy["own"] = True
        assert send(relay, "app@example.com", ["b@example.org"], "second")[0] == 250
        own_esp.wait_for(2)
        relay.wait_for_log(r"delivered id=\S+ provider=own .*provider_id=svc-1")
        assert len(sendgrid.requests) == 1

        # 3. The other route starts with SendGrid; when it fails, our service takes over.
        healthy["backup"] = False
        assert send(relay, "ops@legacy.example", ["c@example.org"], "third")[0] == 250
        own_esp.wait_for(3)
        relay.wait_for_log(r"delivered id=\S+ provider=own .*provider_id=svc-2")
        assert len(sendgrid.requests) == 2
        wait_until(lambda: len(queue(relay, "delivered")) == 3, what="three delivered")

    taken = own_esp.requests[2]
    payload = verified(taken.body, taken.headers)
    assert payload["envelope"] == {"mail_from": "ops@legacy.example", "rcpt_to": ["c@example.org"]}
    assert b"Subject: third" in base64.b64decode(payload["raw"])
    assert taken.headers["authorization"] == f"Bearer {TOKEN}"
    assert taken.headers["x-tenant"] == "acme"
    for secret in (SECRET, TOKEN, KEY):
        assert secret not in relay.log
    assert json.loads(taken.body)["id"] == taken.headers["webhook-id"]
