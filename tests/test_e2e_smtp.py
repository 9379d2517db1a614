"""A real esprelay process, real SMTP clients, the outbox as the far end."""

from __future__ import annotations

import json
import smtplib
import subprocess

import pytest

from tests.conftest import require_tool
from tests.relayproc import RelayProcess


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


def send_raw(
    relay: RelayProcess, mail_from: str, rcpts: list[str], raw: bytes, **kw: object
) -> str:
    """Send bytes as-is (smtplib dot-stuffs them); return the DATA reply text."""
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        code, _ = smtp.mail(mail_from, **kw)  # type: ignore[arg-type]
        assert code == 250
        for rcpt in rcpts:
            code, reply = smtp.rcpt(rcpt)
            assert code == 250, reply
        code, reply = smtp.data(raw)
        assert code == 250, reply
        return reply.decode()


def queued_id(reply: str) -> str:
    assert "queued as " in reply, reply
    return reply.rsplit("queued as ", 1)[1].strip()


def test_ehlo_advertises_extensions(relay: RelayProcess) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
        code, _ = smtp.ehlo("client.test")
        assert code == 250
        for ext in ("size", "8bitmime", "smtputf8", "pipelining", "dsn"):
            assert smtp.has_extn(ext), ext
        assert int(smtp.esmtp_features["size"]) == 25 * 1024 * 1024


def test_message_delivered_to_outbox_with_metadata(relay: RelayProcess) -> None:
    raw = crlf("From: app@example.com\nTo: ops@example.org\nSubject: hi\n\nhello\n")
    message_id = queued_id(send_raw(relay, "app@example.com", ["ops@example.org"], raw))
    relay.wait_delivered(1)
    assert (relay.outbox / f"{message_id}.eml").read_bytes() == raw
    record = json.loads((relay.outbox / f"{message_id}.json").read_text())
    assert record["mail_from"] == "app@example.com"
    assert record["rcpt_tos"] == ["ops@example.org"]
    assert record["provider_message_id"] == f"outbox-{message_id}"
    relay.wait_for_log(rf"delivered id={message_id} provider=outbox attempt=1")
    assert "hello" not in relay.log  # never the body in logs


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(
            crlf(
                "From: a@example.com\nTo: b@example.org\nSubject: 8bit\n"
                "Content-Type: text/plain; charset=iso-8859-1\n"
                "Content-Transfer-Encoding: 8bit\n\n"
            )
            + "Grüße aus Köln, ½ € ÿ\r\n".encode("latin-1", "replace")
            + b"\x80\x81\xfe\xff raw high bytes\r\n",
            id="8bit",
        ),
        pytest.param(
            crlf(
                "From: Jürgen <jürgen@bücher.example>\nTo: 用户@例子.广告\n"
                "Subject: 日本語の件名\nContent-Type: text/plain; charset=utf-8\n"
                "Content-Transfer-Encoding: 8bit\n\nこんにちは\n"
            ),
            id="smtputf8",
        ),
        pytest.param(
            crlf("From: a@example.com\nTo: b@example.org\nSubject: long\n\n")
            + b"x" * 998
            + b"\r\n"
            + b"y" * 5000
            + b"\r\n",
            id="long-lines",
        ),
        pytest.param(
            crlf("From: a@example.com\nTo: b@example.org\nSubject: dots\n\n")
            + b".leading dot\r\n..two dots\r\n.\r\n \r\n.x\r\n",
            id="dot-lines",
        ),
        pytest.param(
            crlf("From: a@example.com\nTo: b@example.org\nSubject: big\n\n")
            + b"".join(
                f"{i:08d} ".encode() + bytes(range(33, 127)) + b"\r\n" for i in range(60000)
            ),
            id="several-MB",
        ),
    ],
)
def test_fidelity_byte_identical(relay: RelayProcess, raw: bytes) -> None:
    smtputf8 = b"\xe7\x94\xa8" in raw
    rcpt = "用户@例子.广告" if smtputf8 else "b@example.org"
    sender = "jürgen@bücher.example" if smtputf8 else "a@example.com"
    options = ["SMTPUTF8", "BODY=8BITMIME"] if smtputf8 else ["BODY=8BITMIME"]
    message_id = queued_id(send_raw(relay, sender, [rcpt], raw, options=options))
    relay.wait_delivered(1)
    assert (relay.outbox / f"{message_id}.eml").read_bytes() == raw
    record = json.loads((relay.outbox / f"{message_id}.json").read_text())
    assert record["rcpt_tos"] == [rcpt]
    assert record["mail_from"] == sender


