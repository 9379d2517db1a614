"""The native engine's DATA phase against the rules, however the bytes are split.

The message is made of random lines (dots at the start, bare CR and LF inside, lines
near the length limit), dot-stuffed as a client sends it, and fed to the protocol in
random pieces.  What the handler receives (or the error reply) must be what RFC 5321
and aiosmtpd's rules give: lines end at CRLF only, one leading dot is removed, a line
over the limit is answered 500 and a message over the size limit 552, both only after
the final dot; what follows the final dot is read as commands.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from esprelay.intake import IntakeState
from esprelay.smtp.auth import FailureLimiter, UserDB
from esprelay.smtp.dataread import MessageReader
from esprelay.smtp.engine import Listener, SMTPSession
from esprelay.smtp.guards import Guards
from esprelay.smtp.policy import RelayPolicy
from esprelay.smtp.session_policy import SessionPolicy
from esprelay.spill import Spilled, Spiller

LINE_LIMIT = 40
SIZE_LIMIT = 400


class Capture:
    def __init__(self, spiller: Spiller | None = None) -> None:
        self.contents: list[bytes] = []
        self.spiller = spiller

    def ehlo(self, server: Any, session: Any, hostname: str, lines: list[str]) -> list[str]:
        session.host_name = hostname
        return lines

    def mail(self, server: Any, session: Any, envelope: Any, address: str, opts: Any) -> str:
        envelope.mail_from = address
        return "250 OK"

    def rcpt(self, server: Any, session: Any, envelope: Any, address: str, opts: Any) -> str:
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.contents.append(envelope.content)
        return "250 stored"


class Transport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 4321) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _session(capture: Capture) -> tuple[SMTPSession, Transport]:
    policy = SessionPolicy(
        IntakeState(),
        Guards(max_errors=100),
        RelayPolicy.loopback(),
        UserDB(),
        FailureLimiter(5, 300.0),
        implicit_tls=False,
        sessions=set(),
    )
    listener = Listener(
        capture,  # type: ignore[arg-type]
        hostname="engine.test",
        data_size_limit=SIZE_LIMIT,
        line_length_limit=LINE_LIMIT,
        command_size_limit=512,
        timeout=30.0,
        policy=policy,
        tls_context=None,
    )
    session = SMTPSession(listener)
    transport = Transport()
    session.connection_made(transport)  # type: ignore[arg-type]
    return session, transport


lines = st.lists(
    st.one_of(
        st.binary(max_size=LINE_LIMIT + 3),
        st.sampled_from(
            [b"", b".", b"..", b".x", b"a\r", b"\nb", b"\r", b"\n", b"x\r\r"]
            + [b"x" * n for n in (LINE_LIMIT - 1, LINE_LIMIT, LINE_LIMIT + 1)]
            + [b"." * n for n in (LINE_LIMIT - 1, LINE_LIMIT, LINE_LIMIT + 1)]
        ),
    ).filter(lambda line: b"\r\n" not in line),
    max_size=14,
)


def _expected(body_lines: list[bytes]) -> tuple[bytes | None, bytes | None]:
    """(content, None) or (None, the error reply's code)."""
    # The limit applies to the line as sent (dot-stuffed), as aiosmtpd's reader sees it.
    too_long = any(len(line) + line.startswith(b".") > LINE_LIMIT for line in body_lines)
    stuffed = sum(len(line) + 2 + line.startswith(b".") for line in body_lines)
    if too_long:
        return None, b"500"
    if stuffed > SIZE_LIMIT:
        return None, b"552"
    return b"".join(line + b"\r\n" for line in body_lines), None


@settings(max_examples=300, deadline=None)
@given(lines, st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=30))
def test_data_is_read_by_the_rules_whatever_the_split(
    body_lines: list[bytes], cuts: list[int]
) -> None:
    asyncio.run(_check(body_lines, cuts))


