"""Start the pieces of one benchmark scenario, drive them, and measure.

A scenario is (message size, sessions, API latency, target).  Targets:

- ``sink``: the bare aiosmtpd sink (``bench.sink``), the in-run baseline;
- ``esprelay``: ``python -m esprelay serve`` in queue mode with the real SQLite spool
  in a temporary directory, delivering through ``provider`` (``outbox`` writes files;
  every HTTP kind of ``bench.providers.KINDS`` POSTs each message to the ESP emulator,
  which answers like that ESP);
- ``postfix``: a throw-away Postfix instance relaying into ``smtp-sink``
  (``bench.postfix``), when Postfix is installed and we are root.

esprelay runs on the SQLite spool, or with ``spool="postgresql"`` on a throw-away
database of the local PostgreSQL server (``PG_ADMIN_URL``), created for the run and
dropped after it.  Then the measurement also holds the database round trips per
message (the spool's own count, logged when it closes) and the CPU of the PostgreSQL
server per message (see :class:`PostgresCpu`).

Every process is fresh per scenario, so VmHWM is that scenario's peak RSS and the
CPU time (utime + stime from ``/proc/<pid>/stat``) is that scenario's cost.  Postfix is
many processes: its CPU is read from a cgroup holding all of them (``cpu_accounting``
says how it was counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bench.loadgen import LoadResult, run_load
from bench.memtrace import RssTrace
from bench.postfix import PostfixRelay
from bench.providers import KINDS, environment

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: The providers that POST to the emulator (the others, ``outbox``, write files).
HTTP_PROVIDERS = KINDS
#: The spools esprelay can be measured on (``measure(spool=...)``).
SPOOLS = ("sqlite", "postgresql")
#: The maintenance database of the PostgreSQL server the ``postgresql`` spool runs on;
#: the bench creates a database of its own there for every run and drops it after.
PG_ADMIN_URL = os.environ.get("ESPRELAY_BENCH_PG_URL", "postgresql://root@127.0.0.1:5432/postgres")


@dataclass
class Measurement:
    target: str
    provider: str
    size: int
    sessions: int
    latency_ms: float
    count: int
    loadgen: str
    sent: int
    errors: int
    accept_seconds: float
    deliver_seconds: float | None
    delivered: int
    accepted_per_s: float
    delivered_per_s: float | None
    p50_ms: float | None
    p99_ms: float | None
    cpu_ms_per_msg: float
    # VmHWM of the server process; for Postfix, the Pss of all its processes at the end.
    peak_rss_mb: float
    error_samples: list[str]
    # How cpu_ms_per_msg was counted: "process" (/proc/<pid>/stat of the one server
    # process), "cgroup-v2"/"cgroup-v1" or "proc-tree" (every process of Postfix).
    cpu_accounting: str = "process"
    # esprelay: delivery attempts its log shows deferred or failed (0 when every answer
    # of the emulator was taken as the ESP's success).
    refused: int = 0
    # The spool esprelay ran on; for "postgresql" the figures below too.
    spool: str = "sqlite"
    # Statements the spool sent and waited for, per message (its own count).
    round_trips_per_msg: float | None = None
    # Transactions committed in this run's database per message (pg_stat_database: what
    # PostgreSQL counted, startup and shutdown included; close to the WAL flushes).
    db_commits_per_msg: float | None = None
    # CPU of the PostgreSQL backends serving this run's database, per message.
    db_cpu_ms_per_msg: float | None = None
    # CPU of every process of the PostgreSQL server (postmaster, its children and the
    # children it reaped), per message: includes background writers, and the work of
    # anyone else using the server meanwhile.
    db_server_cpu_ms_per_msg: float | None = None
    # esprelay instances sharing the spool (bench.capacity); the CPU above is their sum,
    # the peak RSS the largest of them.
    instances: int = 1
    # bench.capacity: deadlocks pg_stat_database counted in the run's database, and what
    # sampling pg_stat_activity saw of its backends (see bench.capacity.ActivitySampler).
    deadlocks: int | None = None
    lock_wait_share: float | None = None
    wait_events: dict[str, int] | None = None
    peak_db_connections: int | None = None
    # WAL the whole server wrote during the run, per message (bench.capacity).
    wal_bytes_per_msg: float | None = None
    # esprelay: the highest RSS sampled while the load ran (messages arriving and being
    # spooled) and after it, until every message was delivered (bench/memtrace.py).
    peak_rss_intake_mb: float | None = None
    peak_rss_delivery_mb: float | None = None

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pin(pid: int, cpus: set[int] | None) -> None:
    """Pin process ``pid`` to ``cpus``: every thread of a child process, not its main
    thread alone.  A thread keeps the affinity it was created with, so a server pinned
    once it listens kept its spool writer thread on the CPUs the harness had then
    (the helpers' CPU after a first scenario, both CPUs before one)."""
    if not cpus:
        return
    tasks = [pid]
    if pid != os.getpid():
        with contextlib.suppress(OSError):
            tasks = [int(task) for task in os.listdir(f"/proc/{pid}/task")]
    for task in tasks:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(task, cpus)


class Service:
    """A child process that announces ``listening on HOST:PORT`` in its output."""

    def __init__(
        self, argv: list[str], *, env: dict[str, str], cwd: Path, log: Path, pattern: str
    ) -> None:
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        self.port = self._wait_port(re.compile(pattern))

    def _wait_port(self, pattern: re.Pattern[str], timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = pattern.search(self.log.read_text(errors="replace"))
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self.proc.args} did not start:\n{self.log.read_text()[-3000:]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESPRELAY_")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH", "")) if p
    )
    return env


