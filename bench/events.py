"""Signed ESP events per second: verification alone, and through the real listener.

``python -m bench.events [--count 2000] [--batch 1] [--concurrency 8]`` prints, for each
ESP (SendGrid, Mailgun, SES through SNS, Postmark):

- ``verify``: CPU microseconds per request spent by the ESP's source alone (signature or
  credential check, JSON parsing, normalising; :meth:`EventSource.receive` called
  directly, no HTTP, no spool), and the requests per second one core could verify;
- ``end to end``: events per second posted through the real listener on loopback HTTP
  into a fresh SQLite spool (each request acknowledged only once its events are on
  disk), with ``--concurrency`` requests in flight, and the process CPU per event
  (client included: it signs every request, so this is an upper bound).

SendGrid batches: ``--batch N`` puts N events in each of its requests (the other ESPs
post one event per request).  The SNS certificate is served by a loopback HTTPS server
and fetched once (then cached), as in production.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from esprelay.config import Settings
from esprelay.events.fakes import CertServer, FakeMailgun, FakePostmark, FakeSendgrid, FakeSns
from esprelay.events.model import WebhookRequest
from esprelay.events.service import start_events
from esprelay.routing import parse_routing
from esprelay.spool.sqlite import SqliteSpool

ROUTES: dict[str, Any] = {
    "providers": {
        "sendgrid": {"kind": "sendgrid", "api_key": "SG.x"},
        "mailgun": {"kind": "mailgun", "api_key": "k", "domain": "mg.example.com"},
        "ses": {"kind": "ses", "region": "eu-west-1"},
        "postmark": {"kind": "postmark", "server_token": "t"},
    }
}

Maker = Callable[[int], tuple[bytes, dict[str, str]]]


def makers(
    sendgrid: FakeSendgrid,
    mailgun: FakeMailgun,
    sns: FakeSns,
    postmark: FakePostmark,
    certs: CertServer,
    batch: int,
) -> dict[str, Maker]:
    def sendgrid_request(i: int) -> tuple[bytes, dict[str, str]]:
        events = [
            sendgrid.event("bounce", f"r{i}-{j}@example.net", status="5.1.1", reason="550 no")
            for j in range(batch)
        ]
        return sendgrid.request(events)

    def mailgun_request(i: int) -> tuple[bytes, dict[str, str]]:
        return mailgun.request(
            mailgun.event("failed", f"r{i}@example.net", severity="permanent", reason="bounce")
        )

    def ses_request(i: int) -> tuple[bytes, dict[str, str]]:
        return sns.notification(sns.bounce(f"r{i}@example.net"), cert_url=certs.cert_url)

    def postmark_request(i: int) -> tuple[bytes, dict[str, str]]:
        return postmark.request(postmark.bounce(f"r{i}@example.net"))

    return {
        "sendgrid": sendgrid_request,
        "mailgun": mailgun_request,
        "ses": ses_request,
        "postmark": postmark_request,
    }


async def run(count: int, batch: int, concurrency: int) -> list[dict[str, Any]]:
    sendgrid, mailgun, sns, postmark = FakeSendgrid(), FakeMailgun(), FakeSns(), FakePostmark()
    certs = await CertServer(sns.certificate_pem).start()
    fetcher = certs.client()
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        spool = SqliteSpool(Path(directory) / "spool.db", exclusive=True)
        await spool.open()
        settings = Settings(_env_file=None, events_port=0, events_rate_limit=1e9)  # type: ignore[call-arg]
        settings._environ = {
            "ESPRELAY_SENDGRID_WEBHOOK_PUBLIC_KEY": sendgrid.public_key,
            "ESPRELAY_MAILGUN_WEBHOOK_SIGNING_KEY": mailgun.signing_key,
            "ESPRELAY_SES_SNS_TOPIC_ARNS": sns.topic_arn,
            "ESPRELAY_POSTMARK_WEBHOOK_USER": postmark.user,
            "ESPRELAY_POSTMARK_WEBHOOK_PASSWORD": postmark.password,
        }
        listener = await start_events(
            settings,
            routing=parse_routing(ROUTES, settings, settings.environ),
            spool=spool,
            metrics=None,
            client=fetcher,
            overrides={"sns_url_allowed": certs.url_allowed},
        )
        assert listener is not None
        try:
            make = makers(sendgrid, mailgun, sns, postmark, certs, batch)
            async with httpx.AsyncClient(timeout=30) as client:
                for name, maker in make.items():
                    rows.append(await _one(name, maker, listener, client, count, concurrency))
        finally:
            await listener.close()
            await spool.close()
            await fetcher.aclose()
            await certs.close()
    return rows


async def _one(
    name: str,
    maker: Maker,
    listener: Any,
    client: httpx.AsyncClient,
    count: int,
    concurrency: int,
) -> dict[str, Any]:
    source = listener.sources[name]
    requests = [maker(i) for i in range(count)]
    # Verification alone: every request through the source once (the certificate of
    # SNS is fetched by the first and cached).
    await source.receive(WebhookRequest("POST", requests[0][1], requests[0][0], "127.0.0.1"))
    if name == "mailgun":  # its tokens may be used once: sign the same events again
        requests = [maker(i) for i in range(count)]
    started = time.process_time()
    events = 0
    for body, headers in requests[1:]:
        events += len(await source.receive(WebhookRequest("POST", headers, body, "127.0.0.1")))
    verify_cpu = time.process_time() - started
    per_request_us = verify_cpu / max(1, len(requests) - 1) * 1e6
    # End to end: fresh requests (new event ids, new tokens) through HTTP into the spool.
    requests = [maker(count + i) for i in range(count)]
    queue: asyncio.Queue[tuple[bytes, dict[str, str]]] = asyncio.Queue()
    for item in requests:
        queue.put_nowait(item)
    stored = 0
    url = f"http://127.0.0.1:{listener.port}/webhooks/{name}"

    async def worker() -> None:
        nonlocal stored
        while not queue.empty():
            body, headers = queue.get_nowait()
            response = await client.post(url, content=body, headers=headers)
            response.raise_for_status()
            stored += int(response.json()["stored"])

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "esp": name,
        "events_per_request": events // max(1, len(requests) - 1) if events else 0,
        "verify_us_per_request": round(per_request_us, 1),
        "verify_requests_per_s_one_core": round(1e6 / per_request_us) if per_request_us else None,
        "end_to_end_events_per_s": round(stored / wall) if wall else None,
        "end_to_end_cpu_us_per_event": round(cpu / max(1, stored) * 1e6, 1),
        "stored": stored,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.events", description=__doc__)
    parser.add_argument("--count", type=int, default=2000, help="requests per ESP")
    parser.add_argument("--batch", type=int, default=1, help="events per SendGrid request")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    rows = asyncio.run(run(args.count, args.batch, args.concurrency))
    print(
        f"{'esp':<10}{'verify us/req':>15}{'verify req/s':>14}"
        f"{'e2e events/s':>14}{'e2e cpu us/event':>18}"
    )
    for row in rows:
        print(
            f"{row['esp']:<10}{row['verify_us_per_request']:>15}"
            f"{row['verify_requests_per_s_one_core']!s:>14}"
            f"{row['end_to_end_events_per_s']!s:>14}{row['end_to_end_cpu_us_per_event']:>18}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
