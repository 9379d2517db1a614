"""``python -m bench``: run the benchmark matrix and write a table and a JSON file.

For every scenario (size x sessions x API latency) and every repeat, the aiosmtpd sink
and esprelay run back to back in fresh processes under the same load; the headline is
the ratio esprelay delivered msg/s / sink accepted msg/s, the median of the per-repeat
ratios.  When Postfix is installed (``--postfix auto``, the default), a throw-away
Postfix relay into ``smtp-sink`` runs third in every repeat of the 0 ms scenarios, and
the table adds the ratio esprelay delivered msg/s / Postfix delivered msg/s.  With
``--spool sqlite,postgresql`` (the default), esprelay runs on each spool in turn in every
repeat, and a further table compares them: PostgreSQL / SQLite delivered rate and CPU per
message, database round trips and PostgreSQL CPU per message.

Then the per-provider scenario (``--provider-scenario``, 2K x 20 at 0 ms): esprelay
once per HTTP provider kind (``--providers``) in every repeat, each against the
emulator answering like that ESP, on the first spool of ``--spool``; another table
gives each kind's delivered msg/s and CPU per message, and their ratios to SendGrid's
in the same repeats.  With ``--instances 1,2,4``, every repeat of every scenario also
runs that many esprelay instances sharing one PostgreSQL spool (``bench.capacity``),
and a table gives per instance count the delivered rate, CPU per message of esprelay
(all instances) and of PostgreSQL, round trips, commits and lock waits per message.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.capacity import (
    DEFAULT_POOL_SIZE,
    instances_table,
    measure_shared,
    server_limits,
    summarise_instances,
)
from bench.harness import (
    HTTP_PROVIDERS,
    PG_ADMIN_URL,
    SPOOLS,
    Measurement,
    measure,
    postgres_unavailable_reason,
    smtp_source_available,
)
from bench.postfix import unavailable_reason as postfix_unavailable_reason
from bench.providers import KINDS, REFERENCE, installed

RESULTS = Path(__file__).resolve().parent / "results"

# Message counts per (size, sessions): enough for a stable rate, bounded in time.
_COUNTS = {
    2 * 1024: {1: 300, 20: 2000, 200: 3000},
    100 * 1024: {1: 150, 20: 600, 200: 1000},
    5 * 1024 * 1024: {1: 10, 20: 40, 200: 200},
}


def parse_size(text: str) -> int:
    text = text.strip().upper()
    for suffix, factor in (("K", 1024), ("M", 1024**2), ("G", 1024**3)):
        if text.endswith(suffix):
            return int(float(text[:-1]) * factor)
    return int(text)


def human(size: int) -> str:
    for suffix, factor in (("M", 1024**2), ("K", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{suffix}"
    return str(size)


def default_count(size: int, sessions: int) -> int:
    if size in _COUNTS and sessions in _COUNTS[size]:
        return _COUNTS[size][sessions]
    # About 200 MB of traffic, at least 2 messages per session, at most 3000.
    return max(2 * sessions, min(3000, (200 * 1024**2) // max(size, 1)))


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


# One repeat of a scenario: (esprelay, sink or None, Postfix or None).
Run = tuple[Measurement, Measurement | None, Measurement | None]


def _ratios(pairs: list[tuple[float | None, float | None]]) -> float | None:
    return median([a / b for a, b in pairs if a and b])


def summarise(runs: list[Run]) -> dict[str, Any]:
    relay = [r for r, _, _ in runs]
    sinks = [s for _, s, _ in runs if s is not None]
    postfixes = [p for _, _, p in runs if p is not None]
    summary: dict[str, Any] = {
        "esprelay": {
            "accepted_per_s": median([r.accepted_per_s for r in relay]),
            "delivered_per_s": median([r.delivered_per_s for r in relay]),
            "p50_ms": median([r.p50_ms for r in relay]),
            "p99_ms": median([r.p99_ms for r in relay]),
            "cpu_ms_per_msg": median([r.cpu_ms_per_msg for r in relay]),
            "peak_rss_mb": max(r.peak_rss_mb for r in relay),
            "errors": sum(r.errors for r in relay),
            "undelivered": sum(r.sent - r.delivered for r in relay),
            "refused": sum(r.refused for r in relay),
        },
        "sink": {
            "accepted_per_s": median([s.accepted_per_s for s in sinks]),
            "p50_ms": median([s.p50_ms for s in sinks]),
            "p99_ms": median([s.p99_ms for s in sinks]),
            "cpu_ms_per_msg": median([s.cpu_ms_per_msg for s in sinks]),
            "peak_rss_mb": max((s.peak_rss_mb for s in sinks), default=None),
        }
        if sinks
        else None,
        "ratio_delivered_vs_sink": _ratios(
            [(r.delivered_per_s, s.accepted_per_s) for r, s, _ in runs if s is not None]
        ),
        "ratio_cpu_vs_sink": _ratios(
            [(r.cpu_ms_per_msg, s.cpu_ms_per_msg) for r, s, _ in runs if s is not None]
        ),
        "postfix": {
            "accepted_per_s": median([p.accepted_per_s for p in postfixes]),
            "delivered_per_s": median([p.delivered_per_s for p in postfixes]),
            "p50_ms": median([p.p50_ms for p in postfixes]),
            "p99_ms": median([p.p99_ms for p in postfixes]),
            "cpu_ms_per_msg": median([p.cpu_ms_per_msg for p in postfixes]),
            "cpu_accounting": sorted({p.cpu_accounting for p in postfixes}),
            "peak_rss_mb": max(p.peak_rss_mb for p in postfixes),
            "errors": sum(p.errors for p in postfixes),
            "undelivered": sum(p.sent - p.delivered for p in postfixes),
        }
        if postfixes
        else None,
        # esprelay delivered msg/s / Postfix delivered msg/s (issue 8: >= 2x at 2K x 20).
        "ratio_delivered_vs_postfix": _ratios(
            [(r.delivered_per_s, p.delivered_per_s) for r, _, p in runs if p is not None]
        ),
        "ratio_cpu_vs_postfix": _ratios(
            [(r.cpu_ms_per_msg, p.cpu_ms_per_msg) for r, _, p in runs if p is not None]
        ),
    }
    return summary


def summarise_spools(by_spool: dict[str, list[Measurement]]) -> dict[str, Any]:
    """Per spool: medians of its runs, and the median per-repeat ratios to the first."""
    spools = list(by_spool)
    first = by_spool[spools[0]]
    summary: dict[str, Any] = {}
    for spool, runs in by_spool.items():
        summary[spool] = {
            "delivered_per_s": median([r.delivered_per_s for r in runs]),
            "cpu_ms_per_msg": median([r.cpu_ms_per_msg for r in runs]),
            "round_trips_per_msg": median([r.round_trips_per_msg for r in runs]),
            "db_commits_per_msg": median([r.db_commits_per_msg for r in runs]),
            "db_cpu_ms_per_msg": median([r.db_cpu_ms_per_msg for r in runs]),
            "db_server_cpu_ms_per_msg": median([r.db_server_cpu_ms_per_msg for r in runs]),
            "p50_ms": median([r.p50_ms for r in runs]),
            "errors": sum(r.errors for r in runs),
            "undelivered": sum(r.sent - r.delivered for r in runs),
            "refused": sum(r.refused for r in runs),
            f"ratio_delivered_vs_{spools[0]}": _ratios(
                [(r.delivered_per_s, f.delivered_per_s) for r, f in zip(runs, first, strict=True)]
            ),
            f"ratio_cpu_vs_{spools[0]}": _ratios(
                [(r.cpu_ms_per_msg, f.cpu_ms_per_msg) for r, f in zip(runs, first, strict=True)]
            ),
        }
    return summary


def spool_table(rows: list[dict[str, Any]]) -> str:
    """The spools side by side, per scenario (when more than one was measured)."""
    lines = [
        "| size | sessions | API ms | spool | delivered/s | CPU ms/msg | round trips/msg |"
        " commits/msg | PostgreSQL CPU ms/msg (its backends / whole server) |"
        " delivered ratio | CPU ratio |",
        "|" + "---|" * 11,
    ]
    for row in rows:
        spools = row.get("spools") or {}
        base = next(iter(spools), "")
        for spool, s in spools.items():
            lines.append(
                f"| {human(row['size'])} | {row['sessions']} | {_fmt(row['latency_ms'])} |"
                f" {spool} | {_fmt(s['delivered_per_s'])} | {_fmt(s['cpu_ms_per_msg'], 2)} |"
                f" {_fmt(s['round_trips_per_msg'], 2)} | {_fmt(s['db_commits_per_msg'], 2)} |"
                f" {_fmt(s['db_cpu_ms_per_msg'], 2)} / {_fmt(s['db_server_cpu_ms_per_msg'], 2)} |"
                f" {_fmt(s[f'ratio_delivered_vs_{base}'], 2)} |"
                f" {_fmt(s[f'ratio_cpu_vs_{base}'], 2)} |"
            )
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    with_postfix = any(row["summary"].get("postfix") for row in rows)
    head = (
        "| size | sessions | API ms | esprelay accepted/s | delivered/s | p50 ms | p99 ms |"
        " CPU ms/msg | peak RSS MB | sink msg/s | sink CPU ms/msg | ratio (delivered/sink) |"
    )
    columns = 12
    if with_postfix:
        head += " Postfix delivered/s | Postfix CPU ms/msg | ratio (delivered/Postfix) |"
        columns += 3
    lines = [head, "|" + "---|" * columns]
    for row in rows:
        summary = row["summary"]
        e, s = summary["esprelay"], summary["sink"] or {}
        line = (
            f"| {human(row['size'])} | {row['sessions']} | {_fmt(row['latency_ms'])} |"
            f" {_fmt(e['accepted_per_s'])} | {_fmt(e['delivered_per_s'])} |"
            f" {_fmt(e['p50_ms'], 2)} | {_fmt(e['p99_ms'], 2)} | {_fmt(e['cpu_ms_per_msg'], 2)} |"
            f" {_fmt(e['peak_rss_mb'])} | {_fmt(s.get('accepted_per_s'))} |"
            f" {_fmt(s.get('cpu_ms_per_msg'), 2)} |"
            f" {_fmt(summary['ratio_delivered_vs_sink'], 2)} |"
        )
        if with_postfix:
            p = summary.get("postfix") or {}
            line += (
                f" {_fmt(p.get('delivered_per_s'))} | {_fmt(p.get('cpu_ms_per_msg'), 2)} |"
                f" {_fmt(summary.get('ratio_delivered_vs_postfix'), 2)} |"
            )
        lines.append(line)
    return "\n".join(lines)


def summarise_providers(runs: dict[str, list[Measurement]]) -> list[dict[str, Any]]:
    """Per kind: medians over its repeats, and the medians of the per-repeat ratios to
    the reference kind's run of the same repeat (None without the reference)."""
    reference = runs.get(REFERENCE, [])
    rows = []
    for kind, measured in runs.items():
        pairs = list(zip(measured, reference, strict=False))
        rows.append(
            {
                "provider": kind,
                "delivered_per_s": median([m.delivered_per_s for m in measured]),
                "cpu_ms_per_msg": median([m.cpu_ms_per_msg for m in measured]),
                "p50_ms": median([m.p50_ms for m in measured]),
                "p99_ms": median([m.p99_ms for m in measured]),
                "peak_rss_mb": max(m.peak_rss_mb for m in measured),
                "errors": sum(m.errors for m in measured),
                "undelivered": sum(m.sent - m.delivered for m in measured),
                "refused": sum(m.refused for m in measured),
                f"ratio_delivered_vs_{REFERENCE}": _ratios(
                    [(m.delivered_per_s, r.delivered_per_s) for m, r in pairs]
                )
                if reference
                else None,
                f"ratio_cpu_vs_{REFERENCE}": _ratios(
                    [(m.cpu_ms_per_msg, r.cpu_ms_per_msg) for m, r in pairs]
                )
                if reference
                else None,
            }
        )
    return rows


