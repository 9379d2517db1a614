"""The envelope's extensions end to end: DSN parameters (RFC 3461) and SMTPUTF8 (RFC 6531).

Real esprelay processes, real SMTP clients (smtplib), fake ESP APIs on loopback: Mailgun's
(raw MIME, so a bounce can be read back with the email package) and SendGrid's (which
takes ASCII addresses only).
"""

from __future__ import annotations

import email
import email.policy
import json
import smtplib
from pathlib import Path

import pytest

from esprelay.testing.fakeesp import FakeESP, Recorded, Reply
from tests.providers import test_sendgrid
from tests.providers.test_mailgun import form_fields, mailgun_env
from tests.relayproc import RelayProcess
from tests.test_e2e_smtp import crlf, queued_id


def _mime(request: Recorded) -> bytes:
    [value] = [value for name, _, value in form_fields(request) if name == "message"]
    return value


def test_dsn_parameters_shape_the_bounce_of_a_permanent_failure(
    relay_factory: type[RelayProcess],
) -> None:
    """ENVID and ORCPT come back in the report, RET=FULL returns the message, and a
    recipient with NOTIFY=NEVER gets no report: with no other, no bounce at all."""
    with FakeESP(lambda r: Reply(400, {"message": "recipient suppressed"})) as esp:
        relay = relay_factory(mailgun_env(esp.url)).start()
        raw = crlf("From: app@example.com\nTo: a@example.org\nSubject: dsn\n\nthe body\n")
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
            smtp.ehlo("client.test")
            assert smtp.has_extn("dsn")
            assert smtp.mail("app@example.com", ["RET=FULL", "ENVID=Batch+2B42"])[0] == 250
            orcpt = "ORCPT=rfc822;List+2BA@Example.org"
            assert smtp.rcpt("a@example.org", ["NOTIFY=FAILURE,DELAY", orcpt])[0] == 250
            assert smtp.rcpt("b@example.org", ["NOTIFY=NEVER"])[0] == 250
            assert smtp.rcpt("c@example.org")[0] == 250
            code, reply = smtp.data(raw)
            assert code == 250
            failed_id = queued_id(reply.decode())

            [_, bounce] = esp.wait_for(2)
            report = email.message_from_bytes(_mime(bounce), policy=email.policy.default)
            text, status, returned = report.iter_parts()
            per_message, *per_recipient = status.get_payload()
            assert per_message["Original-Envelope-Id"] == "Batch+42"
            assert [b["Final-Recipient"] for b in per_recipient] == [
                "rfc822; a@example.org",
                "rfc822; c@example.org",  # no NOTIFY: a report (RFC 3461's default)
            ]
            assert per_recipient[0]["Original-Recipient"] == "rfc822;List+A@Example.org"
            assert "Original-Recipient" not in per_recipient[1]
            assert "b@example.org" not in text.get_content()
            assert returned.get_content_type() == "message/rfc822"
            assert raw in _mime(bounce)
            relay.wait_for_log(rf"bounce id=\w+ for={failed_id} to=<app@example.com>")

            # Only recipients that asked for no report: no bounce.
            assert smtp.mail("app@example.com", ["ENVID=quiet"])[0] == 250
            assert smtp.rcpt("d@example.org", ["NOTIFY=NEVER"])[0] == 250
            assert smtp.rcpt("e@example.org", ["NOTIFY=SUCCESS,DELAY"])[0] == 250
            code, reply = smtp.data(raw)
            assert code == 250
            quiet_id = queued_id(reply.decode())
        # Logged when the failure is handled, before any bounce could be queued.
        relay.wait_for_log(rf"no bounce for id={quiet_id}: NOTIFY asks for none")
        assert len(esp.requests) == 3


def _sendgrid(relay_factory: type[RelayProcess], esp: FakeESP, engine: str) -> RelayProcess:
    env = test_sendgrid.relay_env(esp, ESPRELAY_SMTP_ENGINE=engine)
    return relay_factory(env).start()


