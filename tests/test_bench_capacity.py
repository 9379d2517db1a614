"""``python -m bench --instances``: several esprelay instances on one PostgreSQL spool
(tiny counts, no timing assertions)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from bench.__main__ import main
from bench.harness import postgres_unavailable_reason
from bench.loadgen import run_load
from bench.providers import REFERENCE, installed


def _provider() -> str:
    return REFERENCE if REFERENCE in installed() else "outbox"


def test_two_instances_on_one_spool_deliver_every_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)
    output = tmp_path / "out.json"
    code = main(
        [
            "--sizes", "2K", "--sessions", "4", "--extra", "", "--count", "8",
            "--repeats", "1", "--output", str(output), "--quiet", "--no-pin",
            "--postfix", "off", "--no-sink", "--provider", _provider(),
            "--spool", "sqlite", "--providers", "", "--instances", "2",
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads(output.read_text())
    assert report["instances"]["counts"] == [2]
    assert report["instances"]["server"]["max_connections"] > 0
    (scenario,) = report["scenarios"]
    figures = scenario["instances"]["2"]
    assert (figures["errors"], figures["undelivered"], figures["refused"]) == (0, 0, 0)
    assert figures["round_trips_per_msg"] > 0 and figures["db_commits_per_msg"] > 0
    # FOR UPDATE SKIP LOCKED and one statement per batch: instances never deadlock.
    assert figures["deadlocks"] == 0
    # Each instance holds at least its listening connection and one pooled one.
    assert figures["peak_db_connections"] >= 2
    (shared,) = [run for run in report["runs"] if run["instances"] == 2]
    assert (shared["sent"], shared["delivered"], shared["spool"]) == (8, 8, "postgresql")
    assert shared["lock_wait_share"] is not None
    # Every message's insert is in the WAL (and anyone else's writes too: no upper bound).
    assert shared["wal_bytes_per_msg"] > 0
    out = capsys.readouterr().out
    assert "Instances sharing one PostgreSQL spool" in out and "WARNING" not in out


def test_load_spreads_sessions_over_every_port() -> None:
    seen: dict[int, int] = {}

    async def scenario() -> None:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            port = writer.get_extra_info("sockname")[1]
            seen[port] = seen.get(port, 0) + 1
            writer.write(b"220 ready\r\n")
            while line := await reader.readline():
                if line == b"DATA\r\n":
                    writer.write(b"354 go\r\n")
                    while await reader.readline() != b".\r\n":
                        pass
                    writer.write(b"250 ok\r\n")
                elif line == b"QUIT\r\n":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 ok\r\n")
            writer.close()

        servers = [await asyncio.start_server(answer, "127.0.0.1", 0) for _ in range(2)]
        ports = [server.sockets[0].getsockname()[1] for server in servers]
        try:
            result = await asyncio.wait_for(
                run_load("127.0.0.1", 0, sessions=4, count=8, size=512, ports=ports), 30
            )
        finally:
            for server in servers:
                server.close()
        assert (result.sent, result.errors) == (8, 0)
        assert sorted(seen) == sorted(ports)

    asyncio.run(scenario())
    # Four sessions, two per port; each session sends its messages in turn.
    assert sum(seen.values()) == 8 and all(n >= 2 for n in seen.values())


def test_instances_must_be_positive_counts() -> None:
    with pytest.raises(SystemExit):
        main(["--instances", "0", "--sizes", "", "--extra", "", "--providers", ""])
    with pytest.raises(SystemExit):
        main(["--instances", "two", "--sizes", "", "--extra", "", "--providers", ""])
