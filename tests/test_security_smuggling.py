"""Hostile input: SMTP smuggling, long lines, error budgets, connection limits, slow clients.

Decision: a bare CR or bare LF never ends DATA (aiosmtpd >= 1.4.5 only ends at
<CRLF>.<CRLF>), and once the message is complete every bare CR/LF is *normalised* to
CRLF, never rejected, so legacy senders keep working and no later reader sees a line
ending that could be taken for the end of the message.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.relayproc import RelayProcess
from tests.securitykit import ONLY_LOCALHOST, UNTRUSTED, Dialog, crlf, spool_show, spooled

SMUGGLED = (
    b"MAIL FROM:<smuggled@evil.example>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
    b"From: ceo@example.com\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n"
)


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    proc = RelayProcess(tmp_path_factory.mktemp("smuggling")).start()
    yield proc
    proc.kill()


def open_data(relay: RelayProcess) -> Dialog:
    dialog = Dialog(relay.port)
    assert dialog.reply().startswith(b"220")
    assert dialog.command(b"EHLO client.test").startswith(b"250")
    assert dialog.command(b"MAIL FROM:<app@example.com>").startswith(b"250")
    assert dialog.command(b"RCPT TO:<ops@example.org>").startswith(b"250")
    assert dialog.command(b"DATA").startswith(b"354")
    return dialog


def only_crlf(data: bytes) -> bool:
    crlfs = data.count(b"\r\n")
    return data.count(b"\r") == crlfs and data.count(b"\n") == crlfs


@pytest.mark.parametrize(
    "fake_end",
    [
        pytest.param(b"\n.\n", id="LF.LF"),
        pytest.param(b"\n.\r\n", id="LF.CRLF"),
        pytest.param(b"\r\n.\n", id="CRLF.LF"),
        pytest.param(b"\r.\r", id="CR.CR"),
        pytest.param(b"\r.\r\n", id="CR.CRLF"),
        pytest.param(b"\r\n.\r", id="CRLF.CR"),
        pytest.param(b"\n.\r", id="LF.CR"),
        pytest.param(b"\r\n.\r\r\n", id="CRLF.CR-CRLF"),
    ],
)
def test_smuggling_variant_stays_one_message(relay: RelayProcess, fake_end: bytes) -> None:
    before = len(spooled(relay))
    dialog = open_data(relay)
    dialog.send(b"From: app@example.com\r\nSubject: carrier\r\n\r\nfirst part" + fake_end)
    dialog.send(SMUGGLED + b".\r\nQUIT\r\n")
    first = dialog.reply()
    assert first.startswith(b"250 2.0.0 Ok: queued as"), first
    # The next reply answers QUIT: nothing in between was taken for a command.
    assert dialog.reply().startswith(b"221")
    dialog.close()
    message_id = first.decode().rsplit(" ", 1)[1].strip()
    messages = spooled(relay)
    assert len(messages) == before + 1
    assert all(m["mail_from"] != "smuggled@evil.example" for m in messages)
    relay.wait_for_log(rf"delivered id={message_id}")
    eml = (relay.outbox / f"{message_id}.eml").read_bytes()
    assert b"first part" in eml and b"MAIL FROM:<smuggled@evil.example>" in eml
    assert only_crlf(eml)  # normalised: no bare CR or LF left for a later hop
    record = json.loads((relay.outbox / f"{message_id}.json").read_text())
    assert record["rcpt_tos"] == ["ops@example.org"]
    assert spool_show(relay, message_id)["meta"]["repairs"] == [  # type: ignore[index]
        "bare CR/LF normalised to CRLF"
    ]


def test_bare_lf_message_normalised_not_rejected(relay: RelayProcess) -> None:
    """A legacy sender writing LF-only lines: same rule, the message is kept."""
    dialog = open_data(relay)
    dialog.send(b"From: app@example.com\nSubject: lf only\n\nline one\nline two\n\r\n.\r\n")
    reply = dialog.reply()
    assert reply.startswith(b"250 2.0.0"), reply
    dialog.close()
    message_id = reply.decode().rsplit(" ", 1)[1].strip()
    relay.wait_for_log(rf"delivered id={message_id}")
    eml = (relay.outbox / f"{message_id}.eml").read_bytes()
    assert eml == crlf("From: app@example.com\nSubject: lf only\n\nline one\nline two\n\n")


def test_dot_stuffed_line_that_looks_like_the_end(relay: RelayProcess) -> None:
    """`..` at the start of a line is a real dot, and `.x` is not the end either."""
    dialog = open_data(relay)
    dialog.send(b"Subject: dots\r\n\r\n..\r\n.x\r\n. \r\nend\r\n.\r\n")
    reply = dialog.reply()
    assert reply.startswith(b"250 2.0.0"), reply
    dialog.close()
    message_id = reply.decode().rsplit(" ", 1)[1].strip()
    relay.wait_for_log(rf"delivered id={message_id}")
    eml = (relay.outbox / f"{message_id}.eml").read_bytes()
    assert eml == b"Subject: dots\r\n\r\n.\r\nx\r\n \r\nend\r\n"


def test_undecodable_bytes_in_commands_answered_not_crashed(relay: RelayProcess) -> None:
    """Found by the fuzzer: aiosmtpd's VRFY echoed bytes it could not encode (451 + traceback)."""
    dialog = Dialog(relay.port)
    dialog.reply()
    assert dialog.command(b"EHLO client.test").startswith(b"250")
    assert dialog.command(b"VRFY <\xff\xfe").startswith(b"252")
    assert dialog.command(b"VRFY <a@example.org>") == (
        b"252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery\r\n"
    )
    assert dialog.command(b"RCPT TO:<\xff@example.org>").startswith(b"503")
    assert dialog.command(b"HELP VRFY").startswith(b"250 Syntax: VRFY")
    dialog.close()
    assert "Traceback" not in relay.log