@pytest.mark.parametrize("engine", ["native", "aiosmtpd"])
def test_no_smtputf8_where_the_provider_cannot_carry_utf8(
    relay_factory: type[RelayProcess], engine: str
) -> None:
    """SendGrid takes ASCII addresses only: SMTPUTF8 is not advertised, a UTF-8 local
    part is refused at MAIL and RCPT (553 5.6.7), and an internationalised domain
    reaches SendGrid as Punycode."""
    with FakeESP(test_sendgrid.SendGridAPI()) as esp:
        relay = _sendgrid(relay_factory, esp, engine)
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
            smtp.command_encoding = "utf-8"  # smtplib's choice when SMTPUTF8 is offered
            smtp.ehlo("client.test")
            assert not smtp.has_extn("smtputf8")
            assert smtp.has_extn("dsn")
            # Without the parameter, as RFC 6531 wants of a client here: 553 5.6.7.
            code, reply = smtp.docmd("MAIL FROM:<jos\u00e9@example.com>")
            assert (code, reply[:5]) == (553, b"5.6.7")
            # A client that sends the parameter anyway: still no UTF-8 local part.
            code, reply = smtp.docmd("MAIL FROM:<jos\u00e9@example.com> SMTPUTF8")
            assert (code, reply[:5]) == (553, b"5.6.7")
            assert smtp.docmd("MAIL FROM:<app@example.com> SMTPUTF8")[0] == 250
            code, reply = smtp.docmd("RCPT TO:<jos\u00e9@example.org>")
            assert (code, reply[:5]) == (553, b"5.6.7")
            # A domain with no A-label form (IDNA 2008 disallows symbols): refused too.
            code, reply = smtp.docmd("RCPT TO:<a@\u2603.example>")
            assert (code, reply[:5]) == (553, b"5.6.7")
            assert smtp.docmd("RCPT TO:<a@b\u00fccher.de>")[0] == 250
            raw = crlf("From: app@example.com\nTo: a@example.org\nSubject: idn\n\nx\n")
            code, _ = smtp.data(raw)
            assert code == 250
        [request] = esp.wait_for(1)
        sent = test_sendgrid.recipients(request.json())
        assert sent["bcc"] + sent["to"] == ["a@xn--bcher-kva.de"]


def test_smtputf8_carried_where_the_provider_can(relay: RelayProcess) -> None:
    """The outbox takes UTF-8 addresses as they are: SMTPUTF8 advertised, kept intact."""
    raw = crlf("From: app@example.com\nTo: x@example.org\nSubject: eai\n\nx\n")
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
        smtp.command_encoding = "utf-8"
        smtp.ehlo("client.test")
        assert smtp.has_extn("smtputf8")
        assert smtp.docmd("MAIL FROM:<jos\u00e9@example.com> SMTPUTF8")[0] == 250
        assert smtp.docmd("RCPT TO:<\u7528\u6237@\u4f8b\u3048.jp>")[0] == 250
        code, reply = smtp.data(raw)
        assert code == 250
    message_id = queued_id(reply.decode())
    relay.wait_delivered(1)
    record = json.loads((relay.outbox / f"{message_id}.json").read_text())
    assert record["mail_from"] == "jos\u00e9@example.com"
    assert record["rcpt_tos"] == ["\u7528\u6237@\u4f8b\u3048.jp"]


def test_routes_decide_which_utf8_local_parts_are_carried(
    relay_factory: type[RelayProcess], tmp_path: Path
) -> None:
    """With a routes file: SMTPUTF8 is advertised only if every provider carries UTF-8;
    a UTF-8 local part is taken for a recipient whose route can carry it, refused for
    one whose route cannot, and refused as a sender (it may go anywhere)."""
    with FakeESP(test_sendgrid.SendGridAPI()) as esp:
        routes = tmp_path / "routes.toml"
        routes.write_text(
            f'[providers.box]\nkind = "outbox"\ndir = "{tmp_path / "box"}"\n'
            f'[providers.sg]\nkind = "sendgrid"\napi_key_env = "TEST_SG_KEY"\n'
            f'api_url = "{esp.url}"\n'
            '[[routes]]\nrecipient_domains = ["eai.example"]\nproviders = ["box"]\n'
            '[default]\nproviders = ["sg"]\n'
        )
        relay = relay_factory(
            {"ESPRELAY_ROUTES_FILE": str(routes), "TEST_SG_KEY": test_sendgrid.KEY}
        ).start()
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
            smtp.command_encoding = "utf-8"
            smtp.ehlo("client.test")
            assert not smtp.has_extn("smtputf8")
            code, reply = smtp.docmd("MAIL FROM:<jos\u00e9@example.com> SMTPUTF8")
            assert (code, reply[:5]) == (553, b"5.6.7")
            assert smtp.docmd("MAIL FROM:<app@example.com> SMTPUTF8")[0] == 250
            assert smtp.docmd("RCPT TO:<jos\u00e9@eai.example>")[0] == 250
            code, reply = smtp.docmd("RCPT TO:<jos\u00e9@example.org>")
            assert (code, reply[:5]) == (553, b"5.6.7")
            assert smtp.docmd("RCPT TO:<a@b\u00fccher.de>")[0] == 250
            raw = crlf("From: app@example.com\nTo: a@example.org\nSubject: routes\n\nx\n")
            assert smtp.data(raw)[0] == 250
        [request] = esp.wait_for(1)
        sent = test_sendgrid.recipients(request.json())
        assert sent["bcc"] + sent["to"] == ["a@xn--bcher-kva.de"]
        relay.wait_for_log(r"delivered id=\S+ provider=box")
        [record] = [json.loads(p.read_text()) for p in (tmp_path / "box").glob("*.json")]
        assert record["rcpt_tos"] == ["jos\u00e9@eai.example"]
