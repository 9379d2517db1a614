"""A bounded SMTP load generator with the shape of Postfix's ``smtp-source -s N``.

``sessions`` concurrent workers share a fixed count of messages; each message is sent
over a NEW connection (greeting, EHLO, MAIL, RCPT, DATA, body, ``.``, QUIT), with one
command per round trip and a fixed message size.  The latency recorded per message is
from the moment the final ``.`` is written to the moment the ``250`` arrives: the
time the server takes to make the message safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

LINE = 78  # bytes per body line, CRLF included


def make_message(size: int, *, sender: str, recipient: str) -> bytes:
    """A plain text message of exactly ``size`` bytes (at least the headers' size)."""
    head = (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: esprelay benchmark\r\n"
        "Message-ID: <bench@esprelay.invalid>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    remaining = max(0, size - len(head))
    line = b"x" * (LINE - 2) + b"\r\n"
    full, rest = divmod(remaining, LINE)
    body = line * full
    if rest >= 2:
        body += b"y" * (rest - 2) + b"\r\n"
    elif rest == 1:
        body = b"z" + body if body else b"\n"
    return head + body


@dataclass
class LoadResult:
    sent: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, end of DATA -> 250
    error_samples: list[str] = field(default_factory=list)

    def percentile(self, p: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))
        return ordered[index]


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """Read one (possibly multi-line) SMTP reply; return its last line."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed by server")
        if len(line) < 4 or line[3:4] != b"-":
            return line


async def _expect(reader: asyncio.StreamReader, code: bytes) -> None:
    line = await _reply(reader)
    if not line.startswith(code):
        raise RuntimeError(line.decode(errors="replace").strip())


async def _one(
    host: str, port: int, body: bytes, sender: bytes, recipient: bytes, result: LoadResult
) -> None:
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 16)
    try:
        await _expect(reader, b"220")
        writer.write(b"EHLO loadgen.invalid\r\n")
        await _expect(reader, b"250")
        writer.write(b"MAIL FROM:<" + sender + b">\r\n")
        await _expect(reader, b"250")
        writer.write(b"RCPT TO:<" + recipient + b">\r\n")
        await _expect(reader, b"250")
        writer.write(b"DATA\r\n")
        await _expect(reader, b"354")
        writer.write(body)
        await writer.drain()
        writer.write(b".\r\n")
        started = time.perf_counter()
        await _expect(reader, b"250")
        result.latencies.append(time.perf_counter() - started)
        writer.write(b"QUIT\r\n")
        await _reply(reader)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def run_load(
    host: str,
    port: int,
    *,
    sessions: int,
    count: int,
    size: int,
    sender: str = "bench@example.com",
    recipient: str = "sink@example.org",
    ports: Sequence[int] = (),
) -> LoadResult:
    """Send ``count`` messages of ``size`` bytes over ``sessions`` concurrent sessions.

    With ``ports`` (several servers on ``host``), session ``i`` always connects to
    ``ports[i % len(ports)]``: the sessions are spread evenly, and ``port`` is unused.
    """
    body = make_message(size, sender=sender, recipient=recipient)
    result = LoadResult()
    remaining = count
    from_b, to_b = sender.encode(), recipient.encode()
    targets = list(ports) or [port]

    async def worker(port: int) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            try:
                await _one(host, port, body, from_b, to_b, result)
                result.sent += 1
            except Exception as exc:
                result.errors += 1
                if len(result.error_samples) < 5:
                    result.error_samples.append(f"{type(exc).__name__}: {exc}")

    started = time.perf_counter()
    await asyncio.gather(*(worker(targets[i % len(targets)]) for i in range(min(sessions, count))))
    result.seconds = time.perf_counter() - started
    return result
