"""The in-run baseline: a bare aiosmtpd server that accepts every message and discards it.

It runs on uvloop when uvloop is installed (as esprelay does), so the ratio
esprelay / sink compares esprelay with the Python ceiling on the same event loop.

Run: ``python -m bench.sink --port 0``; it prints ``sink listening on 127.0.0.1:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import Any

from aiosmtpd.smtp import SMTP


class DiscardHandler:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 2.0.0 Ok: discarded"


async def serve(port: int) -> None:
    handler = DiscardHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="sink", data_size_limit=None, enable_SMTPUTF8=True),
        "127.0.0.1",
        port,
        backlog=4096,
    )
    print(f"sink listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bare aiosmtpd sink")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner, contextlib.suppress(KeyboardInterrupt):
        runner.run(serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
