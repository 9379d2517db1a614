"""CompactDataSMTP answers and stores exactly what aiosmtpd's own DATA does."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from esprelay.smtp.data import CompactDataSMTP


class Recorder:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(envelope.original_content)
        return "250 stored"


async def _exchange(protocol: type[SMTP], body: bytes) -> tuple[list[bytes], list[bytes]]:
    recorder = Recorder()

    class Limited(protocol):  # type: ignore[valid-type, misc]
        line_length_limit = 200

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Limited(recorder, hostname="t", data_size_limit=4000), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    replies: list[bytes] = []
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        for command in (
            b"HELO t\r\n",
            b"MAIL FROM:<a@b.example>\r\n",
            b"RCPT TO:<c@d.example>\r\n",
        ):
            writer.write(command)
            replies.append(await reader.readline())
        writer.write(b"DATA\r\n")
        replies.append(await reader.readline())
        writer.write(body)
        replies.append(await reader.readline())
        writer.write(b"QUIT\r\n")
        await reader.readline()
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    return replies, recorder.messages


BODIES = {
    "plain": b"Subject: x\r\n\r\nhello\r\n.\r\n",
    "dot-stuffed": b"Subject: x\r\n\r\n..leading dot\r\n.\r\n..\r\n...\r\n.\r\n",
    "bare-lf-inside": b"Subject: x\r\n\r\na\nb\r\n.\r\n",
    "empty": b".\r\n",
    "too-much": b"Subject: x\r\n\r\n"
    + b"y" * 70
    + b"\r\n" * 1
    + (b"z" * 70 + b"\r\n") * 80
    + b".\r\n",
    "line-too-long": b"Subject: x\r\n\r\n" + b"w" * 500 + b"\r\nshort\r\n.\r\n",
    "long-then-too-much": b"v" * 300 + b"\r\n" + (b"u" * 70 + b"\r\n") * 80 + b".\r\n",
    "utf8": "Subject: é\r\n\r\nça va\r\n.\r\n".encode(),
}


@pytest.mark.parametrize("name", sorted(BODIES))
async def test_same_replies_and_content_as_aiosmtpd(name: str) -> None:
    body = BODIES[name]
    ours = await _exchange(CompactDataSMTP, body)
    theirs = await _exchange(SMTP, body)
    assert ours == theirs