@contextlib.contextmanager
def emulator(
    workdir: Path, *, latency_ms: float, flavour: str, cpus: set[int] | None
) -> Iterator[Service]:
    service = Service(
        [
            sys.executable,
            "-m",
            "bench.emulator",
            "--latency-ms",
            str(latency_ms),
            "--flavour",
            flavour,
        ],
        env=_base_env(),
        cwd=ROOT,
        log=workdir / "emulator.log",
        pattern=r"emulator listening on [^:]+:(\d+)",
    )
    pin(service.pid, cpus)
    try:
        yield service
    finally:
        service.stop()


def emulator_stats(port: int) -> dict[str, Any]:
    """The emulator's counters (``GET /__stats``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/__stats", timeout=5) as response:
        stats: dict[str, Any] = json.load(response)
    return stats


def emulator_requests(port: int, kind: str | None = None) -> int:
    """Send requests the emulator answered: every one, or those of ESP ``kind``."""
    stats = emulator_stats(port)
    if kind is None:
        return int(stats["requests"])
    return int(stats["by_kind"].get(kind, 0))


def start_target(
    target: str,
    workdir: Path,
    *,
    provider: str,
    emulator_port: int | None,
    cpus: set[int] | None,
    extra_env: dict[str, str] | None = None,
) -> Service:
    env = _base_env()
    if target == "sink":
        argv = [sys.executable, "-m", "bench.sink"]
        pattern = r"sink listening on [^:]+:(\d+)"
    elif target == "esprelay":
        argv = [sys.executable, "-m", "esprelay", "serve"]
        pattern = r"smtp listening on [^:]+:(\d+)"
        env.update(
            {
                "ESPRELAY_SMTP_HOST": "127.0.0.1",
                "ESPRELAY_SMTP_PORT": "0",
                # The ops HTTP listener on a free port, so concurrent runs do not collide.
                "ESPRELAY_HTTP_PORT": "0",
                "ESPRELAY_SPOOL_URL": f"sqlite:///{workdir / 'spool' / 'spool.db'}",
                "ESPRELAY_OUTBOX_DIR": str(workdir / "outbox"),
                "ESPRELAY_PROVIDER": provider,
                "ESPRELAY_MAX_MESSAGE_SIZE": str(30 * 1024 * 1024),
                "ESPRELAY_DELIVERY_CONCURRENCY": "200",
                # 200 sessions reconnecting per message briefly overlap the total limit.
                "ESPRELAY_MAX_CONNECTIONS": "1000",
                "ESPRELAY_SHUTDOWN_GRACE": "5",
            }
        )
        if provider in HTTP_PROVIDERS:
            assert emulator_port is not None
            if provider == "ses":  # only the dummy credentials of bench.providers
                env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
            env.update(environment(provider, f"http://127.0.0.1:{emulator_port}", workdir))
        env.update(extra_env or {})
    else:
        raise ValueError(f"unknown target {target!r}")
    service = Service(argv, env=env, cwd=workdir, log=workdir / f"{target}.log", pattern=pattern)
    pin(service.pid, cpus)
    return service


def _delivered(target: str, provider: str, workdir: Path, emulator_port: int | None) -> int:
    if provider in HTTP_PROVIDERS:
        assert emulator_port is not None
        # Only the sends of this ESP count: a request on another path is no delivery.
        return emulator_requests(emulator_port, provider)
    outbox = workdir / "outbox"
    if not outbox.exists():
        return 0
    return sum(1 for entry in os.scandir(outbox) if entry.name.endswith(".json"))


def _smtp_source(port: int, *, sessions: int, count: int, size: int) -> LoadResult:
    tool = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    started = time.perf_counter()
    completed = subprocess.run(
        [
            tool,
            "-s", str(sessions),
            "-m", str(count),
            "-l", str(size),
            "-f", "bench@example.com",
            "-t", "sink@example.org",
            f"127.0.0.1:{port}",
        ],
        capture_output=True,
        timeout=600,
        check=False,
    )  # fmt: skip
    result = LoadResult(seconds=time.perf_counter() - started)
    if completed.returncode == 0:
        result.sent = count
    else:
        result.errors = count
        result.error_samples.append(completed.stderr.decode(errors="replace")[-500:])
    return result


def _drive_load(port: int, *, loadgen: str, sessions: int, count: int, size: int) -> LoadResult:
    if loadgen == "smtp-source":
        return _smtp_source(port, sessions=sessions, count=count, size=size)
    return asyncio.run(run_load("127.0.0.1", port, sessions=sessions, count=count, size=size))


def smtp_source_available() -> bool:
    return shutil.which("smtp-source") is not None or Path("/usr/sbin/smtp-source").exists()


async def _pg_admin(admin_url: str, statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url, timeout=5)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def postgres_unavailable_reason(admin_url: str = PG_ADMIN_URL) -> str | None:
    """Why the ``postgresql`` spool cannot be measured here, or None."""
    try:
        asyncio.run(_pg_admin(admin_url, "SELECT 1"))
    except Exception as exc:  # any failure means: not available
        return f"PostgreSQL not reachable at {urlsplit(admin_url).netloc}: {exc}"
    return None


@contextlib.contextmanager
def bench_database(admin_url: str = PG_ADMIN_URL) -> Iterator[tuple[str, str]]:
    """A new, empty database on the server of ``admin_url``: (its URL, its name);
    dropped afterwards (connections still open to it included)."""
    name = f"esprelay_bench_{secrets.token_hex(6)}"
    asyncio.run(_pg_admin(admin_url, f"CREATE DATABASE {name}"))
    try:
        yield urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}")), name
    finally:
        asyncio.run(_pg_admin(admin_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def _stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


class PostgresCpu:
    """CPU seconds of the local PostgreSQL server, from ``/proc``.

    The server is the postmaster (the ``postgres`` process whose parent is not one) and
    its children.  ``server()`` counts all of them: the postmaster's own time, the time
    of the children it has reaped (``cutime``/``cstime``: a backend that exits leaves
    its time there) and that of the live ones; a difference of two readings is what
    the server spent in between, whoever asked.  ``backends(database)`` reads only the
    live backends connected to ``database`` (their command line names it), by pid, so
    that the work of this run can be told from other users of the same server.
    """

    def __init__(self) -> None:
        self.postmaster = self._find_postmaster()

    @staticmethod
    def _find_postmaster() -> int | None:
        names: dict[int, tuple[str, int]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                text = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            comm = text[text.index("(") + 1 : text.rindex(")")]
            names[int(entry.name)] = (comm, int(text.rsplit(")", 1)[1].split()[1]))
        for pid, (comm, parent) in names.items():
            if comm in ("postgres", "postmaster") and names.get(parent, ("", 0))[0] not in (
                "postgres",
                "postmaster",
            ):
                return pid
        return None

    def _children(self) -> list[int]:
        if self.postmaster is None:
            return []
        path = Path(f"/proc/{self.postmaster}/task/{self.postmaster}/children")
        try:
            return [int(pid) for pid in path.read_text().split()]
        except OSError:
            return []

    def server(self) -> float | None:
        if self.postmaster is None:
            return None
        try:
            fields = _stat_fields(self.postmaster)
        except OSError:
            return None
        # utime, stime, cutime, cstime: fields 14-17.
        total = sum(int(value) for value in fields[11:15])
        for pid in self._children():
            with contextlib.suppress(OSError):
                total += sum(int(value) for value in _stat_fields(pid)[11:13])
        return total / CLOCK_TICKS

    def backends(self, database: str) -> dict[int, float]:
        found = {}
        for pid in self._children():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
                # "postgres: [CLUSTER: ]USER DATABASE HOST(PORT) STATE"
                if database in argv.split():
                    found[pid] = cpu_seconds(pid)
            except (OSError, ValueError):
                continue
        return found


async def _commits(admin_url: str, database: str, *, settle: float = 10.0) -> int | None:
    """Transactions committed in ``database`` so far, once no backend serves it any more
    (a backend reports its counts when it goes idle for a while, and when it exits)."""
    import asyncpg

    conn = await asyncpg.connect(admin_url, timeout=5)
    try:
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            busy = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", database
            )
            if not busy:
                break
            await asyncio.sleep(0.05)
        # A new transaction reads the statistics afresh.
        value = await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = $1", database
        )
    finally:
        await conn.close()
    return None if value is None else int(value)


_ROUND_TRIPS = re.compile(r"spool: closed after (\d+) database round trip")


def _spool_round_trips(log: Path) -> int | None:
    found = _ROUND_TRIPS.findall(log.read_text(errors="replace"))
    return int(found[-1]) if found else None


def measure(
    target: str,
    *,
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
    spool: str = "sqlite",
    pg_admin_url: str = PG_ADMIN_URL,
) -> Measurement:
    """Run one scenario against one target in fresh processes and return its figures.

    ``spool`` (esprelay only): ``sqlite``, or ``postgresql`` on a database of its own
    created on the server of ``pg_admin_url`` and dropped after the run.
    """
    if target == "postfix":
        return measure_postfix(
            size=size,
            sessions=sessions,
            count=count,
            latency_ms=latency_ms,
            loadgen=loadgen,
            server_cpus=server_cpus,
            helper_cpus=helper_cpus,
            deliver_timeout=deliver_timeout,
        )
    flavour = "generic"  # the emulator answers each ESP by its path
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="esprelay-bench-"))
        database: str | None = None
        pg_cpu: PostgresCpu | None = None
        if target == "esprelay" and spool == "postgresql":
            url, database = stack.enter_context(bench_database(pg_admin_url))
            extra_env = {**(extra_env or {}), "ESPRELAY_SPOOL_URL": url}
            pg_cpu = PostgresCpu()
        elif spool != "sqlite":
            raise ValueError(f"unknown spool {spool!r}")
        workdir = Path(tmp)
        with emulator(workdir, latency_ms=latency_ms, flavour=flavour, cpus=helper_cpus) as emu:
            server = start_target(
                target,
                workdir,
                provider=provider,
                emulator_port=emu.port,
                cpus=server_cpus,
                extra_env=extra_env,
            )
            try:
                pin(os.getpid(), helper_cpus)
                cpu_before = cpu_seconds(server.pid)
                if pg_cpu is not None and database is not None:
                    db_before = pg_cpu.backends(database)
                    server_db_before = pg_cpu.server()
                    commits_before = asyncio.run(_commits(pg_admin_url, database, settle=0))
                trace = RssTrace(server.pid).start() if target == "esprelay" else None
                started = time.perf_counter()
                load = _drive_load(
                    server.port, loadgen=loadgen, sessions=sessions, count=count, size=size
                )
                if trace is not None:
                    trace.mark()
                delivered = load.sent
                deliver_seconds: float | None = load.seconds
                if target == "esprelay":
                    deadline = time.monotonic() + deliver_timeout
                    while True:
                        delivered = _delivered(target, provider, workdir, emu.port)
                        if delivered >= load.sent or time.monotonic() > deadline:
                            break
                        time.sleep(0.005)
                    deliver_seconds = (
                        time.perf_counter() - started if delivered >= load.sent else None
                    )
                cpu_used = cpu_seconds(server.pid) - cpu_before
                rss = peak_rss_mb(server.pid)
                phases = trace.stop() if trace is not None else None
                db_used = server_db_used = None
                if pg_cpu is not None and database is not None:
                    db_used = sum(
                        seconds - db_before.get(pid, 0.0)
                        for pid, seconds in pg_cpu.backends(database).items()
                    )
                    server_db_after = pg_cpu.server()
                    if server_db_before is not None and server_db_after is not None:
                        server_db_used = server_db_after - server_db_before
            finally:
                server.stop()
            refused = _refused(server.log) if target == "esprelay" else 0
        round_trips = commits = None
        if database is not None:
            round_trips = _spool_round_trips(server.log)
            commits_after = asyncio.run(_commits(pg_admin_url, database))
            if commits_after is not None and commits_before is not None:
                commits = commits_after - commits_before
    measurement = _result(
        target,
        provider=provider if target == "esprelay" else "-",
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
    measurement.spool = spool if target == "esprelay" else "-"
    if phases is not None:
        measurement.peak_rss_intake_mb, measurement.peak_rss_delivery_mb = phases
    messages = max(1, load.sent or count)
    if round_trips is not None:
        measurement.round_trips_per_msg = round_trips / messages
    if commits is not None:
        measurement.db_commits_per_msg = commits / messages
    if db_used is not None:
        measurement.db_cpu_ms_per_msg = db_used * 1000 / messages
    if server_db_used is not None:
        measurement.db_server_cpu_ms_per_msg = server_db_used * 1000 / messages
    return measurement


#: esprelay's log lines of a delivery attempt that did not end delivered.
_NOT_DELIVERED = re.compile(rb"\b(?:deferred|failed) id=")


def _refused(log: Path) -> int:
    """Attempts esprelay did not count as delivered (an answer it could not take as the
    ESP's success, or any other error), from its log once it has stopped."""
    return len(_NOT_DELIVERED.findall(log.read_bytes()))


def _result(
    target: str,
    *,
    provider: str,
    size: int,
    sessions: int,
    latency_ms: float,
    count: int,
    loadgen: str,
    load: LoadResult,
    delivered: int,
    deliver_seconds: float | None,
    cpu_used: float,
    rss: float,
    cpu_accounting: str = "process",
    refused: int = 0,
) -> Measurement:
    p50, p99 = load.percentile(50), load.percentile(99)
    return Measurement(
        target=target,
        provider=provider,
        size=size,
        sessions=sessions,
        latency_ms=latency_ms,
        count=count,
        loadgen=loadgen,
        sent=load.sent,
        errors=load.errors,
        accept_seconds=load.seconds,
        deliver_seconds=deliver_seconds,
        delivered=delivered,
        accepted_per_s=load.sent / load.seconds if load.seconds else 0.0,
        delivered_per_s=(delivered / deliver_seconds) if deliver_seconds else None,
        p50_ms=p50 * 1000 if p50 is not None else None,
        p99_ms=p99 * 1000 if p99 is not None else None,
        cpu_ms_per_msg=cpu_used * 1000 / max(1, load.sent or count),
        peak_rss_mb=rss,
        error_samples=load.error_samples,
        cpu_accounting=cpu_accounting,
        refused=refused,
    )


def measure_postfix(
    *,
    size: int,
    sessions: int,
    count: int,
    latency_ms: float = 0.0,
    loadgen: str = "python",
    server_cpus: set[int] | None = None,
    helper_cpus: set[int] | None = None,
    deliver_timeout: float = 300.0,
) -> Measurement:
    """Postfix as relay (fsync'd queue) into smtp-sink, end to end, in a fresh instance.

    smtp-sink answers at once: ``latency_ms`` is recorded, not emulated (smtp-sink's
    delays are whole seconds), so the harness runs this target at 0 ms only.
    """
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="esprelay-bench-postfix-"))
        relay = stack.enter_context(
            PostfixRelay(Path(tmp), server_cpus=server_cpus, helper_cpus=helper_cpus)
        )
        pin(os.getpid(), helper_cpus)
        cpu_before = relay.cpu_seconds()
        started = time.perf_counter()
        load = _drive_load(relay.port, loadgen=loadgen, sessions=sessions, count=count, size=size)
        deadline = time.monotonic() + deliver_timeout
        while True:
            delivered = relay.delivered()
            if delivered >= load.sent or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        deliver_seconds = time.perf_counter() - started if delivered >= load.sent else None
        cpu_used = relay.cpu_seconds() - cpu_before
        rss = relay.memory_mb()
        accounting = relay.cpu_method
    return _result(
        "postfix",
        provider="-",
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
        cpu_accounting=accounting,
    )
