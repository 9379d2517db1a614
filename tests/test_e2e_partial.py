"""End to end: a provider that accepts a message for some recipients only.

A real SMTP client sends one message to A, B, C and D through a running ``esprelay
serve``, whose provider (tests/partial_esp.py, registered through an entry point as a
third-party provider would be) POSTs to a loopback HTTP server.  That server accepts
A, refuses B and D for good and C for now on the first call, and accepts C on the
second.  A is sent to exactly once, C is retried alone, and the sender receives one
DSN naming B only (D asked for none with NOTIFY=NEVER).  On SQLite and PostgreSQL
spools, and with the client waiting for the first attempt (inline) or not; and once
more through the Mailjet adapter and its fake (``esprelay.testing.fakeesp.MailjetAPI``).
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
import smtplib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from esprelay.testing.fakeesp import FakeESP, MailjetAPI, MailjetError, Recorded, Reply
from tests.opshttp import TOKEN, admin, scrape, value
from tests.pgutil import temporary_database
from tests.relayproc import RelayProcess
from tests.test_cli_queue import cli

ROOT = Path(__file__).resolve().parent.parent
SENDER = "app@example.com"
A, B, C, D = (f"{name}@example.org" for name in "abcd")
RAW = (
    f"From: {SENDER}\r\nTo: {A}, {B}, {C}, {D}\r\nSubject: partial\r\n"
    "Message-ID: <partial-1@example.com>\r\n\r\nhello\r\n"
).encode()


@pytest.fixture(params=["sqlite", "sqlite-inline", "postgresql"])
def setting(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    inline = {"ESPRELAY_INLINE_ATTEMPT_SECONDS": "20"} if "inline" in request.param else {}
    if request.param.startswith("sqlite"):
        yield {"ESPRELAY_SPOOL_URL": f"sqlite:///{tmp_path / 'data' / 'spool.db'}", **inline}
        return
    with temporary_database() as url:
        yield {"ESPRELAY_SPOOL_URL": url, **inline}


@pytest.fixture
def plugin_path(tmp_path: Path) -> str:
    """A path on which the test provider is an installed distribution's entry point."""
    info = tmp_path / "plugin" / "esprelay_partial_test-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: esprelay-partial-test\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text(
        "[esprelay.providers]\npartialesp = tests.partial_esp:KIND\n"
    )
    return f"{info.parent}:{ROOT}"


