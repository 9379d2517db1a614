"""A fast loopback ESP emulator: answers POSTs like an ESP, after a configurable latency.

It counts every request it answers successfully, so the benchmark can say "delivered"
only once the emulator has seen each message.  ``GET /__stats`` returns the counters as
JSON.  The HTTP/1.1 parsing is deliberately minimal (Content-Length bodies, keep-alive):
it is a load sink for our own client, not a general server, and it must cost little CPU
because it shares the machine with what it measures.

Flavours mimic the success answer of the adapter under test:

- ``sendgrid``: ``202 Accepted``, empty body, ``X-Message-Id`` header;
- ``postmark``: ``200 OK``, ``{"ErrorCode":0,"Message":"OK","MessageID":...}``;
- ``generic``:  ``200 OK``, ``{"id": ...}``.

Run: ``python -m bench.emulator --port 0 --latency-ms 100 --flavour postmark``; it
prints ``emulator listening on 127.0.0.1:PORT`` once ready.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
import uuid
from typing import cast

_counter = itertools.count(1)


class Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.connections = 0


def _answer(flavour: str) -> bytes:
    n = next(_counter)
    if flavour == "sendgrid":
        return (
            b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\nX-Message-Id: emu"
            + str(n).encode()
            + b"\r\n\r\n"
        )
    if flavour == "postmark":
        body = json.dumps(
            {
                "To": "x",
                "SubmittedAt": "2026-01-01T00:00:00Z",
                "MessageID": str(uuid.UUID(int=n)),
                "ErrorCode": 0,
                "Message": "OK",
            }
        ).encode()
    else:
        body = b'{"id": "emu' + str(n).encode() + b'"}'
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


class EmulatorProtocol(asyncio.Protocol):
    def __init__(self, stats: Stats, flavour: str, latency: float) -> None:
        self.stats = stats
        self.flavour = flavour
        self.latency = latency
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.need: int | None = None  # body bytes still expected
        self.head: bytes = b""
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.stats.connections += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.need is None:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                self.head = bytes(self.buffer[:end])
                del self.buffer[: end + 4]
                length = 0
                for line in self.head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                self.need = length
            if len(self.buffer) < self.need:
                return
            body_len = self.need
            del self.buffer[: self.need]
            self.need = None
            self._respond(self.head, body_len)

    def _respond(self, head: bytes, body_len: int) -> None:
        request_line = head.split(b"\r\n", 1)[0]
        if request_line.startswith(b"GET /__stats"):
            body = json.dumps(
                {
                    "requests": self.stats.requests,
                    "bytes": self.stats.bytes,
                    "connections": self.stats.connections,
                }
            ).encode()
            reply = (
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )
            self._send(reply, count=False)
            return
        self.stats.bytes += body_len
        reply = _answer(self.flavour)
        if self.latency > 0:
            self.loop.call_later(self.latency, self._send, reply, True)
        else:
            self._send(reply, True)

    def _send(self, reply: bytes, count: bool) -> None:
        if count:
            self.stats.requests += 1
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply)


async def serve(port: int, flavour: str, latency: float) -> None:
    stats = Stats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: EmulatorProtocol(stats, flavour, latency), "127.0.0.1", port, backlog=4096
    )
    bound = server.sockets[0].getsockname()[1]
    print(f"emulator listening on 127.0.0.1:{bound}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--flavour", choices=("sendgrid", "postmark", "generic"), default="generic")
    args = parser.parse_args(argv)
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner, contextlib.suppress(KeyboardInterrupt):
        runner.run(serve(args.port, args.flavour, args.latency_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