def provider_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| provider | delivered/s | CPU ms/msg | p50 ms | p99 ms | peak RSS MB |"
        f" delivered / {REFERENCE} | CPU / {REFERENCE} |",
        "|" + "---|" * 8,
    ]
    for row in rows:
        lines.append(
            f"| {row['provider']} | {_fmt(row['delivered_per_s'])} |"
            f" {_fmt(row['cpu_ms_per_msg'], 2)} | {_fmt(row['p50_ms'], 2)} |"
            f" {_fmt(row['p99_ms'], 2)} | {_fmt(row['peak_rss_mb'])} |"
            f" {_fmt(row[f'ratio_delivered_vs_{REFERENCE}'], 2)} |"
            f" {_fmt(row[f'ratio_cpu_vs_{REFERENCE}'], 2)} |"
        )
    return "\n".join(lines)


def choose_providers(text: str) -> list[str]:
    """``--providers``: '' (none), 'all' (every kind installed) or names; the reference
    kind comes first whenever any runs, for the ratios.  ValueError names what is not
    installed."""
    text = text.strip()
    if not text:
        return []
    available = installed()
    if text == "all":
        chosen = available
    else:
        chosen = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
        unknown = [n for n in chosen if n not in KINDS]
        if unknown:
            raise ValueError(f"not an HTTP kind the emulator plays: {', '.join(unknown)}")
        missing = [n for n in chosen if n not in available]
        if missing:
            raise ValueError(f"not installed here: {', '.join(missing)}")
    if chosen and REFERENCE in available and REFERENCE not in chosen:
        chosen.insert(0, REFERENCE)
    chosen.sort(key=lambda name: (name != REFERENCE, KINDS.index(name)))
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--sizes", default="2K,100K,5M", help="comma-separated, e.g. 2K,100K,5M")
    parser.add_argument("--sessions", default="1,20,200")
    parser.add_argument(
        "--latencies",
        default="0",
        help="API latencies in ms for every scenario (comma-separated)",
    )
    parser.add_argument(
        "--extra",
        default="2K:20:100,2K:200:100",
        help="extra SIZE:SESSIONS:LATENCY_MS scenarios ('' for none)",
    )
    parser.add_argument("--count", type=int, help="messages per run (default: by size/sessions)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply default counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--provider",
        default="auto",
        help="esprelay provider: outbox, postmark, sendgrid, or auto (an HTTP adapter if present)",
    )
    parser.add_argument(
        "--providers",
        default="all",
        help="the per-provider scenario: comma-separated HTTP kinds, 'all' (every one"
        f" installed of {', '.join(KINDS)}) or '' for none; {REFERENCE} always runs too,"
        " for the ratios",
    )
    parser.add_argument(
        "--provider-scenario",
        default="2K:20:0",
        help="SIZE:SESSIONS:LATENCY_MS of the per-provider scenario",
    )
    parser.add_argument(
        "--loadgen",
        choices=("python", "smtp-source"),
        default="python",
        help="python measures latency too; smtp-source (Postfix) is a cheaper C client",
    )
    parser.add_argument("--no-sink", action="store_true", help="skip the baseline")
    parser.add_argument(
        "--postfix",
        choices=("auto", "on", "off"),
        default="auto",
        help="also measure Postfix as relay into smtp-sink, at 0 ms API latency only"
        " (auto: when Postfix is installed and we are root)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--env", action="append", default=[], help="extra ESPRELAY_X=Y for esprelay"
    )
    parser.add_argument(
        "--spool",
        default=",".join(SPOOLS),
        help="esprelay's spools, measured in turn in every repeat (comma-separated:"
        " sqlite, postgresql; the first is the main table's, the base of the ratios and"
        " the per-provider scenario's)."
        " postgresql runs on a throw-away database created and dropped per run on"
        " --pg-url's server, and is left out with a note when that cannot be reached"
        " unless named alone or first",
    )
    parser.add_argument(
        "--pg-url",
        default=PG_ADMIN_URL,
        help="maintenance database of the PostgreSQL server for --spool postgresql"
        " (default: $ESPRELAY_BENCH_PG_URL or %(default)s)",
    )
    parser.add_argument(
        "--instances",
        default="",
        help="also run, in every repeat of every scenario, N esprelay instances sharing one"
        " PostgreSQL spool for each N given (comma-separated, e.g. 1,2,4; '' for none):"
        " each on a port of its own, the load generator's sessions spread over them, all"
        " pinned with the server (see bench/README.md, Capacity)",
    )
    parser.add_argument(
        "--sessions-per-instance",
        action="store_true",
        help="with --instances: the scenario's sessions and message count are per instance"
        " (N instances get N x as many), so each instance carries the same load; by"
        " default the scenario's sessions are spread over the instances",
    )
    parser.add_argument("--output", type=Path, help="JSON file (default: bench/results/...)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    provider = args.provider
    if provider == "auto":
        provider = _available_http_provider() or "outbox"
    if args.loadgen == "smtp-source" and not smtp_source_available():
        parser.error("smtp-source is not installed (Debian package postfix)")
    postfix_reason = None if args.postfix == "off" else postfix_unavailable_reason()
    if args.postfix == "on" and postfix_reason:
        parser.error(f"--postfix on: {postfix_reason}")
    with_postfix = args.postfix != "off" and postfix_reason is None
    spools = [name.strip() for name in args.spool.split(",") if name.strip()]
    if not spools or any(name not in SPOOLS for name in spools):
        parser.error(f"--spool: one or more of {', '.join(SPOOLS)}")
    pg_reason = postgres_unavailable_reason(args.pg_url) if "postgresql" in spools else None
    if pg_reason and spools[0] == "postgresql":
        parser.error(f"--spool postgresql: {pg_reason}")
    if pg_reason:
        print(f"note: leaving out the postgresql spool: {pg_reason}", file=sys.stderr)
        spools.remove("postgresql")
    try:
        instance_counts = sorted({int(n) for n in args.instances.split(",") if n.strip()})
    except ValueError:
        parser.error("--instances: comma-separated whole numbers, e.g. 1,2,4")
    if any(n < 1 for n in instance_counts):
        parser.error("--instances: every count at least 1")
    if instance_counts:
        reason = postgres_unavailable_reason(args.pg_url)
        if reason:
            parser.error(f"--instances: {reason}")
    try:
        providers = choose_providers(args.providers)
    except ValueError as exc:
        parser.error(f"--providers: {exc}")
    try:
        size_text, sessions_text, latency_text = args.provider_scenario.split(":")
        provider_scenario = (parse_size(size_text), int(sessions_text), float(latency_text))
    except ValueError:
        parser.error("--provider-scenario: expected SIZE:SESSIONS:LATENCY_MS, e.g. 2K:20:0")

    scenarios: list[tuple[int, int, float]] = []
    for size in (parse_size(s) for s in args.sizes.split(",") if s):
        for sessions in (int(n) for n in args.sessions.split(",") if n):
            for latency in (float(x) for x in args.latencies.split(",") if x):
                scenarios.append((size, sessions, latency))
    for spec in (s for s in args.extra.split(",") if s):
        size_text, sessions_text, latency_text = spec.split(":")
        item = (parse_size(size_text), int(sessions_text), float(latency_text))
        if item not in scenarios:
            scenarios.append(item)

    cpus = os.sched_getaffinity(0)
    server_cpus = helper_cpus = None
    if not args.no_pin and len(cpus) >= 2:
        ordered = sorted(cpus)
        server_cpus, helper_cpus = {ordered[-1]}, set(ordered[:-1])
    extra_env = dict(item.split("=", 1) for item in args.env)

    rows: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    for size, sessions, latency in scenarios:
        count = args.count or max(1, round(default_count(size, sessions) * args.scale))
        runs: list[Run] = []
        by_spool: dict[str, list[Measurement]] = {spool: [] for spool in spools}
        by_instances: dict[int, list[Measurement]] = {n: [] for n in instance_counts}
        for repeat in range(args.repeats):
            common = {
                "size": size,
                "sessions": sessions,
                "count": count,
                "latency_ms": latency,
                "loadgen": args.loadgen,
                "server_cpus": server_cpus,
                "helper_cpus": helper_cpus,
            }
            sink = None if args.no_sink else measure("sink", **common)  # type: ignore[arg-type]
            relay = measure(
                "esprelay",
                provider=provider,
                extra_env=extra_env,
                spool=spools[0],
                pg_admin_url=args.pg_url,
                **common,
            )
            by_spool[spools[0]].append(relay)
            for spool in spools[1:]:
                other = measure(
                    "esprelay",
                    provider=provider,
                    extra_env=extra_env,
                    spool=spool,
                    pg_admin_url=args.pg_url,
                    **common,
                )
                by_spool[spool].append(other)
                raw.append(other.to_json())
                if not args.quiet:
                    print(_spool_progress(size, sessions, latency, repeat, other), file=sys.stderr)
            # smtp-sink cannot wait less than a second: Postfix runs at 0 ms only.
            postfix = measure("postfix", **common) if with_postfix and latency == 0 else None
            runs.append((relay, sink, postfix))
            raw.extend(m.to_json() for m in (sink, relay, postfix) if m is not None)
            for n in instance_counts:
                scaled = dict(common)
                if args.sessions_per_instance:
                    scaled.update(sessions=sessions * n, count=count * n)
                shared = measure_shared(
                    instances=n,
                    provider=provider,
                    extra_env=extra_env,
                    pg_admin_url=args.pg_url,
                    **scaled,  # type: ignore[arg-type]
                )
                by_instances[n].append(shared)
                raw.append(shared.to_json())
                if not args.quiet:
                    print(
                        _spool_progress(size, shared.sessions, latency, repeat, shared)
                        + f" x{n} instance(s), lock waits {shared.lock_wait_share or 0:.1%}",
                        file=sys.stderr,
                        flush=True,
                    )
            if not args.quiet:
                print(
                    f"{human(size):>4} x{sessions:<3} api={latency:g}ms run {repeat + 1}:"
                    f" esprelay {relay.delivered_per_s or 0:.0f} delivered/s"
                    f" ({relay.cpu_ms_per_msg:.2f} ms CPU/msg, p50 {relay.p50_ms or 0:.1f} ms)"
                    + _rss_note(relay)
                    + (
                        f"  sink {sink.accepted_per_s:.0f}/s ({sink.cpu_ms_per_msg:.2f} ms CPU/msg)"
                        if sink
                        else ""
                    )
                    + (
                        f"  postfix {postfix.delivered_per_s or 0:.0f} delivered/s"
                        f" ({postfix.cpu_ms_per_msg:.2f} ms CPU/msg, {postfix.cpu_accounting})"
                        if postfix
                        else ""
                    ),
                    file=sys.stderr,
                    flush=True,
                )
        rows.append(
            {
                "size": size,
                "sessions": sessions,
                "latency_ms": latency,
                "count": count,
                "summary": summarise(runs),
                "spools": summarise_spools(by_spool),
                "instances": summarise_instances(by_instances) if instance_counts else None,
            }
        )

    provider_runs: dict[str, list[Measurement]] = {kind: [] for kind in providers}
    p_size, p_sessions, p_latency = provider_scenario
    p_count = args.count or max(1, round(default_count(p_size, p_sessions) * args.scale))
    for repeat in range(args.repeats if providers else 0):
        for kind in providers:
            relay = measure(
                "esprelay",
                provider=kind,
                extra_env=extra_env,
                size=p_size,
                sessions=p_sessions,
                count=p_count,
                latency_ms=p_latency,
                loadgen=args.loadgen,
                server_cpus=server_cpus,
                helper_cpus=helper_cpus,
                spool=spools[0],
                pg_admin_url=args.pg_url,
            )
            provider_runs[kind].append(relay)
            raw.append(relay.to_json())
            if not args.quiet:
                print(
                    f"{human(p_size):>4} x{p_sessions:<3} api={p_latency:g}ms run {repeat + 1}:"
                    f" {kind} {relay.delivered_per_s or 0:.0f} delivered/s"
                    f" ({relay.cpu_ms_per_msg:.2f} ms CPU/msg, p50 {relay.p50_ms or 0:.1f} ms)",
                    file=sys.stderr,
                    flush=True,
                )
    provider_rows = summarise_providers(provider_runs) if providers else []

    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {
            "cpus": os.cpu_count(),
            "loadavg": os.getloadavg(),
            "python": platform.python_version(),
            "pinned": {"server": sorted(server_cpus or []), "helpers": sorted(helper_cpus or [])},
        },
        "provider": provider,
        "loadgen": args.loadgen,
        "postfix": {
            "mode": args.postfix,
            "enabled": with_postfix,
            "unavailable": postfix_reason,
        },
        "repeats": args.repeats,
        "spools": spools,
        "instances": {
            "counts": instance_counts,
            "sessions_per_instance": args.sessions_per_instance,
            "pool_size": int(extra_env.get("ESPRELAY_SPOOL_POOL_SIZE", DEFAULT_POOL_SIZE)),
            "server": server_limits(args.pg_url),
        }
        if instance_counts
        else None,
        "scenarios": rows,
        "providers": {
            "size": p_size,
            "sessions": p_sessions,
            "latency_ms": p_latency,
            "count": p_count,
            "reference": REFERENCE,
            "rows": provider_rows,
        }
        if providers
        else None,
        "runs": raw,
    }
    output = args.output
    if output is None:
        RESULTS.mkdir(exist_ok=True)
        output = RESULTS / f"bench-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    if rows:
        print(table(rows))
    if rows and spools != ["sqlite"]:
        print()
        print(spool_table(rows))
    if rows and instance_counts:
        print(f"\nInstances sharing one PostgreSQL spool ({report['instances']}):")
        print(instances_table(rows))
    if provider_rows:
        print(
            f"\nPer provider: {human(p_size)} x {p_sessions} sessions, API {p_latency:g} ms,"
            f" {p_count} messages, {args.repeats} repeat(s), {spools[0]} spool"
        )
        print(provider_table(provider_rows))
    checks = (
        [
            (
                f"{human(row['size'])} x{row['sessions']} api={row['latency_ms']:g}ms"
                + ("" if spool == spools[0] else f" on {spool}"),
                row["summary"]["esprelay"] if spool == spools[0] else row["spools"][spool],
            )
            for row in rows
            for spool in spools
        ]
        + [
            (f"{row['provider']} {human(p_size)} x{p_sessions} api={p_latency:g}ms", row)
            for row in provider_rows
        ]
        + [
            (
                f"{human(row['size'])} x{row['sessions']} api={row['latency_ms']:g}ms"
                f" with {n} instance(s)",
                figures,
            )
            for row in rows
            for n, figures in (row["instances"] or {}).items()
        ]
    )
    for label, relay in checks:
        if relay["errors"] or relay["undelivered"] or relay["refused"]:
            # A refused or failed session makes the figures meaningless: say so loudly.
            print(
                f"WARNING {label}: {relay['errors']} load errors,"
                f" {relay['undelivered']} undelivered, {relay['refused']} deferred or"
                " failed attempts"
            )
    postfix_note = "on" if with_postfix else f"off ({postfix_reason or '--postfix off'})"
    print(
        f"\nprovider={provider} loadgen={args.loadgen} repeats={args.repeats}"
        f" postfix={postfix_note}; JSON: {output}"
    )
    return 0


