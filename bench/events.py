"""Signed ESP events per second on one core: verified, stored, and applied.

``python -m bench.events`` measures what issue 17 and issue 19 (target 6) ask:

- ``verify``: CPU microseconds per request spent by the ESP's source alone (signature
  or credential check, JSON parsing, normalising: :meth:`EventSource.receive` called
  directly, no HTTP, no spool), for each ESP (SendGrid, Mailgun, SES through SNS,
  Postmark), and the requests per second one core could verify at that cost;
- ``end to end``: a real ``esprelay serve`` (queue mode, its events listener and event
  processor, the SQLite spool with fsync or ``--spool postgresql``) pinned to one core
  (``--cpus``, as :mod:`bench.harness` pins it), loaded from this process pinned to
  the other core (``--client-cpus``) over ``--concurrency`` keep-alive HTTP
  connections on loopback.  Every request is signed before the clock starts (new
  event ids, new Mailgun tokens), so the client spends its time on HTTP alone.  Each
  event names a message already in the spool (delivered, its esprelay id echoed), so
  the processor applies it to that message's status as in production.

For each scenario (``--scenarios``; SendGrid batches its events, ``sendgrid:N`` posts N
per request; Mailgun posts one per request) the end-to-end figures are:

- ``stored/s``: events acknowledged ``200`` per second (each only once its events are
  committed and fsync'd in the spool's inbox), with the processor applying them in the
  same process on the same core meanwhile;
- ``srv cpu us/ev``: the server's CPU per event while it stored them (``/proc``; the
  processor's share during that time included), and ``capacity/s``: the events one
  core would store at that cost (the rate if the core was not busy all the time);
- ``applied/s``: events stored *and* applied to their messages (the inbox empty again)
  per second, from the first request to the last event processed, and the server's
  CPU per event over that whole time (``all cpu us/ev``).

``--repeats`` runs each scenario that many times (a new server and spool each) and
prints the median of each figure.  The box is shared: the server's CPU per event is
the steadier figure when other work competes for its core.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.harness import Service, _base_env, bench_database, cpu_seconds, pin
from esprelay.config import Settings
from esprelay.events.fakes import CertServer, FakeMailgun, FakePostmark, FakeSendgrid, FakeSns
from esprelay.events.model import WebhookRequest
from esprelay.events.service import build_sources
from esprelay.events.settings import SourceContext
from esprelay.models import Envelope
from esprelay.routing import parse_routing
from esprelay.spool import NewPart, open_spool

ROUTES: dict[str, Any] = {
    "providers": {
        "sendgrid": {"kind": "sendgrid", "api_key": "SG.x"},
        "mailgun": {"kind": "mailgun", "api_key": "k", "domain": "mg.example.com"},
        "ses": {"kind": "ses", "region": "eu-west-1"},
        "postmark": {"kind": "postmark", "server_token": "t"},
    }
}
ROUTES_TOML = """\
[providers.sendgrid]
kind = "sendgrid"
api_key = "SG.x"

