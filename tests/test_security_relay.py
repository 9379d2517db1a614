"""No open relay: only trusted networks or authenticated users may submit mail."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator

import pytest

from tests.relayproc import RelayProcess
from tests.securitykit import ONLY_LOCALHOST, UNTRUSTED, Dialog, crlf, smtp_client, spooled

MESSAGE = crlf("From: a@example.com\nTo: b@example.org\nSubject: relay?\n\nbody\n")

# (MAIL FROM argument, RCPT TO argument): every trick a relay tester tries.
ATTEMPTS = [
    pytest.param("<a@example.com>", "<victim@example.org>", id="plain"),
    pytest.param("<>", "<victim@example.org>", id="null-sender"),
    pytest.param(
        "<@a.example:b@c.example>", "<@relay.example:victim@example.org>", id="source-route"
    ),
    pytest.param("<a@example.com>", "<victim%example.org@esprelay>", id="percent-hack"),
    pytest.param("<a@example.com>", "<victim%example.org>", id="percent-no-domain"),
    pytest.param("<a@example.com>", '<"victim@example.org">', id="quoted-local-only"),
    pytest.param("<a@example.com>", '<"victim@example.org"@esprelay>', id="quoted-local"),
    pytest.param("<a@example.com>", "<example.org!victim@esprelay>", id="bang-path"),
    pytest.param("<a@example.com>", "victim@example.org", id="no-brackets"),
    pytest.param("<a@example.com>", "<victim@[127.0.0.1]>", id="address-literal"),
]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    """One relay for the refusal tests (none of them may queue anything)."""
    relay = RelayProcess(tmp_path_factory.mktemp("guarded"), ONLY_LOCALHOST).start()
    yield relay
    relay.kill()


@pytest.mark.parametrize(("sender", "rcpt"), ATTEMPTS)
def test_untrusted_client_cannot_relay(guarded: RelayProcess, sender: str, rcpt: str) -> None:
    with smtp_client(guarded, source=UNTRUSTED) as smtp:
        smtp.ehlo("attacker.test")
        assert "auth" not in smtp.esmtp_features  # nothing to authenticate with
        code, reply = smtp.docmd(f"MAIL FROM:{sender}")
        assert code == 530, reply
        assert smtp.docmd(f"RCPT TO:{rcpt}")[0] in (503, 530)
        assert smtp.docmd("DATA")[0] in (503, 530)
        # HELO (not EHLO) does not change anything.
        smtp.helo("attacker.test")
        assert smtp.docmd(f"MAIL FROM:{sender}")[0] == 530
    assert spooled(guarded) == []
    assert "relay refused: client=127.0.0.2" in guarded.log


def test_untrusted_pipelined_transaction_never_queues(guarded: RelayProcess) -> None:
    """The whole transaction in one write: the body lines must not become a message."""
    dialog = Dialog(guarded.port, source=UNTRUSTED)
    assert dialog.reply().startswith(b"220")
    dialog.send(
        b"EHLO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<v@example.org>\r\nDATA\r\n"
        + MESSAGE
        + b".\r\nQUIT\r\n"
    )
    replies = b""
    while chunk := dialog.reply():
        replies += chunk
    dialog.close()
    assert b"530" in replies
    assert b"250 2.0.0" not in replies and b"354" not in replies
    assert spooled(guarded) == []


def test_trusted_client_may_relay(relay_factory: type[RelayProcess]) -> None:
    """The positive control: the same transaction from 127.0.0.1 is queued."""
    guarded = relay_factory(ONLY_LOCALHOST).start()
    with smtp_client(guarded) as smtp:
        smtp.ehlo("app.test")
        smtp.sendmail("a@example.com", ["b@example.org"], MESSAGE)
    guarded.wait_delivered(1)
    assert len(spooled(guarded)) == 1


@pytest.mark.parametrize(
    "rcpt",
    [
        # (A source route is dropped by aiosmtpd, as RFC 5321 3.6.1 allows: the recipient
        # is then the plain address after the colon, so it cannot route anything.)
        "<victim%example.org@esprelay>",
        "<example.org!victim@esprelay>",
    ],
)
def test_routing_tricks_refused_even_when_trusted(guarded: RelayProcess, rcpt: str) -> None:
    with smtp_client(guarded) as smtp:
        smtp.ehlo("app.test")
        assert smtp.docmd("MAIL FROM:<a@example.com>")[0] == 250
        code, reply = smtp.docmd(f"RCPT TO:{rcpt}")
        assert code in (501, 553), reply
    assert spooled(guarded) == []


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(b"MAIL FROM:<a@example.com>\rRCPT TO:<evil@example.net>", id="bare-CR"),
        pytest.param(b"MAIL FROM:<a@example.com\x00evil>", id="NUL"),
        pytest.param(b"MAIL FROM:<a@example.com\rBcc: evil@example.net>", id="CR-in-address"),
        pytest.param(b"MAIL FROM:<a\x7f@example.com>", id="DEL"),
    ],
)
def test_envelope_header_injection_refused(guarded: RelayProcess, command: bytes) -> None:
    dialog = Dialog(guarded.port)
    assert dialog.reply().startswith(b"220")
    assert dialog.command(b"EHLO app.test").startswith(b"250")
    reply = dialog.command(command)
    assert reply[:1] == b"5", reply
    dialog.close()
    assert spooled(guarded) == []


def test_global_sender_domain_rule(relay_factory: type[RelayProcess]) -> None:
    relay = relay_factory({"ESPRELAY_ALLOWED_SENDER_DOMAINS": "example.com, @corp.example"}).start()
    with smtp_client(relay) as smtp:
        smtp.ehlo("app.test")
        code, reply = smtp.docmd("MAIL FROM:<a@evil.example>")
        assert code == 553, reply
        smtp.rset()
        # An allowed envelope sender with a From header in another domain: 550 at DATA.
        with pytest.raises(smtplib.SMTPDataError) as refused:
            smtp.sendmail(
                "a@example.com", ["b@example.org"], crlf("From: boss@evil.example\n\nx\n")
            )
        assert refused.value.smtp_code == 550
        smtp.sendmail("a@corp.example", ["b@example.org"], crlf("From: A <a@EXAMPLE.com>\n\nx\n"))
    relay.wait_delivered(1)
    assert len(spooled(relay)) == 1