def _rss_note(m: Measurement) -> str:
    """Peak RSS while the load ran and after it (until delivered), when sampled."""
    if m.peak_rss_intake_mb is None or m.peak_rss_delivery_mb is None:
        return ""
    return (
        f" RSS peak {m.peak_rss_mb:.0f} MB: {m.peak_rss_intake_mb:.0f} during intake,"
        f" {m.peak_rss_delivery_mb:.0f} after"
    )


def _spool_progress(size: int, sessions: int, latency: float, repeat: int, m: Measurement) -> str:
    return (
        f"{human(size):>4} x{sessions:<3} api={latency:g}ms run {repeat + 1}:"
        f" esprelay on {m.spool} {m.delivered_per_s or 0:.0f} delivered/s"
        f" ({m.cpu_ms_per_msg:.2f} ms CPU/msg"
        + (
            f", {m.round_trips_per_msg:.2f} round trips/msg"
            if m.round_trips_per_msg is not None
            else ""
        )
        + (f", {m.db_commits_per_msg:.2f} commits/msg" if m.db_commits_per_msg is not None else "")
        + (
            f", PostgreSQL {m.db_cpu_ms_per_msg:.2f} ms CPU/msg"
            f" (server {m.db_server_cpu_ms_per_msg or 0:.2f})"
            if m.db_cpu_ms_per_msg is not None
            else ""
        )
        + ")"
        + _rss_note(m)
    )


def _available_http_provider() -> str | None:
    """The first HTTP adapter for which the emulator has a flavour, if esprelay has one."""
    try:
        from esprelay.providers import registered
    except ImportError:
        return None
    for name in HTTP_PROVIDERS:
        if name in registered():
            return name
    return None


if __name__ == "__main__":
    sys.exit(main())
