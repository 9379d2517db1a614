"""Bad input gets the right reply or a clean close, and the server stays up."""

from __future__ import annotations

import smtplib
import socket
import time

import pytest

from tests.relayproc import RelayProcess


def connect(relay: RelayProcess) -> tuple[socket.socket, object]:
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    stream = sock.makefile("rb")
    assert stream.readline().startswith(b"220")
    return sock, stream


def command(sock: socket.socket, stream: object, line: bytes) -> bytes:
    sock.sendall(line + b"\r\n")
    reply = b""
    while True:
        got = stream.readline()  # type: ignore[attr-defined]
        reply += got
        if got[3:4] != b"-":
            return reply


def assert_still_serving(relay: RelayProcess) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
        assert smtp.noop()[0] == 250
    assert relay.proc is not None and relay.proc.poll() is None


@pytest.fixture
def small_relay(relay_factory: type[RelayProcess]) -> RelayProcess:
    return relay_factory(
        {
            "ESPRELAY_MAX_MESSAGE_SIZE": "64K",
            "ESPRELAY_MAX_RECIPIENTS": "3",
            "ESPRELAY_SMTP_TIMEOUT": "1s",
            "ESPRELAY_DATA_TIMEOUT": "2s",
        }
    ).start()


def test_size_refused_at_mail(small_relay: RelayProcess) -> None:
    sock, stream = connect(small_relay)
    with sock, stream:  # type: ignore[attr-defined]
        assert b"SIZE 65536" in command(sock, stream, b"EHLO client.test")
        reply = command(sock, stream, b"MAIL FROM:<a@example.com> SIZE=70000")
        assert reply.startswith(b"552")
        assert command(sock, stream, b"MAIL FROM:<a@example.com> SIZE=1000").startswith(b"250")
    assert_still_serving(small_relay)


def test_size_refused_at_data(small_relay: RelayProcess) -> None:
    with smtplib.SMTP("127.0.0.1", small_relay.port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("a@example.com")
        smtp.rcpt("b@example.org")
        code, _ = smtp.data(b"Subject: big\r\n\r\n" + (b"x" * 76 + b"\r\n") * 1000)
        assert code == 552
        # The session goes on: a small message still gets through.
        smtp.mail("a@example.com")
        smtp.rcpt("b@example.org")
        assert smtp.data(b"Subject: small\r\n\r\nok\r\n")[0] == 250
    ids = small_relay.wait_delivered(1)
    assert len(ids) == 1
    time.sleep(0.3)
    assert len(small_relay.delivered_ids()) == 1


def test_too_many_recipients(small_relay: RelayProcess) -> None:
    with smtplib.SMTP("127.0.0.1", small_relay.port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("a@example.com")
        codes = [smtp.rcpt(f"r{i}@example.org")[0] for i in range(5)]
        assert codes == [250, 250, 250, 452, 452]
        assert smtp.data(b"Subject: x\r\n\r\nx\r\n")[0] == 250
    small_relay.wait_delivered(1)


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"MAIL FROM:<not an address>", b"553"),
        (b"MAIL FROM:<a@>", b"553"),
        (b"MAIL FROM:<@example.com>", b"553"),
        (b"MAIL FROM:", b"501"),
        (b"MAIL FROM:<a@example.com> BOGUS=1", b"555"),
        (b"MAIL TO:<a@example.com>", b"501"),
    ],
)
def test_malformed_sender(relay: RelayProcess, line: bytes, code: bytes) -> None:
    sock, stream = connect(relay)
    with sock, stream:  # type: ignore[attr-defined]
        command(sock, stream, b"EHLO client.test")
        assert command(sock, stream, line).startswith(code)


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"RCPT TO:<nodomain>", b"553"),
        (b"RCPT TO:<a@b@example.com>", b"553"),
        (b"RCPT TO:<a@-bad.example>", b"553"),
        (b"RCPT TO:<>", b"553"),
        (b"RCPT TO:", b"501"),
        (b"RCPT FROM:<a@example.com>", b"501"),
    ],
)
def test_malformed_recipient(relay: RelayProcess, line: bytes, code: bytes) -> None:
    sock, stream = connect(relay)
    with sock, stream:  # type: ignore[attr-defined]
        command(sock, stream, b"EHLO client.test")
        assert command(sock, stream, b"MAIL FROM:<a@example.com>").startswith(b"250")
        assert command(sock, stream, line).startswith(code)
        assert command(sock, stream, b"DATA").startswith(b"503")


def test_commands_out_of_order(relay: RelayProcess) -> None:
    sock, stream = connect(relay)
    with sock, stream:  # type: ignore[attr-defined]
        assert command(sock, stream, b"MAIL FROM:<a@example.com>").startswith(b"503")
        command(sock, stream, b"EHLO client.test")
        assert command(sock, stream, b"RCPT TO:<b@example.org>").startswith(b"503")
        assert command(sock, stream, b"DATA").startswith(b"503")
        assert command(sock, stream, b"FOO bar").startswith(b"500")


def test_disconnect_in_the_middle_of_data(relay: RelayProcess) -> None:
    sock, stream = connect(relay)
    command(sock, stream, b"EHLO client.test")
    command(sock, stream, b"MAIL FROM:<a@example.com>")
    command(sock, stream, b"RCPT TO:<b@example.org>")
    assert command(sock, stream, b"DATA").startswith(b"354")
    sock.sendall(b"Subject: cut\r\n\r\nhalf a message")
    stream.close()  # type: ignore[attr-defined]
    sock.close()
    time.sleep(0.5)
    assert_still_serving(relay)
    assert relay.delivered_ids() == []
    assert "accepted id=" not in relay.log


def test_silent_client_is_disconnected(small_relay: RelayProcess) -> None:
    sock, stream = connect(small_relay)
    with sock, stream:  # type: ignore[attr-defined]
        sock.settimeout(10)
        started = time.monotonic()
        rest = stream.read()  # type: ignore[attr-defined]
        assert time.monotonic() - started < 8
        assert rest.startswith(b"421 4.4.2")  # told why, then closed by the server
    assert_still_serving(small_relay)


def test_silent_client_in_data_is_disconnected(small_relay: RelayProcess) -> None:
    sock, stream = connect(small_relay)
    with sock, stream:  # type: ignore[attr-defined]
        command(sock, stream, b"EHLO client.test")
        command(sock, stream, b"MAIL FROM:<a@example.com>")
        command(sock, stream, b"RCPT TO:<b@example.org>")
        assert command(sock, stream, b"DATA").startswith(b"354")
        sock.sendall(b"Subject: stalled\r\n")
        sock.settimeout(10)
        assert stream.read().startswith(b"421")  # type: ignore[attr-defined]
    assert_still_serving(small_relay)
    assert small_relay.delivered_ids() == []


def test_garbage_bytes(relay: RelayProcess) -> None:
    sock, stream = connect(relay)
    with sock, stream:  # type: ignore[attr-defined]
        sock.sendall(b"\x00\xff\xfe garbage \x80\r\n")
        assert stream.readline()[:1] == b"5"  # type: ignore[attr-defined]
        sock.sendall(b"X" * 5000 + b"\r\n")
        assert stream.readline().startswith(b"500")  # type: ignore[attr-defined]
    assert_still_serving(relay)