[providers.mailgun]
kind = "mailgun"
api_key = "k"
domain = "mg.example.com"
"""
DEFAULT_SCENARIOS = "sendgrid:1,sendgrid:10,sendgrid:100,mailgun:1"

Request = tuple[bytes, dict[str, str]]
Maker = Callable[[int], Request]


class Keys:
    """The fake ESPs whose keys the listener is given."""

    def __init__(self) -> None:
        self.sendgrid = FakeSendgrid()
        self.mailgun = FakeMailgun()
        self.sns = FakeSns()
        self.postmark = FakePostmark()

    def environ(self) -> dict[str, str]:
        return {
            "ESPRELAY_SENDGRID_WEBHOOK_PUBLIC_KEY": self.sendgrid.public_key,
            "ESPRELAY_MAILGUN_WEBHOOK_SIGNING_KEY": self.mailgun.signing_key,
            "ESPRELAY_SES_SNS_TOPIC_ARNS": self.sns.topic_arn,
            "ESPRELAY_POSTMARK_WEBHOOK_USER": self.postmark.user,
            "ESPRELAY_POSTMARK_WEBHOOK_PASSWORD": self.postmark.password,
        }

    def maker(
        self, esp: str, batch: int, *, ids: list[str] | None = None, certs: CertServer | None = None
    ) -> Maker:
        """Request ``i`` of ``esp``: ``batch`` events (SendGrid), else one; naming the
        messages of ``ids`` in turn when given."""

        def message(n: int) -> str | None:
            return None if not ids else ids[n % len(ids)]

        if esp == "sendgrid":
            sendgrid = self.sendgrid

            def sendgrid_request(i: int) -> Request:
                events = [
                    sendgrid.event(
                        "delivered",
                        f"r{i}-{j}@example.net",
                        esprelay_id=message(i * batch + j),
                        response="250 OK",
                    )
                    for j in range(batch)
                ]
                return sendgrid.request(events)

            return sendgrid_request
        if esp == "mailgun":
            mailgun = self.mailgun

            def mailgun_request(i: int) -> Request:
                event = mailgun.event("delivered", f"r{i}@example.net", esprelay_id=message(i))
                return mailgun.request(event)

            return mailgun_request
        if esp == "ses":
            sns = self.sns
            assert certs is not None
            cert_url = certs.cert_url
            return lambda i: sns.notification(sns.bounce(f"r{i}@example.net"), cert_url=cert_url)
        if esp == "postmark":
            postmark = self.postmark
            return lambda i: postmark.request(postmark.bounce(f"r{i}@example.net"))
        raise ValueError(f"unknown ESP {esp!r}")


# region verification alone (in this process, no HTTP, no spool)


async def verify(count: int, batch: int) -> list[dict[str, Any]]:
    """CPU per request of each ESP's source, called directly."""
    keys = Keys()
    certs = await CertServer(keys.sns.certificate_pem).start()
    fetcher = certs.client()
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    settings._environ = keys.environ()
    context = SourceContext(
        tolerance=settings.events_timestamp_tolerance,
        now=time.time,
        client=fetcher,
        overrides={"sns_url_allowed": certs.url_allowed},
    )
    sources = build_sources(settings, parse_routing(ROUTES, settings, settings.environ), context)
    rows = []
    try:
        for esp in ("sendgrid", "mailgun", "ses", "postmark"):
            size = batch if esp == "sendgrid" else 1
            make = keys.maker(esp, size, certs=certs)
            source = sources[esp]
            # The first fetches the SNS certificate (then cached): not counted.
            body, headers = make(0)
            await source.receive(WebhookRequest("POST", headers, body, "127.0.0.1"))
            requests = [make(i) for i in range(1, count + 1)]
            events = 0
            started = time.process_time()
            for body, headers in requests:
                events += len(await source.receive(WebhookRequest("POST", headers, body, "x")))
            cpu = time.process_time() - started
            us = cpu / count * 1e6
            rows.append(
                {
                    "esp": esp,
                    "events_per_request": events // count,
                    "verify_us_per_request": round(us, 1),
                    "verify_us_per_event": round(us * count / max(1, events), 1),
                    "verify_requests_per_s_one_core": round(1e6 / us) if us else None,
                }
            )
    finally:
        for source in sources.values():
            await source.aclose()
        await fetcher.aclose()
        await certs.close()
    return rows


# endregion
# region end to end: esprelay serve on one core, the load from the other


