"""Routes by authenticated user, and AUTH users reloaded on SIGHUP."""

from __future__ import annotations

import signal
from pathlib import Path

from esprelay.smtp.auth import hash_password
from esprelay.testing.fakeesp import FakeESP
from tests.providers.test_mailgun import DOMAIN, KEY, mailgun
from tests.relayproc import RelayProcess
from tests.securitykit import Dialog, crlf, plain_auth
from tests.test_e2e_routing import provider_table, recipients_of


def send_as(port: int, user: str | None, password: str, rcpt: str) -> bytes:
    dialog = Dialog(port)
    try:
        assert dialog.reply().startswith(b"220")
        dialog.command(b"EHLO printer.test")
        if user is not None:
            reply = dialog.command(b"AUTH PLAIN " + plain_auth(user, password))
            if not reply.startswith(b"235"):
                return reply
        assert dialog.command(b"MAIL FROM:<scan@office.example>").startswith(b"250")
        assert dialog.command(f"RCPT TO:<{rcpt}>".encode()).startswith(b"250")
        assert dialog.command(b"DATA").startswith(b"354")
        return dialog.command(crlf("From: scan@office.example\nSubject: scan\n\nscan\n.").rstrip())
    finally:
        dialog.close()


def test_route_by_authenticated_user(relay_factory: type[RelayProcess], tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text(f"printer:{hash_password('pw-printer')}\n")
    with FakeESP(mailgun) as office, FakeESP(mailgun) as printers:
        routes = tmp_path / "routes.toml"
        routes.write_text(
            provider_table("office", office)
            + provider_table("printers", printers)
            + '[[routes]]\nauth_users = ["printer"]\nproviders = ["printers"]\n'
            + '[default]\nproviders = ["office"]\n'
        )
        relay = relay_factory(
            {
                "TEST_MAILGUN_KEY": KEY,
                "ESPRELAY_ROUTES_FILE": str(routes),
                "ESPRELAY_AUTH_FILE": str(users),
            }
        ).start()
        assert send_as(relay.port, "printer", "pw-printer", "a@example.org").startswith(b"250")
        assert send_as(relay.port, None, "", "b@example.org").startswith(b"250")
        printers.wait_for(1)
        office.wait_for(1)
        assert recipients_of(printers.requests[0]) == ["a@example.org"]
        assert recipients_of(office.requests[0]) == ["b@example.org"]
        assert f"/v3/{DOMAIN}/" in printers.requests[0].path


def test_sighup_reloads_auth_users(relay_factory: type[RelayProcess], tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text(f"printer:{hash_password('old-pw')}\n")
    relay = relay_factory({"ESPRELAY_AUTH_FILE": str(users)}).start()
    assert send_as(relay.port, "printer", "old-pw", "a@example.org").startswith(b"250")

    users.write_text(f"scanner:{hash_password('new-pw')}\n")
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGHUP)
    relay.wait_for_log("AUTH users reloaded: 1 user")
    assert send_as(relay.port, "scanner", "new-pw", "a@example.org").startswith(b"250")
    assert send_as(relay.port, "printer", "old-pw", "a@example.org").startswith(b"535")

    users.write_text("broken line without a hash\n")
    relay.proc.send_signal(signal.SIGHUP)
    relay.wait_for_log("reload: ESPRELAY_AUTH_FILE line 1")
    assert send_as(relay.port, "scanner", "new-pw", "a@example.org").startswith(b"250")
    assert "new-pw" not in relay.log