def test_bcc_envelope_only_recipient(relay: RelayProcess) -> None:
    raw = crlf("From: app@example.com\nTo: visible@example.org\nSubject: bcc\n\nbody\n")
    rcpts = ["visible@example.org", "hidden@example.net"]
    message_id = queued_id(send_raw(relay, "app@example.com", rcpts, raw))
    relay.wait_delivered(1)
    eml = (relay.outbox / f"{message_id}.eml").read_bytes()
    assert eml == raw
    assert b"hidden@example.net" not in eml
    record = json.loads((relay.outbox / f"{message_id}.json").read_text())
    assert record["rcpt_tos"] == rcpts


def test_null_sender_accepted(relay: RelayProcess) -> None:
    raw = crlf("From: MAILER-DAEMON@example.com\nTo: b@example.org\nSubject: dsn\n\nx\n")
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        assert smtp.docmd("MAIL FROM:<>")[0] == 250
        assert smtp.rcpt("b@example.org")[0] == 250
        code, reply = smtp.data(raw)
    assert code == 250
    message_id = queued_id(reply.decode())
    relay.wait_delivered(1)
    record = json.loads((relay.outbox / f"{message_id}.json").read_text())
    assert record["mail_from"] == ""


def test_pipelined_transaction(relay: RelayProcess) -> None:
    """Commands sent in one write (RFC 2920) are answered in order."""
    import socket

    with (
        socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock,
        sock.makefile("rb") as stream,
    ):
        assert stream.readline().startswith(b"220")
        sock.sendall(b"EHLO client.test\r\n")
        while not stream.readline().startswith(b"250 "):
            pass
        sock.sendall(
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
            b"RCPT TO:<c@example.org>\r\nDATA\r\n"
        )
        replies = [stream.readline()[:3] for _ in range(4)]
        assert replies == [b"250", b"250", b"250", b"354"]
        sock.sendall(b"Subject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        assert stream.readline().startswith(b"250 2.0.0 Ok: queued as")
        assert stream.readline().startswith(b"221")
    relay.wait_delivered(1)


def test_swaks_client(relay: RelayProcess) -> None:
    swaks = require_tool("swaks")
    result = subprocess.run(
        [
            swaks,
            "--server",
            f"127.0.0.1:{relay.port}",
            "--from",
            "app@example.com",
            "--to",
            "ops@example.org,second@example.org",
            "--header",
            "Subject: from swaks",
            "--body",
            "sent by swaks",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "queued as" in result.stdout
    ids = relay.wait_delivered(1)
    eml = (relay.outbox / f"{ids[0]}.eml").read_bytes()
    assert b"Subject: from swaks" in eml
    assert b"sent by swaks" in eml
    record = json.loads((relay.outbox / f"{ids[0]}.json").read_text())
    assert record["rcpt_tos"] == ["ops@example.org", "second@example.org"]


def test_send_test_command(relay: RelayProcess) -> None:
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("ESPRELAY_")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "esprelay",
            "send-test",
            "--to",
            "ops@example.org",
            "--server",
            f"127.0.0.1:{relay.port}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
        cwd=relay.workdir,
    )
    assert result.returncode == 0, result.stderr
    assert "queued as" in result.stdout
    ids = relay.wait_delivered(1)
    assert b"esprelay test message" in (relay.outbox / f"{ids[0]}.eml").read_bytes()
