"""Profile esprelay under the 2 KB x 20 sessions load with py-spy (``pip install py-spy``).

``python -m bench.profile [--count N] [--sessions N] [--size 2K] [--spool postgresql]`` writes
``bench/results/profile-<size>.txt`` (py-spy's raw collapsed stacks) and prints the
functions with the most samples, by own time and by inclusive time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.__main__ import RESULTS, human, parse_size
from bench.harness import PG_ADMIN_URL, bench_database, emulator, start_target
from bench.loadgen import run_load


def summarise(collapsed: Path, top: int = 25) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  for f in stack.split(";")]  # fmt: skip
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{total} samples", "", "own time:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines += ["", "inclusive time:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--size", default="2K")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--provider", default="outbox")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument(
        "--spool",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="postgresql: on a throw-away database of --pg-url's server",
    )
    parser.add_argument("--pg-url", default=PG_ADMIN_URL)
    args = parser.parse_args(argv)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    size = parse_size(args.size)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"profile-{human(size)}.txt"
    flavour = args.provider if args.provider in ("sendgrid", "postmark") else "generic"
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="esprelay-profile-")))
        extra_env = {}
        if args.spool == "postgresql":
            url, _ = stack.enter_context(bench_database(args.pg_url))
            extra_env["ESPRELAY_SPOOL_URL"] = url
        with emulator(workdir, latency_ms=args.latency_ms, flavour=flavour, cpus=None) as emu:
            server = start_target(
                "esprelay",
                workdir,
                provider=args.provider,
                emulator_port=emu.port,
                cpus=None,
                extra_env=extra_env,
            )
            spy = subprocess.Popen(
                [pyspy, "record", "--format", "raw", "--rate", "250", "--nonblocking",
                 "-o", str(out), "--pid", str(server.pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1.0)
            load = asyncio.run(
                run_load(
                    "127.0.0.1", server.port, sessions=args.sessions, count=args.count, size=size
                )
            )
            time.sleep(2.0)
            spy.send_signal(2)
            spy.wait(60)
            server.stop()
    print(f"{load.sent} messages in {load.seconds:.1f}s; raw profile: {out}")
    print(summarise(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