class PerRecipientESP:
    """Accepts A, refuses B and D for good, and C for now the first time only."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.c_seen = 0

    def __call__(self, request: Recorded) -> Reply:
        body = request.json()
        if body["from"] == "":  # a bounce: accepted
            return Reply(200, {"id": "dsn-1"})
        refused = []
        for rcpt in body["to"]:
            if rcpt in (B, D):
                refused.append({"rcpt": rcpt, "permanent": True, "error": f"no mailbox {rcpt}"})
            elif rcpt == C:
                with self.lock:
                    self.c_seen += 1
                    first = self.c_seen == 1
                if first:
                    refused.append(
                        {"rcpt": rcpt, "permanent": False, "error": "busy", "retry_after": 1}
                    )
        with self.lock:
            number = self.c_seen
        return Reply(200, {"id": f"esp-{number}", "refused": refused})


def send(relay: RelayProcess) -> str:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        assert smtp.mail(SENDER)[0] == 250
        assert smtp.rcpt(A)[0] == 250
        assert smtp.rcpt(B, ["NOTIFY=FAILURE", "ORCPT=rfc822;orig-b@example.org"])[0] == 250
        assert smtp.rcpt(C)[0] == 250
        assert smtp.rcpt(D, ["NOTIFY=NEVER"])[0] == 250
        code, reply = smtp.data(RAW)
    assert code == 250, reply  # inline too: the refused ones are bounced, not told
    return reply.decode().rsplit(" ", 1)[1]


def test_partial_result_end_to_end(
    setting: dict[str, str], plugin_path: str, relay_factory: type[RelayProcess]
) -> None:
    with FakeESP(PerRecipientESP()) as esp:
        relay = relay_factory(
            {
                **setting,
                "PYTHONPATH": plugin_path,
                "ESPRELAY_PROVIDER": "partialesp",
                "ESPRELAY_PARTIALESP_URL": esp.url + "/send",
                "ESPRELAY_RETRY_INITIAL": "0.5",
                "ESPRELAY_RETRY_MAX": "1",
                "ESPRELAY_ADMIN_TOKEN": TOKEN,
            }
        ).start()
        message_id = send(relay)
        if "ESPRELAY_INLINE_ATTEMPT_SECONDS" in setting:
            assert esp.requests  # the 250 came after the first attempt's answer
        # The first attempt, the DSN for B, and C alone.
        esp.wait_for(3)
        relay.wait_for_log(rf"delivered id={message_id} provider=partialesp attempt=2 ")
        relay.wait_for_log(rf"bounce id=\w+ for={message_id} to=<{SENDER}> size=\d+ rcpts=1")
        shown = cli(relay, "queue", "show", message_id)
        with admin(relay) as client:
            api = client.get(f"/api/messages/{message_id}").json()
        samples = scrape(relay)
    bodies = [r.json() for r in esp.requests]
    sends = [b["to"] for b in bodies if b["from"] == SENDER]
    assert sends == [[A, B, C, D], [C]]  # A once; C retried alone
    [dsn] = [b for b in bodies if b["from"] == ""]
    assert dsn["to"] == [SENDER]
    report = email.message_from_bytes(base64.b64decode(dsn["raw"]), policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    blocks = report.get_payload()[1].get_payload()
    assert [b["Final-Recipient"] for b in blocks[1:]] == [f"rfc822; {B}"]
    assert blocks[1]["Original-Recipient"] == "rfc822;orig-b@example.org"
    assert f"no mailbox {B}" in blocks[1]["Diagnostic-Code"]
    assert A not in report.get_payload()[0].get_content()

    assert shown.returncode == 0, shown.stderr
    assert '"outcome": "partial"' in shown.stdout
    history = api["attempt_history"]
    assert [(a["outcome"], a["provider_message_id"]) for a in history] == [
        ("partial", "esp-1"),
        ("delivered", "esp-2"),
    ]
    assert f"accepted <{A}>" in history[0]["error"]
    assert f"bounced <{B}>" in history[0]["error"] and f"<{D}>" in history[0]["error"]
    assert f"retried <{C}>" in history[0]["error"]
    assert api["state"] == "delivered" and api["rcpt_tos"] == [C]

    log = relay.log
    assert f"id={message_id} provider=partialesp attempt=1 " in log
    assert "rcpts=1 provider_id=esp-1 rejected=3" in log
    assert f"rcpt=<{B}> action=bounce" in log and f"rcpt=<{C}> action=retry" in log
    assert "no bounce for" not in log
    fates = {
        fate: value(
            samples, "esprelay_delivery_partial_recipients_total", provider="partialesp", fate=fate
        )
        for fate in ("accepted", "bounced", "retried")
    }
    assert fates == {"accepted": 1, "bounced": 2, "retried": 1}


def test_mailjet_partial_result_end_to_end(relay_factory: type[RelayProcess]) -> None:
    """The same through a real adapter: Mailjet answers per message (one per blind
    recipient), refusing one for good and another for now on the first call only."""
    blind = (A, B, C)
    lock = threading.Lock()
    tries: dict[str, int] = {}

    def refuse(address: str) -> MailjetError | None:
        with lock:
            tries[address] = tries.get(address, 0) + 1
            first = tries[address] == 1
        if address == B:
            return (400, "mj-0013", f"invalid email {address}")
        if address == C and first:
            return (500, "mj-0000", "Internal error")
        return None

    key, secret = "mj-key-for-partial", "mj-secret-for-partial"
    with FakeESP(MailjetAPI(key, secret, refuse=refuse)) as esp:
        relay = relay_factory(
            {
                "ESPRELAY_PROVIDER": "mailjet",
                "ESPRELAY_MAILJET_API_KEY": key,
                "ESPRELAY_MAILJET_SECRET_KEY": secret,
                "ESPRELAY_MAILJET_API_URL": esp.url,
                "ESPRELAY_RETRY_INITIAL": "0.5",
                "ESPRELAY_RETRY_MAX": "1",
            }
        ).start()
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
            smtp.ehlo("client.test")
            smtp.mail(SENDER)
            for rcpt in blind:
                assert smtp.rcpt(rcpt)[0] == 250
            code, reply = smtp.data(
                f"From: {SENDER}\r\nTo: undisclosed-recipients:;\r\nSubject: p\r\n\r\nhi\r\n"
            )
        assert code == 250, reply
        message_id = reply.decode().rsplit(" ", 1)[1]
        relay.wait_for_log(rf"delivered id={message_id} provider=mailjet attempt=2 ")
        relay.wait_for_log(rf"bounce id=\w+ for={message_id} to=<{SENDER}> size=\d+ rcpts=1")
        esp.wait_for(3)
        requests = [r.json() for r in esp.requests]
    sends = [[m["To"][0]["Email"] for m in body["Messages"]] for body in requests]
    assert sends[0] == [A, B, C]
    assert [C] in sends[1:] and [SENDER] in sends[1:] and len(sends) == 3
    [dsn] = [body for body in requests if body["Messages"][0]["To"][0]["Email"] == SENDER]
    assert B in json.dumps(dsn) and f"<{A}>" not in json.dumps(dsn)


def test_passthrough_names_a_refused_recipient_in_the_reply(
    plugin_path: str, relay_factory: type[RelayProcess]
) -> None:
    """Without a spool nothing can retry a refused recipient alone: the DATA reply says
    the worst of it (B refused for good: 554 naming B), never a bare 250."""
    with FakeESP(PerRecipientESP()) as esp:
        relay = relay_factory(
            {
                "PYTHONPATH": plugin_path,
                "ESPRELAY_DELIVERY_MODE": "passthrough",
                "ESPRELAY_PROVIDER": "partialesp",
                "ESPRELAY_PARTIALESP_URL": esp.url + "/send",
            }
        ).start()
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
            smtp.ehlo("client.test")
            smtp.mail(SENDER)
            for rcpt in (A, B):
                assert smtp.rcpt(rcpt)[0] == 250
            code, reply = smtp.data(RAW)
        assert code == 554, reply
        assert f"<{B}> refused" in reply.decode()
        assert len(esp.requests) == 1
    assert "rejected id=" in relay.log and f"rcpt=<{B}>" in relay.log
