"""The benchmark harness still works end to end (tiny counts, no timing assertions)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from bench.__main__ import main
from bench.harness import cpu_seconds, measure


def test_esprelay_scenario_delivers_every_message() -> None:
    result = measure("esprelay", size=2048, sessions=3, count=6, deliver_timeout=30)
    assert (result.sent, result.errors, result.delivered) == (6, 0, 6)
    assert result.deliver_seconds is not None
    # /proc counts CPU in clock ticks (10 ms): six messages may cost less than one.
    assert result.cpu_ms_per_msg >= 0
    assert result.peak_rss_mb > 0
    assert result.p50_ms is not None and result.p99_ms is not None


def test_cli_writes_table_and_json(tmp_path: Path, capsys: object) -> None:
    output = tmp_path / "out.json"
    code = main(
        [
            "--sizes", "2K", "--sessions", "2", "--extra", "", "--count", "4",
            "--repeats", "1", "--output", str(output), "--quiet", "--no-pin",
            "--postfix", "off", "--providers", "",
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads(output.read_text())
    (scenario,) = report["scenarios"]
    assert scenario["summary"]["esprelay"]["undelivered"] == 0
    assert scenario["summary"]["ratio_delivered_vs_sink"] is not None
    assert {run["target"] for run in report["runs"]} == {"sink", "esprelay"}
    assert report["postfix"]["enabled"] is False


def test_cpu_seconds_counts_this_process() -> None:
    before = cpu_seconds(os.getpid())
    started = time.process_time()
    while time.process_time() - started < 0.1:
        pass
    assert cpu_seconds(os.getpid()) - before >= 0.05
