"""CPU of the SMTP intake alone, per session: ``python -m bench.smtp_micro``.

The real listener (``smtp_factory`` + ``RelayHandler``, exactly as ``esprelay serve``
builds it) runs in this process on the event loop esprelay would pick (uvloop when
installed), in front of an intake that answers ``250`` at once: no spool, no provider.
A load generator in a second process (``bench.loadgen``, pinned to another CPU when
there is one) sends N messages over ``--sessions`` concurrent sessions, a new
connection per message (EHLO, MAIL, RCPT, DATA, QUIT).  The figure is this process's
``time.process_time()`` over the load divided by the sessions: the server's CPU per
session, whatever else the machine is doing.

``--sink`` measures a bare aiosmtpd ``SMTP`` with a handler that answers ``250`` for
comparison (the Python ceiling).  To compare two trees in one go, run this module
with ``PYTHONPATH`` pointing at the other tree's ``src``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from esprelay.dispatch import ProviderSet
from esprelay.intake import IntakeState
from esprelay.smtp.handler import RelayHandler
from esprelay.smtp.server import smtp_factory


class _InstantIntake:
    """An intake that takes every message at once (what the handler calls at DATA)."""

    def __init__(self) -> None:
        self.state = IntakeState()
        self.accepted = 0
        self.providers = ProviderSet({})  # no provider: every extension is advertised

    async def accept(self, envelope: Any, raw: bytes, client: Any) -> str:
        self.accepted += 1
        return "250 2.0.0 Ok: queued as 0123456789abcdef"


class _Sink:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


class _FakeTransport(asyncio.Transport):
    """A socket-less transport: replies go to a buffer, a complete reply wakes the client."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self._protocol = protocol
        self._closing = False
        self._pending = b""
        self.reply: asyncio.Future[bytes] | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._pending += bytes(data)
        last = self._pending[:-2].rpartition(b"\r\n")[2]
        if self._pending.endswith(b"\r\n") and last[3:4] != b"-":
            reply, self._pending = self._pending, b""
            if self.reply is not None and not self.reply.done():
                self.reply.set_result(reply)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            asyncio.get_running_loop().call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()


async def _inmem(factory: Any, count: int, body: bytes) -> float:
    """Drive ``count`` sessions through the protocol without sockets; CPU seconds used."""
    loop = asyncio.get_running_loop()
    commands = [
        b"EHLO loadgen.invalid\r\n",
        b"MAIL FROM:<bench@example.com>\r\n",
        b"RCPT TO:<sink@example.org>\r\n",
        b"DATA\r\n",
        body + b".\r\n",
        b"QUIT\r\n",
    ]
    started = time.process_time()
    for _ in range(count):
        protocol = factory()
        transport = _FakeTransport(protocol)
        transport.reply = loop.create_future()
        protocol.connection_made(transport)
        await transport.reply
        for command in commands:
            transport.reply = loop.create_future()
            protocol.data_received(command)
            reply = await transport.reply
            assert reply[:1] in b"23", reply
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    return time.process_time() - started


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {cpu})


def _client(port: int, sessions: int, count: int, size: int) -> dict[str, Any]:
    code = (
        "import asyncio, json, sys\n"
        "from bench.loadgen import run_load\n"
        f"r = asyncio.run(run_load('127.0.0.1', {port}, sessions={sessions},"
        f" count={count}, size={size}))\n"
        "print(json.dumps({'sent': r.sent, 'errors': r.errors, 'seconds': r.seconds,"
        " 'samples': r.error_samples}))\n"
    )
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cpus = os.cpu_count() or 1
    prefix = ["taskset", "-c", str(max(0, cpus - 2))] if cpus > 1 else []
    out = subprocess.run(
        [*prefix, sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


async def _run(args: argparse.Namespace) -> tuple[list[float], list[float]]:
    if args.sink:
        from aiosmtpd.smtp import SMTP

        def factory() -> Any:
            return SMTP(_Sink(), hostname="sink", enable_SMTPUTF8=True)

    else:
        intake = _InstantIntake()
        handler = RelayHandler(intake, max_recipients=100)  # type: ignore[arg-type]
        factory, _ = smtp_factory(
            handler,
            intake.state,
            hostname="esprelay",
            data_size_limit=25 * 1024 * 1024,
            line_length_limit=65536,
            timeout=300.0,
            engine=args.engine,
        )
    if args.inmem:
        from bench.loadgen import make_message

        body = make_message(args.size, sender="bench@example.com", recipient="sink@example.org")
        await _inmem(factory, 100, body)
        used = [await _inmem(factory, args.count, body) / args.count for _ in range(args.repeats)]
        return used, [0.0]
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    per_session: list[float] = []
    system: list[float] = []
    try:
        # One short warm-up run (imports, caches), then the measured repeats.
        await asyncio.to_thread(_client, port, args.sessions, 50, args.size)
        for _ in range(args.repeats):
            before = os.times()
            result = await asyncio.to_thread(_client, port, args.sessions, args.count, args.size)
            after = os.times()
            used = (after.user - before.user) + (after.system - before.system)
            system.append((after.system - before.system) / result["sent"])
            if result["errors"]:
                raise SystemExit(f"client errors: {result['errors']} {result['samples']}")
            per_session.append(used / result["sent"])
    finally:
        server.close()
        await server.wait_closed()
    return per_session, system


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.smtp_micro")
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sink", action="store_true", help="bare aiosmtpd instead of esprelay")
    parser.add_argument(
        "--inmem", action="store_true", help="no sockets: feed the protocol in this process"
    )
    parser.add_argument("--asyncio", action="store_true", help="asyncio's loop, not uvloop")
    parser.add_argument("--engine", choices=("native", "aiosmtpd"), default="native")
    args = parser.parse_args(argv)
    _pin((os.cpu_count() or 1) - 1)
    run: Any = asyncio.run
    if not args.asyncio:
        try:
            import uvloop

            run = uvloop.run
        except ImportError:
            pass
    per_session, system = run(_run(args))
    name = "aiosmtpd sink" if args.sink else f"esprelay intake ({args.engine} engine)"
    shown = " ".join(f"{1e6 * s:.0f}" for s in per_session)
    print(
        f"{name}: server CPU per session {1e6 * statistics.median(per_session):.0f} us"
        f" (system {1e6 * statistics.median(system):.0f} us; median of {len(per_session)}:"
        f" {shown}; {args.count} x {args.size} B, {args.sessions} sessions)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
