"""CPU per message of the SQLite spool alone: no SMTP, no HTTP.

``python -m bench.spool_micro [--count 5000] [--tasks 20] [--size 2K] [--workload leased]``
runs ``--count`` messages through a fresh spool from ``--tasks`` concurrent asyncio
tasks and prints the process CPU time per message (``time.process_time``: the event
loop and the spool's writer thread), the writer thread's own share, the process's
kernel time, the wall time and how many operations the writer committed per batch.

Workloads (each one message's trip through the spool, as ``serve`` does it):

- ``leased``: ``put_parts(lease_owner=...)`` (spooled already leased, the hand-off to an
  idle worker) then ``mark_delivered``;
- ``lease``: ``put_parts`` queued, ``lease`` by a worker, then ``mark_delivered``.

``--loop-work-us N`` makes the event loop busy as ``serve``'s is (its SMTP sessions and
HTTP requests): each task burns 0 to N microseconds (N/2 on average, at random) after
each of its two spool calls, so the writer thread and the loop take turns at the GIL
and the tasks drift apart: batches are smaller and more mixed, as in a full run.  The
CPU per message printed then leaves that work out (the process's CPU minus what the
burning took); the writer thread's is its own.

``--compare REF`` also runs ``src/esprelay/spool/sqlite.py`` as it is at git ``REF``
(the rest of the package from the working tree), each run in a fresh process,
alternating the two, so "before" and "after" share the same moment of a busy box.
Medians over ``--repeats`` are printed, and the best run (the least disturbed on a
shared box).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.__main__ import parse_size

ROOT = Path(__file__).resolve().parent.parent
SPOOL_SOURCE = "src/esprelay/spool/sqlite.py"
OWNER = "bench-owner"


def _load_spool_class(source: str | None) -> Any:
    if source is None:
        from esprelay.spool.sqlite import SqliteSpool

        return SqliteSpool
    spec = importlib.util.spec_from_file_location("esprelay_spool_sqlite_at_ref", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.SqliteSpool


def _count_batches(spool_class: Any) -> list[int]:
    """Count the writer's batches (every version has ``_run_batch(conn, batch)``)."""
    counter = [0, 0]
    run_batch = spool_class._run_batch

    def counted(self: Any, conn: Any, batch: list[Any]) -> Any:
        counter[0] += 1
        counter[1] += len(batch)
        return run_batch(self, conn, batch)

    spool_class._run_batch = counted
    return counter


def _thread_cpu(thread: Any) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def _burn(seconds: float) -> float:
    """Keep the interpreter busy for ``seconds``; return the CPU time that took.  (It
    watches ``perf_counter``, read without a system call, so the kernel time measured
    stays the spool's.)"""
    cpu = time.thread_time()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return time.thread_time() - cpu