def test_command_line_too_long(relay: RelayProcess) -> None:
    dialog = Dialog(relay.port)
    dialog.reply()
    assert dialog.command(b"EHLO " + b"x" * 600).startswith(b"500")
    assert dialog.command(b"NOOP " + b"y" * 100_000).startswith(b"500")  # beyond the buffer
    assert dialog.command(b"EHLO client.test").startswith(b"250")  # still usable
    dialog.close()


@pytest.mark.parametrize("engine", ["native", "aiosmtpd"])
def test_errors_per_session_then_421(relay_factory: type[RelayProcess], engine: str) -> None:
    relay = relay_factory({"ESPRELAY_MAX_ERRORS": "3", "ESPRELAY_SMTP_ENGINE": engine}).start()
    dialog = Dialog(relay.port)
    dialog.reply()
    dialog.command(b"EHLO client.test")
    assert dialog.command(b"RCPT TO:<a@example.org>").startswith(b"503")
    assert dialog.command(b"MAIL FROM:<broken").startswith(b"5")
    assert dialog.command(b"DATA").startswith(b"503")
    assert dialog.reply().startswith(b"421 4.7.0 Too many errors")
    assert dialog.closed()
    dialog.close()
    relay.wait_for_log("too many errors: closing client=127.0.0.1")


def greet(port: int, source: str = "127.0.0.1") -> tuple[Dialog, bytes]:
    dialog = Dialog(port, source=source)
    return dialog, dialog.reply()