@dataclass
class Figures:
    scenario: str
    requests: int
    events_per_request: int
    stored: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    seconds: float = 0.0
    server_cpu_s: float = 0.0
    applied_seconds: float | None = None
    applied_server_cpu_s: float | None = None
    applied: int | None = None
    # The server's CPU seconds while storing: its event loop's, its other threads'.
    threads: dict[str, float] = field(default_factory=dict)

    @property
    def stored_per_s(self) -> float:
        return self.stored / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_event(self) -> float:
        return self.server_cpu_s / max(1, self.stored) * 1e6

    @property
    def capacity_per_s(self) -> float:
        return self.stored / self.server_cpu_s if self.server_cpu_s else 0.0

    @property
    def applied_per_s(self) -> float | None:
        if not self.applied_seconds or self.applied is None:
            return None
        return self.applied / self.applied_seconds

    @property
    def all_cpu_us_per_event(self) -> float | None:
        if self.applied_server_cpu_s is None:
            return None
        return self.applied_server_cpu_s / max(1, self.stored) * 1e6

    def summary(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "stored_per_s": round(self.stored_per_s),
            "server_cpu_us_per_event": round(self.cpu_us_per_event, 1),
            "capacity_per_s_one_core": round(self.capacity_per_s),
            "applied_per_s": None if self.applied_per_s is None else round(self.applied_per_s),
            "all_cpu_us_per_event": None
            if self.all_cpu_us_per_event is None
            else round(self.all_cpu_us_per_event, 1),
        }


def _encode(path: str, port: int, request: Request) -> bytes:
    body, headers = request
    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {len(body)}"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _post_all(port: int, payloads: list[bytes], concurrency: int, figures: Figures) -> None:
    """POST every payload over ``concurrency`` keep-alive connections."""
    waiting = iter(payloads)

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for payload in waiting:
                writer.write(payload)
                status = await reader.readline()
                length = 0
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                if status.split(b" ", 2)[1:2] == [b"200"]:
                    figures.stored += int(orjson.loads(body)["stored"])
                else:
                    figures.errors += 1
                    if len(figures.error_samples) < 5:
                        figures.error_samples.append((status + body).decode(errors="replace"))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    await asyncio.gather(*(connection() for _ in range(concurrency)))


class _Inbox:
    """Reads the server's spool: events pending, and timeline entries applied."""

    def __init__(self, spool: str, target: str) -> None:
        self.spool = spool
        self.target = target

    async def counts(self) -> tuple[int, int]:
        if self.spool == "sqlite":
            conn = sqlite3.connect(f"file:{self.target}?mode=ro", uri=True, timeout=30)
            try:
                pending = conn.execute(
                    "SELECT count(*) FROM event_inbox WHERE processed_at IS NULL"
                ).fetchone()[0]
                applied = conn.execute("SELECT count(*) FROM message_timeline").fetchone()[0]
            finally:
                conn.close()
            return int(pending), int(applied)
        import asyncpg

        conn = await asyncpg.connect(self.target)
        try:
            pending = await conn.fetchval(
                "SELECT count(*) FROM esprelay_events WHERE processed_at IS NULL"
            )
            applied = await conn.fetchval("SELECT count(*) FROM esprelay_message_timeline")
        finally:
            await conn.close()
        return int(pending), int(applied)


async def _seed(spool_url: str, count: int) -> list[str]:
    """``count`` delivered messages in the spool, for the events to name."""
    spool = open_spool(spool_url)
    await spool.open()
    try:
        ids: list[str] = []
        envelope = Envelope("sender@example.com", ("r@example.net",))
        raw = b"From: sender@example.com\r\nTo: r@example.net\r\nSubject: x\r\n\r\nx\r\n"
        for start in range(0, count, 200):
            puts = [
                spool.put_parts(
                    raw,
                    [NewPart(envelope, "sendgrid", {})],
                    lease_owner="bench",
                    lease_time=3600,
                )
                for _ in range(min(200, count - start))
            ]
            new = [id for ids_ in await asyncio.gather(*puts) for id in ids_]
            await asyncio.gather(
                *(
                    spool.mark_delivered(
                        id, owner="bench", provider="sendgrid", provider_message_id=None
                    )
                    for id in new
                )
            )
            ids.extend(new)
        return ids
    finally:
        await spool.close()


@contextlib.contextmanager
def _spool_target(spool: str, workdir: Path) -> Iterator[tuple[str, str]]:
    """(ESPRELAY_SPOOL_URL, what _Inbox reads) for a new spool."""
    if spool == "sqlite":
        path = workdir / "spool" / "spool.db"
        yield f"sqlite:///{path}", str(path)
    else:
        with bench_database() as (url, _name):
            yield url, url


