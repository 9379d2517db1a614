"""httpx's default transport against ``httpx-aiohttp`` under concurrency.

``python -m bench.transport [--concurrency 200] [--latency-ms 100] [--requests 4000]``
POSTs 2 KB JSON bodies through one ``httpx.AsyncClient`` (the same limits esprelay
sets) to the loopback ESP emulator, and reports requests/s and CPU ms per request of
this process (the client side only: the emulator is another process).

``python -m bench.transport --exchange [--concurrency 20] [--latency-ms 0]`` measures
what esprelay spends per delivered message between ``build_request`` and the result:
SendGrid requests for the benchmark's 2 KB message, built beforehand, each sent with
``HttpProvider._exchange`` and read with ``parse_response``, through the client that
``esprelay.httpclient.make_client`` builds and through a plain httpx-aiohttp client
(what it built before), in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from pydantic import SecretStr

from bench.harness import emulator
from esprelay.httpclient import make_client as esprelay_client
from esprelay.models import OutboundMessage
from esprelay.providers.sendgrid import SendGridProvider


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


def plain_aiohttp_client(concurrency: int) -> httpx.AsyncClient:
    """A client as ``esprelay.httpclient.make_client`` built it before its tuning."""
    from httpx_aiohttp import AiohttpTransport

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(
        timeout=httpx.Timeout(30.0),
        limits=limits,
        transport=AiohttpTransport(limits=limits),
        follow_redirects=False,
    )


async def exchange(kind: str, base_url: str, concurrency: int, requests: int) -> float:
    """CPU seconds of this process for ``requests`` SendGrid exchanges."""
    from bench.mime_cpu import ENVELOPE, bench_message

    if kind == "esprelay":
        client, _name = esprelay_client(timeout=30.0, max_connections=concurrency)
    else:
        client = plain_aiohttp_client(concurrency)
    async with client:
        provider = SendGridProvider(client, SecretStr("SG.bench"), base_url)
        message = OutboundMessage("m", ENVELOPE, bench_message())
        built = [provider.build_request(message).request for _ in range(concurrency)]

        async def worker() -> None:
            while built:
                response = await provider._exchange(built.pop())
                provider.parse_response(response, message)

        # Open the connections outside the measurement.
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        built = [provider.build_request(message).request for _ in range(requests)]
        cpu = time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.process_time() - cpu


def run_exchange(args: argparse.Namespace, factory: object) -> None:
    results: dict[str, list[float]] = {"plain": [], "esprelay": []}
    with (
        tempfile.TemporaryDirectory() as tmp,
        emulator(Path(tmp), latency_ms=args.latency_ms, flavour="sendgrid", cpus=None) as emu,
    ):
        base_url = f"http://127.0.0.1:{emu.port}"
        for repeat in range(args.repeats):
            for kind in results:
                with asyncio.Runner(loop_factory=factory) as runner:  # type: ignore[arg-type]
                    cpu = runner.run(exchange(kind, base_url, args.concurrency, args.requests))
                results[kind].append(cpu * 1000 / args.requests)
                print(f"run {repeat + 1} {kind:>8}: {results[kind][-1]:6.3f} ms CPU/exchange")
    plain, tuned = (statistics.median(results[k]) for k in ("plain", "esprelay"))
    print(
        f"median CPU per SendGrid exchange ({args.requests} x 2 KB, concurrency"
        f" {args.concurrency}, API {args.latency_ms:g} ms, {args.loop}): plain httpx-aiohttp"
        f" {plain:.3f} ms, esprelay's client {tuned:.3f} ms ({plain / tuned:.2f}x)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transport")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    parser.add_argument(
        "--exchange",
        action="store_true",
        help="CPU per SendGrid exchange, esprelay's client vs a plain httpx-aiohttp one",
    )
    args = parser.parse_args(argv)
    factory = None
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    if args.exchange:
        run_exchange(args, factory)
        return 0
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