async def _check(body_lines: list[bytes], cuts: list[int]) -> None:
    capture = Capture()
    session, transport = _session(capture)
    session.data_received(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n")
    session.data_received(b"DATA\r\n")
    stream = b"".join(
        (b"." + line if line.startswith(b".") else line) + b"\r\n" for line in body_lines
    )
    stream += b".\r\nNOOP\r\n"
    position = 0
    for cut in cuts:
        session.data_received(stream[position : position + cut])
        position += cut
        await asyncio.sleep(0)
    session.data_received(stream[position:])
    for _ in range(5):
        await asyncio.sleep(0)
    replies = bytes(transport.written).split(b"\r\n")
    content, error = _expected(body_lines)
    assert replies[-1] == b"", replies
    assert replies[-2] == b"250 OK", replies  # the NOOP after the final dot
    if error is None:
        assert capture.contents == [content]
        assert replies[-3] == b"250 stored", replies
    else:
        assert capture.contents == []
        assert replies[-3][:3] in (b"500", b"552"), replies
        if error == b"500" and sum(len(x) + 3 for x in body_lines) <= SIZE_LIMIT:
            assert replies[-3][:3] == b"500", replies


async def test_a_large_message_reaches_the_handler_in_its_file(tmp_path: Path) -> None:
    """Past the spill size, the engine hands the handler a file; a session cut off in
    DATA leaves no file behind."""
    capture = Capture(Spiller(tmp_path, 100))
    session, transport = _session(capture)
    session.data_received(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n")
    session.data_received(b"DATA\r\n")
    for _ in range(5):
        session.data_received(b"..y" + b"y" * 20 + b"\r\n")
    assert len(os.listdir(tmp_path)) == 1
    session.data_received(b".\r\n")
    await asyncio.sleep(0)
    assert bytes(transport.written).endswith(b"250 stored\r\n")
    [spilled] = capture.contents
    assert isinstance(spilled, Spilled)
    assert spilled.read() == (b".y" + b"y" * 20 + b"\r\n") * 5
    spilled.discard()
    assert os.listdir(tmp_path) == []

    session.data_received(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    for _ in range(5):
        await asyncio.sleep(0)
    assert bytes(transport.written).endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    session.data_received(b"z" * 30 + b"\r\n" + b"z" * 30 + b"\r\n" + b"z" * 30 + b"\r\n")
    session.data_received(b"z" * 30 + b"\r\n")
    assert len(os.listdir(tmp_path)) == 1
    session.connection_lost(None)
    assert os.listdir(tmp_path) == []


async def test_an_endless_message_is_not_kept() -> None:
    """Over the size limit, the bytes are dropped as they come (a client cannot fill RAM)."""
    capture = Capture()
    session, transport = _session(capture)
    session.data_received(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n")
    session.data_received(b"DATA\r\n")
    for _ in range(1000):
        session.data_received(b"y" * 30 + b"\r\n")
    assert session._message is not None and session._message.buffered < SIZE_LIMIT + 64
    session.data_received(b".\r\n")
    await asyncio.sleep(0)
    assert bytes(transport.written).endswith(b"552 Error: Too much mail data\r\n")
    assert capture.contents == []


@settings(max_examples=500, deadline=None)
@given(lines, st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=30))
def test_message_reader_alone(body_lines: list[bytes], cuts: list[int]) -> None:
    """The reader without a session: content or error, and exactly the bytes after the dot."""
    stream = b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in body_lines)
    stream += b".\r\nNEXT\r\n"
    reader = MessageReader(size_limit=SIZE_LIMIT, line_limit=LINE_LIMIT)
    position, rest = 0, None
    for cut in [*cuts, len(stream)]:
        rest = reader.feed(stream[position : position + cut])
        position += cut
        if rest is not None:
            break
    assert rest is not None
    assert rest + stream[position:] == b"NEXT\r\n"
    content, error = _expected(body_lines)
    if error is None:
        assert reader.error is None
        assert reader.take() == content
    else:
        assert reader.error is not None and reader.error[:3] in ("500", "552")
        assert reader.content is None
