"""Several esprelay instances sharing one PostgreSQL spool (``python -m bench --instances``).

:func:`measure_shared` starts ``instances`` ``esprelay serve`` processes, each on a port
of its own, all with ``ESPRELAY_SPOOL_URL`` pointing at one throw-away database (created
on the server of ``pg_admin_url`` and dropped after the run) and all delivering to one
ESP emulator.  The load generator spreads its sessions over them (session ``i`` talks to
instance ``i % instances``; with ``smtp-source``, one process per instance with its
share of sessions and messages).  Delivered is the emulator's count, as for one
instance.

The figures are those of :func:`bench.harness.measure` for the PostgreSQL spool, summed
over the instances (esprelay CPU, round trips), plus what tells whether the instances
get in each other's way on the database:

- **deadlocks**: ``pg_stat_database.deadlocks`` of the run's database, after minus
  before;
- **lock waits**: a thread samples ``pg_stat_activity`` for the run's database every
  ``sample_interval`` seconds (from a connection to the maintenance database, so its
  own work is not counted as the run's).  Each active backend seen counts once under
  its wait event (``Lock:transactionid``, ``LWLock:WALWrite``, ``IO:WALSync``, ...) or
  under ``CPU`` when it waits for nothing; ``lock_wait_share`` is the share of those
  observations waiting on a heavyweight lock (``Lock:*``): rows another transaction
  holds, which ``FOR UPDATE SKIP LOCKED`` is there to avoid.  ``peak_db_connections``
  is the most connections to the run's database seen at once (pool size x instances,
  plus each instance's listening connection).

``wal_bytes_per_msg`` is the WAL the whole server wrote from the start of the load
until the last delivery (``pg_current_wal_lsn()``), per message: the run's, plus that of
anyone else writing to the same server meanwhile (an upper bound on a shared server).

``pg_stat_statements`` would give per-statement times, but it must be preloaded by a
server restart; the sampling above needs nothing installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.harness import (
    PG_ADMIN_URL,
    Measurement,
    PostgresCpu,
    Service,
    _commits,
    _delivered,
    _refused,
    _result,
    _smtp_source,
    _spool_round_trips,
    bench_database,
    cpu_seconds,
    emulator,
    peak_rss_mb,
    pin,
    start_target,
)
from bench.loadgen import LoadResult, run_load

#: esprelay's default ``ESPRELAY_SPOOL_POOL_SIZE`` (connections per instance).
DEFAULT_POOL_SIZE = 10


class ActivitySampler:
    """Samples ``pg_stat_activity`` for one database in a thread of its own."""

    def __init__(self, admin_url: str, database: str, *, interval: float = 0.05) -> None:
        self.admin_url = admin_url
        self.database = database
        self.interval = interval
        self.samples = 0
        self.waits: Counter[str] = Counter()
        self.peak_connections = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="pg-activity", daemon=True)

    def __enter__(self) -> ActivitySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    @property
    def lock_wait_share(self) -> float | None:
        observed = sum(self.waits.values())
        if not observed:
            return None
        return sum(n for key, n in self.waits.items() if key.startswith("Lock:")) / observed

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except Exception as exc:  # sampling is a figure, never a failure of the run
            self.error = f"{type(exc).__name__}: {exc}"

    async def _run(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.admin_url, timeout=5)
        try:
            while not self._stop.is_set():
                rows = await conn.fetch(
                    "SELECT state, wait_event_type, wait_event FROM pg_stat_activity"
                    " WHERE datname = $1",
                    self.database,
                )
                self.samples += 1
                self.peak_connections = max(self.peak_connections, len(rows))
                for row in rows:
                    if row["state"] != "active":
                        continue
                    kind = row["wait_event_type"]
                    self.waits[f"{kind}:{row['wait_event']}" if kind else "CPU"] += 1
                await asyncio.sleep(self.interval)
        finally:
            await conn.close()


async def _deadlocks(admin_url: str, database: str) -> int | None:
    import asyncpg

    conn = await asyncpg.connect(admin_url, timeout=5)
    try:
        value = await conn.fetchval(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = $1", database
        )
    finally:
        await conn.close()
    return None if value is None else int(value)


async def _wal_position(admin_url: str) -> int:
    """The server's current WAL position, in bytes."""
    import asyncpg

    conn = await asyncpg.connect(admin_url, timeout=5)
    try:
        return int(await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')"))
    finally:
        await conn.close()


async def _server_limits(admin_url: str) -> dict[str, int]:
    import asyncpg

    conn = await asyncpg.connect(admin_url, timeout=5)
    try:
        return {
            name: int(await conn.fetchval(f"SHOW {name}"))
            for name in ("max_connections", "superuser_reserved_connections")
        }
    finally:
        await conn.close()


def server_limits(admin_url: str = PG_ADMIN_URL) -> dict[str, int]:
    """``max_connections`` and ``superuser_reserved_connections`` of the server."""
    return asyncio.run(_server_limits(admin_url))


def _spread_smtp_source(ports: list[int], *, sessions: int, count: int, size: int) -> LoadResult:
    """One ``smtp-source`` per port, at once, each with its share of sessions and
    messages."""
    shares = [
        (port, max(1, sessions // len(ports)), count // len(ports) + (i < count % len(ports)))
        for i, port in enumerate(ports)
    ]
    started = time.perf_counter()
    results: list[LoadResult] = []
    threads = [
        threading.Thread(
            target=lambda p=port, s=n, c=m: results.append(
                _smtp_source(p, sessions=s, count=c, size=size)
            )
        )
        for port, n, m in shares
        if m
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = LoadResult(seconds=time.perf_counter() - started)
    for part in results:
        total.sent += part.sent
        total.errors += part.errors
        total.error_samples.extend(part.error_samples)
    return total


def measure_shared(
    *,
    instances: int,
    size: int,
    sessions: int,
    count: int,
    latency_ms: float = 0.0,
    provider: str = "outbox",
    loadgen: str = "python",
    server_cpus: set[int] | None = None,
    helper_cpus: set[int] | None = None,
    deliver_timeout: float = 300.0,
    extra_env: dict[str, str] | None = None,
    pg_admin_url: str = PG_ADMIN_URL,
    sample_interval: float = 0.05,
) -> Measurement:
    """``instances`` esprelay processes on one PostgreSQL spool, under one load."""
    if instances < 1:
        raise ValueError("instances must be at least 1")
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="esprelay-bench-")))
        url, database = stack.enter_context(bench_database(pg_admin_url))
        env = {
            **(extra_env or {}),
            "ESPRELAY_SPOOL_URL": url,
            # One outbox for all, so that --provider outbox counts every delivery.
            "ESPRELAY_OUTBOX_DIR": str(root / "outbox"),
        }
        pg_cpu = PostgresCpu()
        emu = stack.enter_context(
            emulator(root, latency_ms=latency_ms, flavour="generic", cpus=helper_cpus)
        )
        servers: list[Service] = []
        try:
            for number in range(1, instances + 1):
                workdir = root / f"instance-{number}"
                workdir.mkdir()
                servers.append(
                    start_target(
                        "esprelay",
                        workdir,
                        provider=provider,
                        emulator_port=emu.port,
                        cpus=server_cpus,
                        extra_env=env,
                    )
                )
            pin(os.getpid(), helper_cpus)
            cpu_before = sum(cpu_seconds(s.pid) for s in servers)
            db_before = pg_cpu.backends(database)
            server_db_before = pg_cpu.server()
            commits_before = asyncio.run(_commits(pg_admin_url, database, settle=0))
            deadlocks_before = asyncio.run(_deadlocks(pg_admin_url, database))
            wal_before = asyncio.run(_wal_position(pg_admin_url))
            ports = [s.port for s in servers]
            with ActivitySampler(pg_admin_url, database, interval=sample_interval) as sampler:
                started = time.perf_counter()
                if loadgen == "smtp-source":
                    load = _spread_smtp_source(ports, sessions=sessions, count=count, size=size)
                else:
                    load = asyncio.run(
                        run_load(
                            "127.0.0.1", 0, sessions=sessions, count=count, size=size, ports=ports
                        )
                    )
                deadline = time.monotonic() + deliver_timeout
                while True:
                    delivered = _delivered("esprelay", provider, root, emu.port)
                    if delivered >= load.sent or time.monotonic() > deadline:
                        break
                    time.sleep(0.005)
                deliver_seconds = time.perf_counter() - started if delivered >= load.sent else None
                cpu_used = sum(cpu_seconds(s.pid) for s in servers) - cpu_before
                rss = max(peak_rss_mb(s.pid) for s in servers)
                db_used = sum(
                    seconds - db_before.get(pid, 0.0)
                    for pid, seconds in pg_cpu.backends(database).items()
                )
                server_db_after = pg_cpu.server()
                wal_bytes = asyncio.run(_wal_position(pg_admin_url)) - wal_before
        finally:
            for server in servers:
                server.stop()
        refused = sum(_refused(s.log) for s in servers)
        trips = [_spool_round_trips(s.log) for s in servers]
        commits_after = asyncio.run(_commits(pg_admin_url, database))
        deadlocks_after = asyncio.run(_deadlocks(pg_admin_url, database))
    measurement = _result(
        "esprelay",
        provider=provider,
        size=size,
        sessions=sessions,
        latency_ms=latency_ms,
        count=count,
        loadgen=loadgen,
        load=load,
        delivered=delivered,
        deliver_seconds=deliver_seconds,
        cpu_used=cpu_used,
        rss=rss,
        refused=refused,
    )
    messages = max(1, load.sent or count)
    measurement.spool = "postgresql"
    measurement.instances = instances
    if all(t is not None for t in trips):
        measurement.round_trips_per_msg = sum(t or 0 for t in trips) / messages
    if commits_before is not None and commits_after is not None:
        measurement.db_commits_per_msg = (commits_after - commits_before) / messages
    measurement.db_cpu_ms_per_msg = db_used * 1000 / messages
    if server_db_before is not None and server_db_after is not None:
        measurement.db_server_cpu_ms_per_msg = (
            (server_db_after - server_db_before) * 1000 / messages
        )
    measurement.wal_bytes_per_msg = wal_bytes / messages
    if deadlocks_before is not None and deadlocks_after is not None:
        measurement.deadlocks = deadlocks_after - deadlocks_before
    if sampler.error is None:
        measurement.lock_wait_share = sampler.lock_wait_share
        measurement.wait_events = dict(sampler.waits.most_common())
        measurement.peak_db_connections = sampler.peak_connections
    else:
        measurement.error_samples.append(f"pg_stat_activity sampling: {sampler.error}")
    return measurement


def _median(values: list[float | None]) -> float | None:
    present = sorted(v for v in values if v is not None)
    if not present:
        return None
    middle = len(present) // 2
    return present[middle] if len(present) % 2 else (present[middle - 1] + present[middle]) / 2


def summarise_instances(by_count: dict[int, list[Measurement]]) -> dict[str, Any]:
    """Per instance count: medians over the repeats, and the median of the per-repeat
    ratios of delivered msg/s to the smallest count's."""
    counts = sorted(by_count)
    base = by_count[counts[0]]
    summary: dict[str, Any] = {}
    for n in counts:
        runs = by_count[n]
        waits: Counter[str] = Counter()
        for run in runs:
            waits.update(run.wait_events or {})
        ratios = [
            r.delivered_per_s / b.delivered_per_s
            for r, b in zip(runs, base, strict=False)
            if r.delivered_per_s and b.delivered_per_s
        ]
        summary[str(n)] = {
            "delivered_per_s": _median([r.delivered_per_s for r in runs]),
            "cpu_ms_per_msg": _median([r.cpu_ms_per_msg for r in runs]),
            "round_trips_per_msg": _median([r.round_trips_per_msg for r in runs]),
            "db_commits_per_msg": _median([r.db_commits_per_msg for r in runs]),
            "db_cpu_ms_per_msg": _median([r.db_cpu_ms_per_msg for r in runs]),
            "db_server_cpu_ms_per_msg": _median([r.db_server_cpu_ms_per_msg for r in runs]),
            "wal_bytes_per_msg": _median([r.wal_bytes_per_msg for r in runs]),
            "lock_wait_share": _median([r.lock_wait_share for r in runs]),
            "deadlocks": sum(r.deadlocks or 0 for r in runs),
            "peak_db_connections": max((r.peak_db_connections or 0 for r in runs), default=0),
            "wait_events": dict(waits.most_common(4)),
            "sessions": runs[0].sessions if runs else None,
            "p50_ms": _median([r.p50_ms for r in runs]),
            "errors": sum(r.errors for r in runs),
            "undelivered": sum(r.sent - r.delivered for r in runs),
            "refused": sum(r.refused for r in runs),
            f"ratio_delivered_vs_{counts[0]}": _median(list(ratios)),
        }
    return summary


def _human(size: int) -> str:
    for suffix, factor in (("M", 1024**2), ("K", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{suffix}"
    return str(size)


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def instances_table(rows: list[dict[str, Any]]) -> str:
    """Per scenario and instance count: the shared PostgreSQL spool's figures."""
    lines = [
        "| size | sessions (all) | API ms | instances | delivered/s | vs fewest |"
        " esprelay CPU ms/msg (all) | PostgreSQL CPU ms/msg (backends / server) |"
        " round trips/msg | commits/msg | WAL KB/msg (server) | lock waits | deadlocks |"
        " peak connections | top wait events (sampled) |",
        "|" + "---|" * 15,
    ]
    for row in rows:
        figures = row.get("instances") or {}
        base = min((int(n) for n in figures), default=1)
        for n, s in figures.items():
            waits = ", ".join(f"{k} {v}" for k, v in s["wait_events"].items()) or "-"
            share = s["lock_wait_share"]
            wal = s["wal_bytes_per_msg"]
            lines.append(
                f"| {_human(row['size'])} | {s['sessions']} | {_fmt(row['latency_ms'])} |"
                f" {n} | {_fmt(s['delivered_per_s'])} |"
                f" {_fmt(s[f'ratio_delivered_vs_{base}'], 2)} |"
                f" {_fmt(s['cpu_ms_per_msg'], 2)} |"
                f" {_fmt(s['db_cpu_ms_per_msg'], 2)} / {_fmt(s['db_server_cpu_ms_per_msg'], 2)} |"
                f" {_fmt(s['round_trips_per_msg'], 2)} | {_fmt(s['db_commits_per_msg'], 2)} |"
                f" {_fmt(wal / 1024 if wal is not None else None, 1)} |"
                f" {'-' if share is None else f'{share:.1%}'} | {s['deadlocks']} |"
                f" {s['peak_db_connections']} | {waits} |"
            )
    return "\n".join(lines)
