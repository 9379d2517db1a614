"""The native SMTP engine against aiosmtpd's: the same dialogue, byte for byte.

Two real relays run side by side, one per ``ESPRELAY_SMTP_ENGINE``, with the same
configuration (small limits, so that every limit can be reached, and AUTH users).
Every script below, and every script hypothesis makes from the same pieces, is played
to both, command by command and pipelined in one write; the replies must be the same
(message ids aside).  The rest of the test suite runs on the native engine, the default.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esprelay.smtp.auth import hash_password
from tests.relayproc import RelayProcess
from tests.securitykit import UNTRUSTED, Dialog

PASSWORD = "engine-Secret-9"
MAX_SIZE = 3000
MAX_LINE = 1001
JUNK_LIMIT = 12  # the "misc" script stays within it, "junk commands" goes beyond


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


@pytest.fixture(scope="module")
def relays(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RelayProcess]]:
    made: dict[str, RelayProcess] = {}
    try:
        for engine in ("native", "aiosmtpd"):
            workdir = tmp_path_factory.mktemp(f"engine-{engine}")
            users = workdir / "users"
            users.write_text(f"app:{hash_password(PASSWORD, log_n=4)}\n")
            made[engine] = RelayProcess(
                workdir,
                {
                    "ESPRELAY_SMTP_ENGINE": engine,
                    "ESPRELAY_TRUSTED_NETWORKS": "127.0.0.1/32",
                    "ESPRELAY_PLAINTEXT_AUTH_NETWORKS": "127.0.0.0/8",
                    "ESPRELAY_AUTH_FILE": str(users),
                    "ESPRELAY_AUTH_MAX_FAILURES": "1000",
                    "ESPRELAY_MAX_MESSAGE_SIZE": str(MAX_SIZE),
                    "ESPRELAY_MAX_LINE_LENGTH": str(MAX_LINE),
                    "ESPRELAY_MAX_COMMAND_LENGTH": "80",
                    "ESPRELAY_MAX_RECIPIENTS": "3",
                    "ESPRELAY_MAX_ERRORS": "6",
                    "ESPRELAY_SMTP_JUNK_COMMAND_LIMIT": str(JUNK_LIMIT),
                    "ESPRELAY_HTTP_ENABLED": "false",
                },
            ).start()
        yield made
    finally:
        for relay in made.values():
            relay.kill()


_QUEUED = re.compile(rb"queued as [0-9a-f]+")


def _normalise(transcript: bytes) -> bytes:
    return _QUEUED.sub(b"queued as ID", transcript)


def _read_all(sock: socket.socket, deadline: float) -> bytes:
    chunks = []
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def play_pipelined(port: int, script: list[bytes], source: str) -> bytes:
    """Send the whole script in one write (then QUIT) and read until the server closes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    with sock:
        sock.sendall(b"".join(script) + b"QUIT\r\n")
        return _normalise(_read_all(sock, time.monotonic() + 10))


def play_stepwise(port: int, script: list[bytes], source: str) -> bytes:
    """Send one piece at a time (a message with its final dot is one piece), reading one
    reply to each before the next."""
    dialog = Dialog(port, source=source)
    transcript = [dialog.reply()]
    try:
        for piece in [*script, b"QUIT\r\n"]:
            if not transcript[-1]:
                break  # closed by the server
            try:
                dialog.send(piece)
            except OSError:
                break
            try:
                transcript.append(dialog.reply())
            except OSError:
                break  # closed by the server (reset or not: a race with our write)
    finally:
        dialog.close()
    return _normalise(b"".join(transcript))


def _steps(script: list[bytes]) -> list[bytes]:
    return [p[1:] if p.startswith(b"~") else p for p in script]


def both(relays: dict[str, RelayProcess], script: list[bytes], source: str = "127.0.0.1") -> None:
    """Play ``script`` to both engines, both ways, and compare."""
    pieces = _steps(script)
    native = play_pipelined(relays["native"].port, pieces, source)
    reference = play_pipelined(relays["aiosmtpd"].port, pieces, source)
    assert native == reference, (script, native, reference)
    native = play_stepwise(relays["native"].port, pieces, source)
    reference = play_stepwise(relays["aiosmtpd"].port, pieces, source)
    assert native == reference, (script, native, reference)


