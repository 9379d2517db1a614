"""``python -m bench.transport --exchange`` still runs (tiny counts, no timing assertions)."""

from __future__ import annotations

import pytest
from bench.transport import main


def test_exchange_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "--exchange", "--requests", "10", "--concurrency", "2", "--latency-ms", "0",
            "--repeats", "1", "--loop", "asyncio",
        ]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "median CPU per SendGrid exchange" in out
    assert "plain httpx-aiohttp" in out
