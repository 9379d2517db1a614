"""Sessions that never end: the junk-command limit and the session lifetime, both engines.

A client that sends NOOP every few seconds used to keep its session (and one of the
ESPRELAY_MAX_CONNECTIONS slots) for ever: 200 of them locked every other client out.
Now commands that move no mail count towards ESPRELAY_SMTP_JUNK_COMMAND_LIMIT (421 4.7.0
past it; an accepted message starts the count again), and ESPRELAY_SMTP_MAX_SESSION_SECONDS
bounds the session: 421 4.4.2 at once when idle, after the reply to the command in
progress otherwise.  Time is driven by a short configured lifetime and the server's own
421, never by sleeping.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

from tests.relayproc import RelayProcess
from tests.securitykit import Dialog, spooled

ENGINES = ("native", "aiosmtpd")
JUNK_LIMIT = 5
LIFETIME = 1.5


@pytest.fixture(scope="module")
def junk_relays(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RelayProcess]]:
    made: dict[str, RelayProcess] = {}
    try:
        for engine in ENGINES:
            made[engine] = RelayProcess(
                tmp_path_factory.mktemp(f"junk-{engine}"),
                {
                    "ESPRELAY_SMTP_ENGINE": engine,
                    "ESPRELAY_HTTP_ENABLED": "false",
                    "ESPRELAY_SMTP_JUNK_COMMAND_LIMIT": str(JUNK_LIMIT),
                },
            ).start()
        yield made
    finally:
        for relay in made.values():
            relay.kill()


@pytest.fixture(scope="module")
def short_lived(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RelayProcess]]:
    made: dict[str, RelayProcess] = {}
    try:
        for engine in ENGINES:
            made[engine] = RelayProcess(
                tmp_path_factory.mktemp(f"lifetime-{engine}"),
                {
                    "ESPRELAY_SMTP_ENGINE": engine,
                    "ESPRELAY_HTTP_ENABLED": "false",
                    "ESPRELAY_SMTP_MAX_SESSION_SECONDS": str(LIFETIME),
                    "ESPRELAY_SMTP_JUNK_COMMAND_LIMIT": "1000000",
                },
            ).start()
        yield made
    finally:
        for relay in made.values():
            relay.kill()


def _greeted(relay: RelayProcess) -> Dialog:
    dialog = Dialog(relay.port)
    assert dialog.reply().startswith(b"220")
    return dialog


def _send_message(dialog: Dialog) -> bytes:
    assert dialog.command(b"MAIL FROM:<a@example.com>").startswith(b"250")
    assert dialog.command(b"RCPT TO:<b@example.org>").startswith(b"250")
    assert dialog.command(b"DATA").startswith(b"354")
    return dialog.command(b"Subject: limits\r\n\r\nbody\r\n.")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    "junk",
    [
        pytest.param([b"NOOP"], id="noop"),
        pytest.param([b"RSET", b"VRFY someone", b"HELP", b"EXPN list", b"NOOP x"], id="mixed"),
        pytest.param([b"EHLO again.test", b"HELO again.test"], id="helo-again"),
    ],
)
def test_junk_commands_limited(
    junk_relays: dict[str, RelayProcess], engine: str, junk: list[bytes]
) -> None:
    relay = junk_relays[engine]
    dialog = _greeted(relay)
    try:
        assert dialog.command(b"EHLO client.test").startswith(b"250")  # the first: not junk
        for number in range(JUNK_LIMIT):
            reply = dialog.command(junk[number % len(junk)])
            assert reply[:1] in (b"2", b"5"), reply
        reply = dialog.command(junk[JUNK_LIMIT % len(junk)])
        assert reply.startswith(b"421 4.7.0 "), reply
        assert dialog.closed()
    finally:
        dialog.close()
    relay.wait_for_log("too many junk commands: closing client=127.0.0.1")


@pytest.mark.parametrize("engine", ENGINES)
def test_an_accepted_message_starts_the_junk_count_again(
    junk_relays: dict[str, RelayProcess], engine: str
) -> None:
    dialog = _greeted(junk_relays[engine])
    try:
        assert dialog.command(b"EHLO client.test").startswith(b"250")
        for _ in range(3):
            for _ in range(JUNK_LIMIT - 1):
                assert dialog.command(b"NOOP").startswith(b"250")
            assert dialog.command(b"RSET").startswith(b"250")  # the limit: still answered
            assert _send_message(dialog).startswith(b"250 2.0.0")
        assert dialog.command(b"QUIT").startswith(b"221")
    finally:
        dialog.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_idle_session_closed_at_its_lifetime(
    short_lived: dict[str, RelayProcess], engine: str
) -> None:
    relay = short_lived[engine]
    dialog = _greeted(relay)
    started = time.monotonic()
    try:
        assert dialog.command(b"EHLO client.test").startswith(b"250")
        # Nothing more is sent: the idle timeout (5 minutes) is far away.
        assert dialog.reply().startswith(b"421 4.4.2 "), "lifetime 421 expected"
        assert dialog.closed()
    finally:
        dialog.close()
    assert time.monotonic() - started < 30
    relay.wait_for_log("session lifetime exceeded: closing client=127.0.0.1")


@pytest.mark.parametrize("engine", ENGINES)
def test_noop_every_so_often_does_not_keep_a_session(
    short_lived: dict[str, RelayProcess], engine: str
) -> None:
    """The issue's client: harmless commands, each one well within the idle timeout."""
    dialog = _greeted(short_lived[engine])
    started = time.monotonic()
    try:
        reply = dialog.command(b"EHLO client.test")
        while reply.startswith(b"250") and time.monotonic() - started < 30:
            reply = dialog.command(b"NOOP")
        assert reply.startswith(b"421 4.4.2 "), reply
    finally:
        dialog.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_message_in_progress_finished_before_the_lifetime_closes(
    short_lived: dict[str, RelayProcess], engine: str
) -> None:
    relay = short_lived[engine]
    before = len(spooled(relay))
    busy = _greeted(relay)
    try:
        assert busy.command(b"EHLO client.test").startswith(b"250")
        assert busy.command(b"MAIL FROM:<a@example.com>").startswith(b"250")
        assert busy.command(b"RCPT TO:<b@example.org>").startswith(b"250")
        assert busy.command(b"DATA").startswith(b"354")
        busy.send(b"Subject: slow\r\n\r\n")
        # A session opened after the busy one's: its 421 says the busy one is over too.
        idle = _greeted(relay)
        try:
            assert idle.reply().startswith(b"421 4.4.2 ")
        finally:
            idle.close()
        reply = busy.command(b"body\r\n.")
        assert reply.startswith(b"250 2.0.0"), reply
        assert busy.reply().startswith(b"421 4.4.2 ")
        assert busy.closed()
    finally:
        busy.close()
    assert len(spooled(relay)) == before + 1


@pytest.mark.parametrize("engine", ENGINES)
def test_mail_while_draining_gets_421_and_the_session_ends(
    relay_factory: type[RelayProcess], engine: str
) -> None:
    """The handler closes the session through the engine's Connection.close(): the 421
    is written first, then the connection ends."""
    relay = relay_factory(
        {"ESPRELAY_SMTP_ENGINE": engine, "ESPRELAY_DELIVERY_CONCURRENCY": "0"}
    ).start()
    busy = _greeted(relay)  # keeps the relay draining: a message under way
    idle = _greeted(relay)
    try:
        assert busy.command(b"EHLO client.test").startswith(b"250")
        assert busy.command(b"MAIL FROM:<a@example.com>").startswith(b"250")
        assert idle.command(b"EHLO client.test").startswith(b"250")
        assert relay.proc is not None
        relay.proc.send_signal(signal.SIGTERM)
        relay.wait_for_log("shutting down")
        reply = idle.command(b"MAIL FROM:<a@example.com>")
        assert reply.startswith(b"421 4.3.2 "), reply
        assert idle.closed()
        assert busy.command(b"RSET").startswith(b"250")  # the other session goes on
    finally:
        idle.close()
        busy.close()