def end_to_end(
    scenario: str,
    *,
    requests: int,
    concurrency: int,
    spool: str,
    cpus: set[int] | None,
    profile: Path | None = None,
) -> Figures:
    esp, _, size = scenario.partition(":")
    batch = int(size or 1)
    keys = Keys()
    figures = Figures(scenario, requests, batch)
    with tempfile.TemporaryDirectory(prefix="esprelay-bench-events-") as directory:
        workdir = Path(directory)
        (workdir / "routes.toml").write_text(ROUTES_TOML)
        with _spool_target(spool, workdir) as (url, target):
            ids = asyncio.run(_seed(url, min(requests * batch, 20_000)))
            maker = keys.maker(esp, batch, ids=ids)
            path = f"/webhooks/{esp}"
            env = _base_env()
            env.update(keys.environ())
            env.update(
                {
                    "ESPRELAY_SMTP_HOST": "127.0.0.1",
                    "ESPRELAY_SMTP_PORT": "0",
                    # The ops listener on a free port, so concurrent runs do not collide.
                    "ESPRELAY_HTTP_PORT": "0",
                    "ESPRELAY_SPOOL_URL": url,
                    "ESPRELAY_ROUTES_FILE": str(workdir / "routes.toml"),
                    "ESPRELAY_EVENTS_HOST": "127.0.0.1",
                    "ESPRELAY_EVENTS_PORT": "0",
                    # Every request comes from 127.0.0.1: no per-peer limit here.
                    "ESPRELAY_EVENTS_RATE_LIMIT": "1000000000",
                    "ESPRELAY_EVENTS_RATE_BURST": "1000000000",
                    "ESPRELAY_SHUTDOWN_GRACE": "5",
                }
            )
            server = Service(
                [sys.executable, "-m", "esprelay", "serve"],
                env=env,
                cwd=workdir,
                log=workdir / "esprelay.log",
                pattern=r"events listening on [^:]+:(\d+)",
            )
            try:
                pin(server.pid, cpus)
                for task in Path(f"/proc/{server.pid}/task").iterdir():
                    pin(int(task.name), cpus)  # its threads (the spool's writer) too
                payloads = [_encode(path, server.port, maker(i)) for i in range(requests)]
                spy = None if profile is None else _py_spy(server.pid, profile)
                asyncio.run(_load(server, payloads, concurrency, figures, _Inbox(spool, target)))
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(60)
            finally:
                server.stop()
            if figures.errors:
                print(f"errors in {scenario}: {figures.error_samples}", file=sys.stderr)
    return figures