async def _run(
    spool_class: Any, count: int, tasks: int, size: int, workload: str, loop_work: float = 0.0
) -> dict[str, Any]:
    from esprelay.models import Envelope
    from esprelay.spool.base import NewPart

    raw = (b"Subject: bench\r\n\r\n" + b"x" * size)[:size]
    part = NewPart(
        Envelope("sender@example.com", ("rcpt@example.org",)),
        "sendgrid",
        {"client": "127.0.0.1", "helo": "bench", "route": "default", "providers": ["sendgrid"]},
    )
    with tempfile.TemporaryDirectory(prefix="esprelay-spool-micro-", dir=ROOT / "bench") as tmp:
        spool = spool_class(Path(tmp) / "spool.db", exclusive=True)
        await spool.open()
        batches = _count_batches(spool_class)
        per_task = [count // tasks + (1 if i < count % tasks else 0) for i in range(tasks)]
        delivered = 0

        burnt = 0.0
        rng = random.Random(8)

        def work() -> float:
            return _burn(rng.uniform(0.0, loop_work)) if loop_work else 0.0

        async def leased(n: int) -> None:
            nonlocal delivered, burnt
            for _ in range(n):
                [message_id] = await spool.put_parts(
                    raw, [part], lease_owner=OWNER, lease_time=300.0
                )
                burnt += work()
                if await spool.mark_delivered(
                    message_id, owner=OWNER, provider="sendgrid", provider_message_id="pm-1"
                ):
                    delivered += 1
                burnt += work()

        async def via_lease(n: int) -> None:
            nonlocal delivered, burnt
            for _ in range(n):
                await spool.put_parts(raw, [part])
                burnt += work()
                for message in await spool.lease(OWNER, 1, 300.0):
                    if await spool.mark_delivered(
                        message.id, owner=OWNER, provider="sendgrid", provider_message_id="pm-1"
                    ):
                        delivered += 1
                burnt += work()

        body = leased if workload == "leased" else via_lease
        writer_before = _thread_cpu(spool._thread)
        cpu_before = time.process_time()
        times_before = os.times()
        wall_before = time.perf_counter()
        await asyncio.gather(*(body(n) for n in per_task))
        while delivered < count:  # "lease": what a task's lease left to another
            leftovers = await spool.lease(OWNER, 100, 300.0)
            if not leftovers:
                break
            for message in leftovers:
                if await spool.mark_delivered(
                    message.id, owner=OWNER, provider="sendgrid", provider_message_id="pm-1"
                ):
                    delivered += 1
        wall = time.perf_counter() - wall_before
        cpu = time.process_time() - cpu_before
        system = os.times().system - times_before.system
        writer = _thread_cpu(spool._thread) - writer_before
        await spool.close()
    if delivered != count:
        raise SystemExit(f"delivered {delivered} of {count}")
    return {
        "count": count,
        # The spool's share: the loop's simulated work is left out (see the module doc).
        "cpu": cpu - burnt,
        "writer_cpu": writer,
        "system_cpu": system,
        "wall": wall,
        "batches": batches[0],
        "operations": batches[1],
    }


def _child(args: argparse.Namespace) -> int:
    if args.loop == "uvloop":
        import uvloop

        uvloop.install()
    spool_class = _load_spool_class(args.source)
    result = asyncio.run(
        _run(
            spool_class,
            args.count,
            args.tasks,
            args.size,
            args.workload,
            args.loop_work_us / 1e6,
        )
    )
    print(json.dumps(result))
    return 0


def _spawn(args: argparse.Namespace, source: str | None) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "bench.spool_micro",
        "--child",
        "--count",
        str(args.count),
        "--tasks",
        str(args.tasks),
        "--size",
        str(args.size),
        "--workload",
        args.workload,
        "--loop",
        args.loop,
        "--loop-work-us",
        str(args.loop_work_us),
    ]
    if source is not None:
        command += ["--source", source]
    out = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _line(label: str, runs: list[dict[str, Any]]) -> str:
    count = runs[0]["count"]
    cpu = statistics.median(r["cpu"] for r in runs) / count * 1e6
    writer = statistics.median(r["writer_cpu"] for r in runs) / count * 1e6
    system = statistics.median(r["system_cpu"] for r in runs) / count * 1e6
    best = min(r["cpu"] for r in runs) / count * 1e6
    best_writer = min(r["writer_cpu"] for r in runs) / count * 1e6
    wall = statistics.median(r["wall"] for r in runs)
    batch = statistics.median(r["operations"] / r["batches"] for r in runs)
    return (
        f"{label:>12}: {cpu:6.1f} us CPU/msg (writer thread {writer:5.1f}, kernel {system:5.1f}),"
        f" min {best:6.1f} (writer {best_writer:5.1f}); wall {wall:5.2f} s,"
        f" {count / wall:5.0f} msg/s; {batch:4.1f} ops/batch  [median of {len(runs)}]"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.spool_micro")
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--size", type=parse_size, default=parse_size("2K"))
    parser.add_argument("--workload", choices=("leased", "lease"), default="leased")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare", metavar="REF", help="also run sqlite.py as it is at git REF")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default=_default_loop())
    parser.add_argument(
        "--loop-work-us",
        type=float,
        default=0.0,
        help="CPU the event loop spends per message besides the spool (default 0)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args)
    with tempfile.TemporaryDirectory(prefix="esprelay-spool-ref-") as tmp:
        variants: dict[str, str | None] = {}
        if args.compare:
            source = Path(tmp) / "sqlite_at_ref.py"
            source.write_bytes(
                subprocess.run(
                    ["git", "show", f"{args.compare}:{SPOOL_SOURCE}"],
                    cwd=ROOT,
                    check=True,
                    capture_output=True,
                ).stdout
            )
            variants[args.compare] = str(source)
        variants["working tree"] = None
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label in variants}
        for _ in range(args.repeats):
            for label, source_path in variants.items():
                runs[label].append(_spawn(args, source_path))
    print(
        f"{args.count} messages x {args.workload}, {args.tasks} tasks, {args.size} bytes,"
        f" {args.loop} loop, {args.loop_work_us:g} us of other loop work per message,"
        f" load average {os.getloadavg()[0]:.1f}"
    )
    for label, results in runs.items():
        print(_line(label, results))
    return 0


def _default_loop() -> str:
    return "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


if __name__ == "__main__":
    raise SystemExit(main())