@pytest.mark.parametrize("engine", ["native", "aiosmtpd"])
def test_connections_per_client_limited(relay_factory: type[RelayProcess], engine: str) -> None:
    # Trusted networks are exempt (like Postfix's $mynetworks), so limit 127.0.0.2/.3.
    relay = relay_factory(
        {
            "ESPRELAY_MAX_CONNECTIONS_PER_CLIENT": "2",
            "ESPRELAY_SMTP_ENGINE": engine,
            **ONLY_LOCALHOST,
        }
    ).start()
    first, reply1 = greet(relay.port, source=UNTRUSTED)
    second, reply2 = greet(relay.port, source=UNTRUSTED)
    assert reply1.startswith(b"220") and reply2.startswith(b"220")
    third, reply3 = greet(relay.port, source=UNTRUSTED)
    assert reply3.startswith(b"421 4.7.0 Too many connections"), reply3
    assert third.closed()
    other, reply4 = greet(relay.port, source="127.0.0.3")  # another client is not affected
    assert reply4.startswith(b"220")
    first.command(b"QUIT")
    first.close()
    deadline = time.monotonic() + 10
    while True:  # the slot frees once the server has seen the close
        again, reply5 = greet(relay.port, source=UNTRUSTED)
        again.close()
        if reply5.startswith(b"220") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert reply5.startswith(b"220")
    for dialog in (second, third, other):
        dialog.close()


def test_trusted_clients_exempt_from_per_client_limit(relay_factory: type[RelayProcess]) -> None:
    """A local app on a trusted network may open more sessions than the per-client limit
    (Postfix exempts $mynetworks the same way); the total limit still applies."""
    relay = relay_factory(
        {"ESPRELAY_MAX_CONNECTIONS_PER_CLIENT": "2", "ESPRELAY_MAX_CONNECTIONS": "4"}
    ).start()
    held = [greet(relay.port) for _ in range(4)]
    assert all(reply.startswith(b"220") for _, reply in held), held
    refused, reply = greet(relay.port)
    assert reply.startswith(b"421"), reply
    for dialog in [*(d for d, _ in held), refused]:
        dialog.close()


@pytest.mark.parametrize("engine", ["native", "aiosmtpd"])
def test_connections_in_total_limited(relay_factory: type[RelayProcess], engine: str) -> None:
    relay = relay_factory({"ESPRELAY_MAX_CONNECTIONS": "2", "ESPRELAY_SMTP_ENGINE": engine}).start()
    held = [greet(relay.port)[0], greet(relay.port, source="127.0.0.2")[0]]
    refused, reply = greet(relay.port, source="127.0.0.3")
    assert reply.startswith(b"421"), reply
    for dialog in [*held, refused]:
        dialog.close()


@pytest.mark.parametrize("engine", ["native", "aiosmtpd"])
def test_slow_data_cut_off_by_deadline(relay_factory: type[RelayProcess], engine: str) -> None:
    """Slowloris in DATA: a line every 0.2 s resets no timer; the DATA deadline ends it."""
    relay = relay_factory({"ESPRELAY_DATA_TIMEOUT": "1s", "ESPRELAY_SMTP_ENGINE": engine}).start()
    dialog = open_data(relay)
    started = time.monotonic()
    replies = b""
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for _ in range(100):
            dialog.send(b"x" * 10 + b"\r\n")
            time.sleep(0.2)
    dialog.sock.settimeout(5)
    replies = dialog.stream.read()
    dialog.close()
    assert b"421 4.4.2" in replies
    assert time.monotonic() - started < 10
    assert spooled(relay) == []


@pytest.mark.parametrize("engine", ["native", "aiosmtpd"])
def test_slow_command_cut_off_by_idle_timeout(
    relay_factory: type[RelayProcess], engine: str
) -> None:
    relay = relay_factory({"ESPRELAY_SMTP_TIMEOUT": "1s", "ESPRELAY_SMTP_ENGINE": engine}).start()
    dialog = Dialog(relay.port)
    dialog.reply()
    started = time.monotonic()
    try:
        for byte in b"EHLO a-very-slow-client.example":
            dialog.send(bytes([byte]))
            time.sleep(0.2)
    except (BrokenPipeError, ConnectionResetError):
        pass
    dialog.sock.settimeout(5)
    rest = dialog.stream.read()
    assert b"421 4.4.2" in rest
    assert time.monotonic() - started < 8
    dialog.close()
