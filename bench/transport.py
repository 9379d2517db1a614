"""httpx's default transport against ``httpx-aiohttp`` under concurrency.

``python -m bench.transport [--concurrency 200] [--latency-ms 100] [--requests 4000]``
POSTs 2 KB JSON bodies through one ``httpx.AsyncClient`` (the same limits esprelay
sets) to the loopback ESP emulator, and reports requests/s and CPU ms per request of
this process (the client side only: the emulator is another process).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.harness import emulator


def make_client(kind: str, concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    transport: httpx.AsyncBaseTransport | None = None
    if kind == "aiohttp":
        from httpx_aiohttp import AiohttpTransport

        transport = AiohttpTransport(limits=limits)
    return httpx.AsyncClient(
        timeout=httpx.Timeout(30.0), limits=limits, transport=transport, follow_redirects=False
    )


async def drive(kind: str, url: str, concurrency: int, requests: int) -> tuple[float, float]:
    body = b'{"x": "' + b"a" * 2000 + b'"}'
    remaining = requests
    async with make_client(kind, concurrency) as client:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                response = await client.post(
                    url, content=body, headers={"Content-Type": "application/json"}
                )
                await response.aread()
                response.raise_for_status()

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transport")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    args = parser.parse_args(argv)
    factory = None
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with (
        tempfile.TemporaryDirectory() as tmp,
        emulator(Path(tmp), latency_ms=args.latency_ms, flavour="generic", cpus=None) as emu,
    ):
        url = f"http://127.0.0.1:{emu.port}/send"
        for repeat in range(args.repeats):
            for kind in ("httpx", "aiohttp"):
                with asyncio.Runner(loop_factory=factory) as runner:
                    wall, cpu = runner.run(drive(kind, url, args.concurrency, args.requests))
                print(
                    f"run {repeat + 1} {kind:>7}: {args.requests / wall:7.0f} req/s"
                    f"  {cpu * 1000 / args.requests:6.3f} ms CPU/req"
                    f"  (concurrency {args.concurrency}, API {args.latency_ms:g} ms,"
                    f" {args.loop})",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
