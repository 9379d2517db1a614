"""One configuration for every command: --env-file / ESPRELAY_ENV_FILE, serve --host
--port, and log levels in any case."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from esprelay.config import load_settings
from tests.relayproc import RelayProcess


def esprelay(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ESPRELAY_")}
    return subprocess.run(
        [sys.executable, "-m", "esprelay", *args],
        capture_output=True, text=True, timeout=60, cwd=cwd, env={**base, **(env or {})},
    )  # fmt: skip


def make_spool(tmp_path: Path) -> Path:
    spool = tmp_path / "srv" / "spool.db"
    spool.parent.mkdir()
    env_file = tmp_path / "srv" / "esprelay.env"
    env_file.write_text(f"ESPRELAY_SPOOL_URL=sqlite:///{spool}\n")
    assert esprelay("--env-file", str(env_file), "db", "upgrade", cwd=tmp_path).returncode == 0
    return env_file


def test_queue_commands_read_the_named_env_file(tmp_path: Path) -> None:
    env_file = make_spool(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for args, env in (
        (("--env-file", str(env_file)), None),
        ((), {"ESPRELAY_ENV_FILE": str(env_file)}),
    ):
        result = esprelay(*args, "queue", "list", cwd=elsewhere, env=env)
        assert result.returncode == 0, result.stderr
    # Nothing was created where the command happened to run.
    assert list(elsewhere.iterdir()) == []


def test_a_named_env_file_that_is_missing_is_an_error(tmp_path: Path) -> None:
    result = esprelay("--env-file", str(tmp_path / "nope.env"), "queue", "list", cwd=tmp_path)
    assert result.returncode == 78  # EX_CONFIG
    assert "--env-file" in result.stderr and "nope.env" in result.stderr
    result = esprelay("queue", "list", cwd=tmp_path, env={"ESPRELAY_ENV_FILE": "missing.env"})
    assert result.returncode == 78 and "ESPRELAY_ENV_FILE" in result.stderr


def test_config_reads_the_named_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / "x.env"
    env_file.write_text("ESPRELAY_SMTP_PORT=2999\n")
    result = esprelay("--env-file", str(env_file), "config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ESPRELAY_SMTP_PORT=2999" in result.stdout


@pytest.mark.parametrize("level", ["info", "Debug", "WARNING"])
def test_log_levels_in_any_case(level: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPRELAY_LOG_LEVEL", level)
    assert load_settings(env_file=None).log_level == level.upper()


def test_serve_host_and_port_win_over_the_settings(relay_factory: type[RelayProcess]) -> None:
    relay = relay_factory({"ESPRELAY_SMTP_HOST": "192.0.2.1", "ESPRELAY_SMTP_PORT": "1"})
    relay.args = ["--host", "127.0.0.1", "--port", "0"]
    relay.start()
    assert relay.port > 0
