"""Hypothesis against a real esprelay: the SMTP command loop and DATA never crash the
bridge, every reply is a well-formed SMTP reply, and every message answered 250 is
in the spool with exactly the bytes the client meant."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esprelay.message.repair import normalize_line_endings
from tests.relayproc import RelayProcess
from tests.securitykit import Certs, Dialog, plain_auth, spooled

REPLY = re.compile(rb"^\d{3}[ -]")
QUEUED = re.compile(rb"^250 2\.0\.0 Ok: queued as (\w+)", re.MULTILINE)

# Bounded for `make test`; FUZZ_EXAMPLES=1000 for a longer hunt.
FUZZ_SETTINGS = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


@pytest.fixture(scope="module")
def fuzzrelay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    workdir = tmp_path_factory.mktemp("fuzz")
    certs = Certs(workdir)
    relay = RelayProcess(
        workdir,
        {
            **certs.env(),
            "ESPRELAY_AUTH_USER": "fuzz",
            "ESPRELAY_AUTH_PASSWORD": "fuzz-password",
            "ESPRELAY_SMTP_TIMEOUT": "5s",
            "ESPRELAY_MAX_LINE_LENGTH": "2000",
            "ESPRELAY_REPAIR_HEADERS": "true",
            "ESPRELAY_LOG_LEVEL": "DEBUG",
        },
    ).start()
    yield relay
    relay.kill()


KNOWN = [
    b"EHLO fuzz.test",
    b"HELO fuzz.test",
    b"ehlo",
    b"MAIL FROM:<a@example.com>",
    b"MAIL FROM:<a@example.com> SIZE=100 BODY=8BITMIME SMTPUTF8",
    b"MAIL FROM:<>",
    b"mail from:<a@example.com> SIZE=999999999999",
    b"RCPT TO:<b@example.org>",
    b"RCPT TO:<@a.example:b@c.example>",
    b'RCPT TO:<"x y"@example.org>',
    b"RCPT TO:<b@example.org> NOTIFY=NEVER",
    b"DATA",
    b"RSET",
    b"NOOP",
    b"VRFY b@example.org",
    b"EXPN list",
    b"HELP",
    b"HELP MAIL",
    b"AUTH PLAIN",
    b"auth login",
    b"AUTH PLAIN " + plain_auth("fuzz", "fuzz-password"),
    b"AUTH PLAIN " + plain_auth("fuzz", "wrong"),
    b"AUTH CRAM-MD5",
    b"*",
    b"STARTTLS",
    b".",
    b"",
    b"Subject: x",
]
VERBS = [b"EHLO ", b"MAIL FROM:", b"RCPT TO:", b"AUTH ", b"VRFY ", b"DATA ", b"HELP "]

VALID_TRANSACTION = (
    b"RSET\r\nEHLO fuzz.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
    b"DATA\r\nSubject: after the noise\r\n\r\nbody"
)

command = st.one_of(
    st.sampled_from(KNOWN),
    st.builds(bytes.__add__, st.sampled_from(VERBS), st.binary(max_size=60)),
    st.binary(max_size=80),
).map(lambda line: line.replace(b"\n", b"") + b"\r\n")


def talk(port: int, payload: bytes) -> bytes:
    """Send a whole (pipelined) session, then read every reply until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload + b"\r\n.\r\nQUIT\r\n")
        replies = b""
        try:
            while chunk := sock.recv(65536):
                replies += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return replies


def assert_alive(relay: RelayProcess) -> None:
    assert relay.proc is not None and relay.proc.poll() is None, relay.log[-3000:]
    dialog = Dialog(relay.port)
    try:
        assert dialog.reply().startswith(b"220")
        assert dialog.command(b"NOOP").startswith(b"250")
    finally:
        dialog.close()


def test_fuzz_command_loop(fuzzrelay: RelayProcess) -> None:
    accepted: list[str] = []

    @FUZZ_SETTINGS
    @given(st.lists(command, min_size=1, max_size=25), st.booleans())
    def session(commands: list[bytes], then_a_message: bool) -> None:
        payload = b"".join(commands)
        if then_a_message:  # often enough, a transaction after the noise
            payload += VALID_TRANSACTION
        replies = talk(fuzzrelay.port, payload)
        assert replies.startswith(b"220 ")
        for line in replies.split(b"\r\n")[:-1]:
            assert REPLY.match(line), (line, replies)
        assert b"Traceback" not in replies
        accepted.extend(m.decode() for m in QUEUED.findall(replies))

    session()
    assert_alive(fuzzrelay)
    assert accepted, "the fuzzer never got a message through: it tests too little"
    in_spool = {m["id"] for m in spooled(fuzzrelay)}
    assert set(accepted) <= in_spool
    log = fuzzrelay.log
    at = log.find("Traceback")
    assert at < 0, log[max(0, at - 1500) : at + 3000]


def unstuffed(body: bytes) -> bytes:
    """What aiosmtpd keeps of DATA lines: CRLF-delimited, a leading dot removed."""
    lines = (body + b"\r\n").split(b"\r\n")[:-1]
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


body_bytes = st.lists(
    st.one_of(
        st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b"\x00", b"\xff", b"From: x@y"]),
        st.binary(max_size=20),
    ),
    max_size=40,
).map(b"".join)


def test_fuzz_data_no_lost_or_changed_message(fuzzrelay: RelayProcess) -> None:
    @FUZZ_SETTINGS
    @given(body_bytes)
    def transaction(body: bytes) -> None:
        if b"\r\n.\r\n" in b"\r\n" + body + b"\r\n":
            body = body.replace(b"\r\n.", b"\r\n..")  # the client's own dot-stuffing
            if body.startswith(b"."):
                body = b"." + body
        header = (
            b"Date: Sat, 28 Nov 2026 01:00:00 +0000\r\nMessage-ID: <f@example.com>\r\n"
            b"From: a@example.com\r\n\r\n"
        )
        session = (
            b"EHLO fuzz.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
            b"DATA\r\n" + header + body
        )
        replies = talk(fuzzrelay.port, session)
        ids = QUEUED.findall(replies)
        assert len(ids) == 1, replies
        message_id = ids[0].decode()
        fuzzrelay.wait_for_log(rf"delivered id={message_id}")
        eml = (fuzzrelay.outbox / f"{message_id}.eml").read_bytes()
        assert eml == normalize_line_endings(unstuffed(header + body))

    started = time.monotonic()
    transaction()
    assert time.monotonic() - started < 120
    assert_alive(fuzzrelay)