MESSAGE = b"~Subject: engines\r\n\r\nline one\r\n..dot-stuffed\r\n.\r\n"
DATA = [b"DATA\r\n", MESSAGE]
ENVELOPE = [b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<b@example.org>\r\n"]

SCRIPTS = {
    "plain transaction": [b"EHLO c.test\r\n", *ENVELOPE, *DATA],
    "helo transaction": [b"HELO c.test\r\n", *ENVELOPE, *DATA],
    "two transactions": [b"EHLO c.test\r\n", *ENVELOPE, *DATA, *ENVELOPE, *DATA],
    "no helo": [*ENVELOPE, b"DATA\r\n"],
    "no mail": [b"EHLO c\r\n", b"RCPT TO:<b@example.org>\r\n", b"DATA\r\n"],
    "no rcpt": [b"EHLO c\r\n", b"MAIL FROM:<a@example.com>\r\n", b"DATA\r\n"],
    "nested mail": [b"EHLO c\r\n", ENVELOPE[0], ENVELOPE[0]],
    "null sender": [b"EHLO c\r\n", b"MAIL FROM:<>\r\n", ENVELOPE[1], *DATA],
    "params": [
        b"EHLO c\r\n",
        b"MAIL FROM:<a@example.com> SIZE=100 BODY=8BITMIME SMTPUTF8\r\n",
        b"RCPT TO:<b@example.org> NOTIFY=NEVER\r\n",
        b"RSET\r\n",
        b"MAIL FROM:<a@example.com> SIZE=999999\r\n",
        b"MAIL FROM:<a@example.com> BODY=BINARY\r\n",
        b"MAIL FROM:<a@example.com> SMTPUTF8=yes\r\n",
        b"MAIL FROM:<a@example.com> SIZE=abc\r\n",
        b"MAIL FROM:<a@example.com> =x\r\n",
        b"MAIL FROM:<a@example.com> FOO=BAR\r\n",
    ],
    "params after helo": [b"HELO c\r\n", b"MAIL FROM:<a@example.com> SIZE=10\r\n"],
    "syntax": [
        b"EHLO\r\n",
        b"HELO\r\n",
        b"EHLO c\r\n",
        b"MAIL\r\n",
        b"MAIL TO:<a@example.com>\r\n",
        b"MAIL FROM:\r\n",
        b"MAIL FROM:<a@example.com\r\n",
        b"MAIL FROM: <a@example.com>\r\n",
        b"RCPT\r\n",
        b"RCPT TO:<b@example.org\r\n",
        b"RCPT TO:<@relay.test:b@example.org>\r\n",
    ],
    "addresses": [
        b"EHLO c\r\n",
        b'MAIL FROM:<"quoted local"@example.com>\r\n',
        b"RCPT TO:<b%c@example.org>\r\n",
        b"RCPT TO:<b!c@example.org>\r\n",
        b"RCPT TO:b@example.org\r\n",
        b"RCPT TO:<b@[127.0.0.1]>\r\n",
        b"RCPT TO:<x@example.org> (comment)\r\n",
        b"RCPT TO:<b@example.org>\r\n",
        b"RCPT TO:<b@example.org>\r\n",
        b"RCPT TO:<c@example.org>\r\n",
        b"RCPT TO:<d@example.org>\r\n",
        b"RCPT TO:<e@example.org>\r\n",
    ],
    "misc": [
        b"NOOP\r\n",
        b"NOOP anything\r\n",
        b"HELP\r\n",
        b"HELP mail\r\n",
        b"HELP FOO\r\n",
        b"VRFY\r\n",
        b"VRFY someone\r\n",
        b"EXPN list\r\n",
        b"RSET now\r\n",
        b"RSET\r\n",
        b"EHLO c\r\n",
        b"HELP MAIL\r\n",
        b"HELP RCPT\r\n",
        b"\r\n",
        b"mail from:<a@example.com>\r\n",
        b"rcpt to:<b@example.org>\r\n",
        b"data\r\n",
        MESSAGE,
    ],
    "unknown commands": [b"FOO\r\n", b"BAR x\r\n", b"BAZ\r\n", b"QUX\r\n", b"QUUX\r\n"],
    "bad bytes": [b"EHLO \xff\xfe\r\n", b"\xffOO\r\n", b"MAIL FROM:<\xc3\xa9@example.com>\r\n"],
    "long command": [
        b"EHLO c\r\n",
        b"NOOP " + b"x" * 100 + b"\r\n",
        b"MAIL FROM:<" + b"a" * 90 + b"@example.com>\r\n",
    ],
    "very long line": [b"EHLO c\r\n", b"NOOP " + b"x" * 3000 + b"\r\n", b"NOOP\r\n"],
    "too much mail": [
        b"EHLO c\r\n",
        *ENVELOPE,
        b"DATA\r\n",
        b"~" + b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 60 + b".\r\n",
        *ENVELOPE,
        *DATA,
    ],
    "too long line in data": [
        b"EHLO c\r\n",
        *ENVELOPE,
        b"DATA\r\n",
        b"~Subject: long\r\n\r\n" + b"z" * 1500 + b"\r\n.\r\n",
        b"NOOP\r\n",
    ],
    "empty message": [b"EHLO c\r\n", *ENVELOPE, b"DATA\r\n", b"~.\r\n"],
    "data with argument": [b"EHLO c\r\n", *ENVELOPE, b"DATA now\r\n"],
    "auth plain": [b"EHLO c\r\n", b"AUTH PLAIN " + _b64(b"\0app\0" + PASSWORD.encode()) + b"\r\n"],
    "auth twice": [
        b"EHLO c\r\n",
        b"AUTH PLAIN " + _b64(b"\0app\0" + PASSWORD.encode()) + b"\r\n",
        b"AUTH PLAIN " + _b64(b"\0app\0" + PASSWORD.encode()) + b"\r\n",
    ],
    "auth wrong": [b"EHLO c\r\n", b"AUTH PLAIN " + _b64(b"\0app\0nope") + b"\r\n"],
    "auth errors": [
        b"AUTH PLAIN\r\n",
        b"HELO c\r\n",
        b"AUTH PLAIN\r\n",
        b"EHLO c\r\n",
        b"AUTH\r\n",
    ],
    "more auth errors": [
        b"EHLO c\r\n",
        b"AUTH PLAIN a b\r\n",
        b"AUTH CRAM-MD5\r\n",
        b"AUTH PLAIN !!!\r\n",
        b"AUTH PLAIN " + _b64(b"no-nuls") + b"\r\n",
    ],
    "auth login": [
        b"EHLO c\r\n",
        b"auth login\r\n",
        _b64(b"app") + b"\r\n",
        _b64(PASSWORD.encode()) + b"\r\n",
    ],
    "auth login initial": [
        b"EHLO c\r\n",
        b"AUTH LOGIN " + _b64(b"app") + b"\r\n",
        _b64(b"wrong") + b"\r\n",
    ],
    "auth aborted": [b"EHLO c\r\n", b"AUTH LOGIN\r\n", b"*\r\n", b"NOOP\r\n"],
    "auth bad answer": [b"EHLO c\r\n", b"AUTH PLAIN\r\n", b"not base64!\r\n"],
    "starttls unavailable": [b"EHLO c\r\n", b"STARTTLS\r\n", b"STARTTLS now\r\n"],
    "error budget": [b"EHLO c\r\n"] + [b"MAIL FROM:<bad\r\n"] * 7,
    "junk commands": [b"EHLO c\r\n", *[b"NOOP\r\n", b"RSET\r\n", b"EHLO c\r\n"] * 5],
    "junk count after a message": [
        b"EHLO c\r\n",
        *[b"NOOP\r\n"] * 10,
        *ENVELOPE,
        *DATA,
        *[b"HELP\r\n", b"VRFY x\r\n", b"EXPN y\r\n", b"HELO c\r\n"] * 4,
    ],
    # (ESPRELAY_MAX_ERRORS is 6: at most 5 refusals per script.)
    "dsn parameters": [
        b"EHLO c\r\n",
        b"MAIL FROM:<a@example.com> RET=hdrs ENVID=Abc+2Bdef SIZE=10\r\n",
        b"RCPT TO:<b@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;B@Example.org\r\n",
        b"RCPT TO:<c@example.org> notify=delay orcpt=RFC822;c+40example.org\r\n",
        b"RCPT TO:<d@example.org> ORCPT=rfc822;" + b"d" * 480 + b"\r\n",
        b"RCPT TO:<e@example.org> FOO=1 NOTIFY=NEVER\r\n",
        *DATA,
        b"MAIL FROM:<a@example.com>RET=FULL\r\n",
        b"RSET\r\n",
        b"MAIL FROM:<a@example.com> BODY=BINARY RET=FULL\r\n",
        b"MAIL FROM:<a@example.com> ENVID=" + b"x" * 100 + b" RET=FULL\r\n",
    ],
    "dsn keywords on the wrong command": [
        b"EHLO c\r\n",
        b"MAIL FROM:<a@example.com> NOTIFY=NEVER\r\n",
        ENVELOPE[0],
        b"RCPT TO:<b@example.org> RET=FULL\r\n",
        b"RCPT TO:<b@example.org> ENVID=x\r\n",
    ],
    # ESPRELAY_MAX_COMMAND_LENGTH is 80: MAIL may have 26 (SIZE=) + 10 (SMTPUTF8) + 116
    # (RET, ENVID) more after EHLO, RCPT 536 (NOTIFY, ORCPT).
    "dsn line limits": [
        b"EHLO c\r\n",
        b"MAIL FROM:<a@example.com> ENVID=" + b"x" * 200 + b"\r\n",
        b"MAIL FROM:<a@example.com> ENVID=" + b"x" * 201 + b"\r\n",
        ENVELOPE[0],
        b"RCPT TO:<b@example.org> ORCPT=rfc822;" + b"x" * 579 + b"\r\n",
        b"RCPT TO:<b@example.org> ORCPT=rfc822;" + b"x" * 580 + b"\r\n",
    ],
    "bad notify": [
        b"EHLO c\r\n",
        ENVELOPE[0],
        b"RCPT TO:<c@example.org> NOTIFY=NEVER,FAILURE\r\n",
        b"RCPT TO:<c@example.org> NOTIFY=\r\n",
        b"RCPT TO:<c@example.org> NOTIFY=SOMETIMES\r\n",
        b"RCPT TO:<c@example.org> NOTIFY=DELAY NOTIFY=DELAY\r\n",
        b"RCPT TO:<c@example.org> NOTIFY=DELAY,DELAY\r\n",
    ],
    "bad orcpt": [
        b"EHLO c\r\n",
        ENVELOPE[0],
        b"RCPT TO:<c@example.org> ORCPT=rfc822\r\n",
        b"RCPT TO:<c@example.org> ORCPT=rfc822;c+2\r\n",
        b"RCPT TO:<c@example.org> ORCPT=rfc822;c+0Ax\r\n",
        b"RCPT TO:<c@example.org> ORCPT=;c@example.org\r\n",
        b"RCPT TO:<c@example.org> ORCPT=rfc822;\r\n",
    ],
    "bad ret and envid": [
        b"EHLO c\r\n",
        b"MAIL FROM:<a@example.com> RET=ALL\r\n",
        b"MAIL FROM:<a@example.com> ENVID=a=b\r\n",
        b"MAIL FROM:<a@example.com> ENVID=" + b"x" * 101 + b"\r\n",
        b"MAIL FROM:<a@example.com> RET=FULL RET=HDRS\r\n",
        b"MAIL FROM:<a@example.com> ENVID=\r\n",
    ],
    "dsn parameters after helo": [
        b"HELO c\r\n",
        b"MAIL FROM:<a@example.com> RET=FULL\r\n",
        b"MAIL FROM:<a@example.com>\r\n",
        b"RCPT TO:<b@example.org> NOTIFY=NEVER\r\n",
    ],
    "envelope bytes": [
        b"EHLO c\r\n",
        b"MAIL FROM:<j\xff@example.com>\r\n",
        b"MAIL FROM:<j\xff@example.com> SMTPUTF8\r\n",
        b"MAIL FROM:<\xc3\xa9@example.com>\r\n",
        b"MAIL FROM:<a@example.com>\r\n",
        b"RCPT TO:<\xc3\xa9@example.org>\r\n",
        b"RCPT TO:<b\xfe@example.org>\r\n",
    ],
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_scripts_answered_alike(relays: dict[str, RelayProcess], name: str) -> None:
    both(relays, SCRIPTS[name])


def test_untrusted_client_answered_alike(relays: dict[str, RelayProcess]) -> None:
    """Relay refusals (530) for a client outside the trusted networks."""
    both(relays, [b"EHLO c\r\n", *ENVELOPE, b"DATA\r\n"], source=UNTRUSTED)
    both(
        relays,
        [
            b"EHLO c\r\n",
            b"AUTH PLAIN " + _b64(b"\0app\0" + PASSWORD.encode()) + b"\r\n",
            *ENVELOPE,
            *DATA,
        ],
        source=UNTRUSTED,
    )


PIECES = [
    b"EHLO c\r\n",
    b"HELO c\r\n",
    ENVELOPE[0],
    ENVELOPE[1],
    b"RCPT TO:<z@example.net>\r\n",
    b"MAIL FROM:<a@example.com> RET=FULL ENVID=Id+2B1\r\n",
    b"RCPT TO:<y@example.net> NOTIFY=NEVER ORCPT=rfc822;Y@example.net\r\n",
    b"RCPT TO:<x@example.net> NOTIFY=SOMETIMES\r\n",
    b"MAIL FROM:<>\r\n",
    b"MAIL FROM:<x\r\n",
    b"RCPT TO:<>\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"VRFY x\r\n",
    b"HELP\r\n",
    b"FOO\r\n",
    b"\r\n",
    b"DATA\r\n",
    b"AUTH PLAIN " + _b64(b"\0app\0" + PASSWORD.encode()) + b"\r\n",
    b"AUTH PLAIN " + _b64(b"\0app\0wrong") + b"\r\n",
    b"STARTTLS\r\n",
]


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(st.sampled_from(PIECES), min_size=1, max_size=12))
def test_generated_scripts_answered_alike(
    relays: dict[str, RelayProcess], script: list[bytes]
) -> None:
    # After a 354 what follows is message content until a lone dot: end it, so that
    # both engines are in the same place and the comparison goes on meaningfully.
    pieces: list[bytes] = []
    for piece in script:
        pieces.append(piece)
        if piece == b"DATA\r\n":
            pieces.append(MESSAGE)
    stepwise_safe = b"DATA\r\n" not in pieces  # a refused DATA leaves content as commands
    native = play_pipelined(relays["native"].port, _steps(pieces), "127.0.0.1")
    reference = play_pipelined(relays["aiosmtpd"].port, _steps(pieces), "127.0.0.1")
    assert native == reference, (pieces, native, reference)
    if stepwise_safe:
        both(relays, pieces)


def test_half_close_after_quit_still_gets_the_data_reply(relays: dict[str, RelayProcess]) -> None:
    """A client that sends everything and shuts its side down gets every reply (native)."""
    sock = socket.create_connection(("127.0.0.1", relays["native"].port), timeout=10)
    with sock:
        sock.sendall(b"EHLO c\r\n" + b"".join(ENVELOPE) + b"DATA\r\n" + MESSAGE[1:] + b"QUIT\r\n")
        sock.shutdown(socket.SHUT_WR)
        transcript = _read_all(sock, time.monotonic() + 10)
    assert b"250 2.0.0 Ok: queued as" in transcript, transcript
    assert transcript.endswith(b"221 Bye\r\n"), transcript


def _spooled_meta(relay: RelayProcess, message_id: str) -> dict[str, object]:
    with sqlite3.connect(relay.workdir / "data" / "spool.db") as db:
        [(meta,)] = db.execute("SELECT meta FROM messages WHERE id = ?", (message_id,))
    stored: dict[str, object] = json.loads(meta)
    return stored


@pytest.mark.parametrize("engine", ["native", "aiosmtpd"])
def test_dsn_parameters_stored_with_the_message(
    relays: dict[str, RelayProcess], engine: str
) -> None:
    """RET and ENVID per message, NOTIFY and ORCPT per recipient, as the client wrote
    them (ENVID and ORCPT decoded from xtext, their case kept)."""
    relay = relays[engine]
    dialog = Dialog(relay.port)
    assert dialog.reply().startswith(b"220")
    assert b"250-DSN" in dialog.command(b"EHLO c")
    assert dialog.command(b"MAIL FROM:<a@example.com> RET=full ENVID=Q+2B1.x").startswith(b"250")
    assert dialog.command(b"RCPT TO:<b@example.org> NOTIFY=NEVER").startswith(b"250")
    rcpt = b"RCPT TO:<c@example.org> ORCPT=rfc822;C+2Bx@Example.org NOTIFY=delay,failure"
    assert dialog.command(rcpt).startswith(b"250")
    assert dialog.command(b"RCPT TO:<d@example.org>").startswith(b"250")
    assert dialog.command(b"DATA").startswith(b"354")
    reply = dialog.command(b"Subject: dsn\r\n\r\nbody\r\n.")
    dialog.close()
    assert reply.startswith(b"250"), reply
    meta = _spooled_meta(relay, reply.decode().rsplit(" ", 1)[1].strip())
    assert meta["dsn_ret"] == "FULL"
    assert meta["dsn_envid"] == "Q+1.x"
    assert meta["dsn_rcpts"] == {
        "b@example.org": {"notify": ["NEVER"]},
        "c@example.org": {"notify": ["FAILURE", "DELAY"], "orcpt": "rfc822;C+x@Example.org"},
    }


def test_message_sent_a_byte_at_a_time(relays: dict[str, RelayProcess], tmp_path: Path) -> None:
    """Lines, dots and the end of data split across reads: the same message is spooled."""
    relay = relays["native"]
    dialog = Dialog(relay.port)
    assert dialog.reply().startswith(b"220")
    assert dialog.command(b"EHLO c").startswith(b"250")
    assert dialog.command(b"MAIL FROM:<a@example.com>").startswith(b"250")
    assert dialog.command(b"RCPT TO:<b@example.org>").startswith(b"250")
    assert dialog.command(b"DATA").startswith(b"354")
    body = b"Subject: slow\r\n\r\n.leading dot\r\n..two\r\nend\r\n"
    for byte in body + b".\r\n":
        dialog.send(bytes([byte]))
    reply = dialog.reply()
    dialog.close()
    assert reply.startswith(b"250"), reply
    message_id = reply.decode().rsplit(" ", 1)[1].strip()
    deadline = time.monotonic() + 10
    eml = relay.outbox / f"{message_id}.eml"
    while not eml.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert eml.read_bytes() == b"Subject: slow\r\n\r\nleading dot\r\n.two\r\nend\r\n"


def test_half_close_during_an_auth_challenge_ends_the_session(
    relays: dict[str, RelayProcess],
) -> None:
    """The client shuts its side down while the server waits for its AUTH answer."""
    sock = socket.create_connection(("127.0.0.1", relays["native"].port), timeout=10)
    with sock:
        sock.sendall(b"EHLO c\r\nAUTH LOGIN\r\n")
        sock.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        transcript = _read_all(sock, time.monotonic() + 10)
    assert time.monotonic() - started < 5, transcript  # not the idle timeout
    assert transcript.endswith(b"334 VXNlciBOYW1lAA==\r\n"), transcript


@pytest.fixture(scope="module")
def short_lived(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RelayProcess]]:
    made: dict[str, RelayProcess] = {}
    try:
        for engine in ("native", "aiosmtpd"):
            made[engine] = RelayProcess(
                tmp_path_factory.mktemp(f"short-{engine}"),
                {
                    "ESPRELAY_SMTP_ENGINE": engine,
                    "ESPRELAY_SMTP_MAX_SESSION_SECONDS": "1",
                    "ESPRELAY_DATA_TIMEOUT": "2",
                    "ESPRELAY_HTTP_ENABLED": "false",
                },
            ).start()
        yield made
    finally:
        for relay in made.values():
            relay.kill()


def play_until_closed(port: int, script: list[bytes]) -> bytes:
    """Send the script in one write, no QUIT, and read until the server closes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    with sock:
        sock.sendall(b"".join(script))
        return _normalise(_read_all(sock, time.monotonic() + 30))


@pytest.mark.parametrize(
    "script",
    [
        pytest.param([b"EHLO c\r\n"], id="idle"),
        pytest.param([b"EHLO c\r\n", *ENVELOPE, *DATA], id="after-a-message"),
        pytest.param([b"EHLO c\r\n", *ENVELOPE, b"DATA\r\n", b"Subject: open\r\n"], id="in-data"),
    ],
)
def test_session_lifetime_answered_alike(
    short_lived: dict[str, RelayProcess], script: list[bytes]
) -> None:
    """The lifetime's end, idle or after a message; a DATA in progress is not cut by
    the lifetime, only by the DATA deadline (here 2 s; both answer 421 4.4.2)."""
    pieces = _steps(script)
    native = play_until_closed(short_lived["native"].port, pieces)
    reference = play_until_closed(short_lived["aiosmtpd"].port, pieces)
    assert native == reference, (script, native, reference)
    assert b"421 4.4.2 " in native, native
