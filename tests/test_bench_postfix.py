"""The Postfix relay of the benchmark: its generated configuration (no Postfix needed),
the counters it reads, and, where Postfix can run, one tiny end-to-end measurement."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench.__main__ import summarise, table
from bench.harness import Measurement, measure
from bench.postfix import RelayConfig, main_cf, master_cf, sink_messages, unavailable_reason


def _settings(text: str) -> dict[str, str]:
    settings: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(" = ")
        assert sep, line
        assert name not in settings, f"{name} set twice"
        settings[name] = value
    return settings


def _config(tmp_path: Path) -> RelayConfig:
    return RelayConfig(tmp_path, smtpd_port=40025, sink_port=40026, process_limit=300)


def test_main_cf_is_a_private_loopback_relay_into_the_sink(tmp_path: Path) -> None:
    config = _config(tmp_path)
    settings = _settings(main_cf(config))
    assert settings["queue_directory"] == str(tmp_path / "queue")
    assert settings["data_directory"] == str(tmp_path / "data")
    assert settings["relayhost"] == "[127.0.0.1]:40026"
    assert settings["mynetworks"] == "127.0.0.0/8"
    assert settings["inet_interfaces"] == "127.0.0.1"
    assert settings["inet_protocols"] == "ipv4"
    assert (settings["mail_owner"], settings["setgid_group"]) == ("postfix", "postdrop")
    # No local delivery, no DNS, enough processes for 200 sessions.
    assert settings["mydestination"] == ""
    assert settings["local_transport"].startswith("error:")
    assert settings["alias_maps"] == ""
    assert settings["disable_dns_lookups"] == "yes"
    assert settings["smtp_host_lookup"] == "native"
    assert settings["default_process_limit"] == "300"
    # The log stays in the instance's directory, which Postfix must be told to allow.
    assert settings["maillog_file"] == str(tmp_path / "maillog")
    assert settings["maillog_file_prefixes"] == str(tmp_path)


def test_master_cf_listens_on_loopback_only_without_chroot(tmp_path: Path) -> None:
    lines = [line.split() for line in master_cf(_config(tmp_path)).splitlines()]
    assert all(len(fields) == 8 for fields in lines)
    inet = [fields for fields in lines if fields[1] == "inet"]
    assert inet == [["127.0.0.1:40025", "inet", "n", "-", "n", "-", "300", "smtpd"]]
    assert {fields[4] for fields in lines} == {"n"}  # chroot column
    services = {fields[0] for fields in lines}
    assert {"cleanup", "qmgr", "rewrite", "smtp", "relay", "bounce", "postlog"} <= services
    assert "local" not in services and "pickup" not in services


def test_sink_messages_reads_the_last_counter(tmp_path: Path) -> None:
    counters = tmp_path / "smtp-sink.out"
    assert sink_messages(counters) == 0
    counters.write_bytes(b"sess=1 quit=0 mesg=1\rsess=1 quit=1 mesg=1\r" * 40 + b"mesg=1234\r")
    assert sink_messages(counters) == 1234


def _measurement(target: str, delivered_per_s: float, cpu: float) -> Measurement:
    return Measurement(
        target=target,
        provider="-",
        size=2048,
        sessions=20,
        latency_ms=0.0,
        count=10,
        loadgen="python",
        sent=10,
        errors=0,
        accept_seconds=1.0,
        deliver_seconds=1.0,
        delivered=10,
        accepted_per_s=delivered_per_s,
        delivered_per_s=delivered_per_s,
        p50_ms=1.0,
        p99_ms=2.0,
        cpu_ms_per_msg=cpu,
        peak_rss_mb=10.0,
        error_samples=[],
        cpu_accounting="cgroup-v2" if target == "postfix" else "process",
    )


def test_summary_and_table_compare_with_postfix() -> None:
    runs = [
        (
            _measurement("esprelay", 200.0, 4.0),
            _measurement("sink", 800.0, 1.0),
            _measurement("postfix", 100.0, 2.0),
        ),
        (_measurement("esprelay", 300.0, 3.0), None, _measurement("postfix", 100.0, 2.0)),
    ]
    summary = summarise(runs)
    assert summary["ratio_delivered_vs_postfix"] == pytest.approx(2.5)
    assert summary["ratio_cpu_vs_postfix"] == pytest.approx(1.75)
    assert summary["ratio_delivered_vs_sink"] == pytest.approx(0.25)
    assert summary["postfix"]["cpu_accounting"] == ["cgroup-v2"]
    rendered = table([{"size": 2048, "sessions": 20, "latency_ms": 0.0, "summary": summary}])
    head, rule, row = rendered.splitlines()
    assert "ratio (delivered/Postfix)" in head
    assert head.count("|") == rule.count("|") == row.count("|")
    assert row.rstrip().endswith("| 100 | 2.00 | 2.50 |")

    without = summarise([(runs[0][0], runs[0][1], None)])
    assert without["postfix"] is None and without["ratio_delivered_vs_postfix"] is None
    plain = table([{"size": 2048, "sessions": 20, "latency_ms": 0.0, "summary": without}])
    assert "Postfix" not in plain


@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
def test_postfix_relay_delivers_every_message() -> None:
    result = measure("postfix", size=2048, sessions=3, count=6, deliver_timeout=60)
    assert (result.sent, result.errors, result.delivered) == (6, 0, 6)
    assert result.deliver_seconds is not None
    assert result.cpu_ms_per_msg > 0
    assert result.cpu_accounting in {"cgroup-v2", "cgroup-v1", "proc-tree"}