def _py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling ``pid`` into ``out`` (raw collapsed stacks) until interrupted."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    spy = subprocess.Popen(
        [pyspy, "record", "--format", "raw", "--rate", "250", "--nonblocking",
         "-o", str(out), "--pid", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(1.0)
    return spy


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of ``pid``'s main thread (the event loop) and of its other threads
    (the SQLite spool's writer; asyncio's default executor)."""
    times: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            name = "event loop" if int(task.name) == pid else "other threads"
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            times[name] = times.get(name, 0.0) + seconds
    return times


async def _load(
    server: Service, payloads: list[bytes], concurrency: int, figures: Figures, inbox: _Inbox
) -> None:
    threads = _thread_cpu(server.pid)
    cpu, wall = cpu_seconds(server.pid), time.perf_counter()
    await _post_all(server.port, payloads, concurrency, figures)
    figures.seconds = time.perf_counter() - wall
    figures.server_cpu_s = cpu_seconds(server.pid) - cpu
    figures.threads = {
        name: round(seconds - threads.get(name, 0.0), 3)
        for name, seconds in _thread_cpu(server.pid).items()
        if seconds - threads.get(name, 0.0) > 0
    }
    deadline = time.perf_counter() + 300
    while time.perf_counter() < deadline:
        pending, applied = await inbox.counts()
        if pending == 0:
            figures.applied_seconds = time.perf_counter() - wall
            figures.applied_server_cpu_s = cpu_seconds(server.pid) - cpu
            figures.applied = applied
            return
        await asyncio.sleep(0.02)


# endregion


def _median(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def _cpus(text: str) -> set[int] | None:
    return {int(cpu) for cpu in text.split(",")} if text else None


def _profile_path(args: argparse.Namespace, scenario: str) -> Path:
    assert args.profile is not None
    return args.profile.with_name(f"{args.profile.name}.{scenario.replace(':', '-')}.txt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.events", description=__doc__)
    parser.add_argument("--events", type=int, default=20_000, help="events per end-to-end scenario")
    parser.add_argument(
        "--scenarios",
        default=DEFAULT_SCENARIOS,
        help="ESP:EVENTS_PER_REQUEST, comma-separated (default %(default)s)",
    )
    parser.add_argument("--concurrency", type=int, default=32, help="connections in flight")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--spool", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--cpus", default="0", help="esprelay's cores ('' = unpinned)")
    parser.add_argument("--client-cpus", default="1", help="the load's cores")
    parser.add_argument("--verify-count", type=int, default=2000, help="requests per ESP")
    parser.add_argument("--verify-batch", type=int, default=10, help="SendGrid's, for verify")
    parser.add_argument("--no-verify", action="store_true")
    parser.add_argument("--json", type=Path, help="write every run's figures there")
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy the server in the first run of each scenario: collapsed stacks to"
        " PROFILE.<scenario>.txt, and a summary printed",
    )
    args = parser.parse_args(argv)
    cpus, client_cpus = _cpus(args.cpus), _cpus(args.client_cpus)
    pin(os.getpid(), client_cpus)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    report: dict[str, Any] = {"verify": [], "end_to_end": []}
    if not args.no_verify:
        report["verify"] = asyncio.run(verify(args.verify_count, args.verify_batch))
        print("verification alone (one core, no HTTP, no spool):")
        print(f"{'esp':<10}{'events/req':>11}{'us/req':>9}{'us/event':>10}{'req/s one core':>16}")
        for row in report["verify"]:
            print(
                f"{row['esp']:<10}{row['events_per_request']:>11}"
                f"{row['verify_us_per_request']:>9}{row['verify_us_per_event']:>10}"
                f"{row['verify_requests_per_s_one_core']!s:>16}"
            )
    print(
        f"\nend to end, esprelay serve on cpus {args.cpus or 'any'} ({args.spool} spool),"
        f" load on cpus {args.client_cpus or 'any'}, {args.concurrency} connections,"
        f" medians of {args.repeats}:"
    )
    print(
        f"{'scenario':<15}{'stored/s':>10}{'srv cpu us/ev':>15}{'capacity/s':>12}"
        f"{'applied/s':>11}{'all cpu us/ev':>15}{'errors':>8}"
    )
    for scenario in args.scenarios.split(","):
        batch = int(scenario.partition(":")[2] or 1)
        runs = [
            end_to_end(
                scenario,
                requests=max(1, args.events // batch),
                concurrency=args.concurrency,
                spool=args.spool,
                cpus=cpus,
                profile=None if args.profile is None or repeat else _profile_path(args, scenario),
            )
            for repeat in range(args.repeats)
        ]
        report["end_to_end"].extend(run.summary() for run in runs)
        stored = _median([run.stored_per_s for run in runs])
        cpu = _median([run.cpu_us_per_event for run in runs])
        capacity = _median([run.capacity_per_s for run in runs])
        applied = _median([run.applied_per_s for run in runs])
        all_cpu = _median([run.all_cpu_us_per_event for run in runs])
        print(
            f"{scenario:<15}{stored or 0:>10.0f}{cpu or 0:>15.1f}{capacity or 0:>12.0f}"
            f"{applied or 0:>11.0f}{all_cpu or 0:>15.1f}{sum(r.errors for r in runs):>8}",
            flush=True,
        )
        if args.profile is not None:
            from bench.profile import summarise

            print(summarise(_profile_path(args, scenario)), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
