"""Every HTTP provider kind in the benchmark: the emulator answers each ESP by its path
as the adapter expects, and a real esprelay delivers through each one to it (tiny
counts, loopback only, no timing assertions)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from bench import emulator
from bench.__main__ import main
from bench.harness import measure
from bench.mime_cpu import http_provider
from bench.mime_cpu import main as mime_cpu_main
from bench.providers import KINDS, REFERENCE, installed

from esprelay.models import Envelope, OutboundMessage
from esprelay.testing.fakeesp import FakeESP, Reply

INSTALLED = installed()
RAW = (
    b"From: <bench@example.com>\r\nTo: <sink@example.org>\r\nSubject: bench\r\n"
    b"Message-ID: <one@example.com>\r\n\r\nHello.\r\n"
)
MESSAGE = OutboundMessage("m1", Envelope("bench@example.com", ("sink@example.org",)), RAW)


def _need(kind: str) -> None:
    if kind not in INSTALLED:
        pytest.skip(f"no {kind} adapter in this installation")


async def _exchange(kinds: list[str]) -> tuple[dict[str, object], list[httpx.Response]]:
    server, stats = await emulator.start(0)
    port = server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    responses = []
    async with server, httpx.AsyncClient() as client:
        for kind in kinds:
            provider = http_provider(kind, client, url)
            response = await client.send(provider.build_request(MESSAGE).request)
            await response.aread()
            responses.append(response)
            # The adapter takes the emulator's answer as its ESP's success.
            result = provider.parse_response(response, MESSAGE)
            assert result.rejected == () and result.warnings == (), kind
        token = await client.post(
            f"{url}/tenant/oauth2/v2.0/token", data={"grant_type": "client_credentials"}
        )
        assert token.status_code == 200 and token.json()["token_type"] == "Bearer"
        sparkpost = await client.post(f"{url}/api/v1/transmissions", content=b"{}")
        lost = await client.get(f"{url}/v3/mail/send")
        assert lost.status_code == 404
        counters = json.loads(stats.as_json())
    assert sparkpost.status_code == 200
    assert sparkpost.json()["results"]["total_rejected_recipients"] == 0
    assert sparkpost.json()["results"]["total_accepted_recipients"] == 1
    assert sparkpost.json()["results"]["id"]
    return counters, responses


def test_emulator_answers_every_installed_kind_as_its_adapter_expects() -> None:
    counters, responses = asyncio.run(_exchange(INSTALLED))
    by_kind = dict.fromkeys(INSTALLED, 1)
    by_kind["sparkpost"] = by_kind.get("sparkpost", 0) + 1  # the request made by hand
    assert counters["by_kind"] == by_kind
    assert counters["requests"] == len(INSTALLED) + 1
    # The token request and the 404 are not sends.
    assert (counters["tokens"], counters["unknown"]) == (1, 1)
    # Every answer carries its own id.
    bodies = [r.content + r.headers.get("x-message-id", "").encode() for r in responses]
    assert len(set(bodies)) == len(bodies)


@pytest.mark.parametrize("kind", KINDS)
def test_esprelay_delivers_through_each_kind_to_the_emulator(kind: str) -> None:
    _need(kind)
    result = measure("esprelay", provider=kind, size=2048, sessions=2, count=2, deliver_timeout=60)
    assert (result.sent, result.errors, result.delivered, result.refused) == (2, 0, 2, 0)
    assert result.provider == kind and result.deliver_seconds is not None


def test_answers_the_adapter_refuses_are_not_deliveries() -> None:
    """SendGrid's adapter sent to a server answering 200 (not SendGrid's 202): the
    benchmark's emulator sees no SendGrid request and esprelay's log shows deferrals."""
    with FakeESP(lambda request: Reply(200, {"id": "not-sendgrid"})) as other:
        result = measure(
            "esprelay",
            provider="sendgrid",
            size=2048,
            sessions=1,
            count=1,
            deliver_timeout=3,
            extra_env={"ESPRELAY_SENDGRID_API_URL": other.url},
        )
        assert other.wait_for(1)
    assert (result.sent, result.delivered, result.deliver_seconds) == (1, 0, None)
    assert result.refused >= 1


def test_cli_runs_one_scenario_per_provider(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _need("postmark")
    output = tmp_path / "out.json"
    code = main(
        [
            "--sizes", "", "--extra", "", "--providers", "postmark",
            "--provider-scenario", "2K:2:0", "--count", "3", "--repeats", "1",
            "--output", str(output), "--quiet", "--no-pin", "--postfix", "off",
        ]
    )  # fmt: skip
    assert code == 0
    report = json.loads(output.read_text())
    assert report["scenarios"] == []
    section = report["providers"]
    assert (section["size"], section["sessions"], section["count"]) == (2048, 2, 3)
    rows = {row["provider"]: row for row in section["rows"]}
    assert list(rows) == [REFERENCE, "postmark"]  # the reference runs too, first
    for row in rows.values():
        assert (row["errors"], row["undelivered"], row["refused"]) == (0, 0, 0)
        assert row["cpu_ms_per_msg"] >= 0
    assert rows[REFERENCE][f"ratio_delivered_vs_{REFERENCE}"] == pytest.approx(1.0)
    assert rows["postmark"][f"ratio_delivered_vs_{REFERENCE}"] is not None
    assert {(run["target"], run["provider"]) for run in report["runs"]} == {
        ("esprelay", REFERENCE),
        ("esprelay", "postmark"),
    }
    out = capsys.readouterr().out
    assert "| postmark |" in out and "WARNING" not in out


def test_cli_refuses_an_unknown_provider() -> None:
    with pytest.raises(SystemExit):
        main(["--providers", "pigeon", "--postfix", "off"])


def test_build_request_micro_benchmark_covers_every_kind(
    capsys: pytest.CaptureFixture[str],
) -> None:
    mime_cpu_main(["--loops", "2"])
    out = capsys.readouterr().out
    for kind in INSTALLED:
        assert f"| {kind} |" in out
