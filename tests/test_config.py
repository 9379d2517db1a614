"""Configuration is parsed once; a bad value is one clear line and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from esprelay.config import Settings, load_settings
from esprelay.errors import ConfigError
from esprelay.providers.outbox import OutboxSettings
from esprelay.routing import default_provider


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("ESPRELAY_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_defaults() -> None:
    settings = load_settings(env_file=None)
    assert settings.smtp_host == "127.0.0.1"
    assert settings.smtp_port == 2525
    assert settings.provider == "outbox"
    assert default_provider(settings).settings == OutboxSettings(dir=Path("outbox"))
    assert settings.spool_url == "sqlite:///esprelay-data/spool.db"
    assert settings.max_queue_lifetime == 5 * 86400


def test_env_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("ESPRELAY_SMTP_PORT=2600\nESPRELAY_MAX_MESSAGE_SIZE=10M\n")
    monkeypatch.setenv("ESPRELAY_MAX_QUEUE_LIFETIME", "2h")
    settings = load_settings(env_file=env_file)
    assert settings.smtp_port == 2600
    assert settings.max_message_size == 10 * 1024 * 1024
    assert settings.max_queue_lifetime == 7200
    monkeypatch.setenv("ESPRELAY_SMTP_PORT", "2700")  # the environment wins over .env
    assert load_settings(env_file=env_file).smtp_port == 2700


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("ESPRELAY_SMTP_PORT", "abc", "ESPRELAY_SMTP_PORT"),
        ("ESPRELAY_SMTP_PORT", "70000", "ESPRELAY_SMTP_PORT"),
        ("ESPRELAY_PROVIDER", "smtp", "ESPRELAY_PROVIDER"),
        ("ESPRELAY_MAX_QUEUE_LIFETIME", "5 fortnights", "ESPRELAY_MAX_QUEUE_LIFETIME"),
        ("ESPRELAY_MAX_MESSAGE_SIZE", "big", "ESPRELAY_MAX_MESSAGE_SIZE"),
        ("ESPRELAY_PROVIDER", "sendgrid", "ESPRELAY_SENDGRID_API_KEY is required"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, fragment: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings(env_file=None)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_secrets_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPRELAY_PROVIDER", "sendgrid")
    monkeypatch.setenv("ESPRELAY_SENDGRID_API_KEY", "SG.very-secret")
    settings = load_settings(env_file=None)
    assert "very-secret" not in repr(settings)
    assert "very-secret" not in str(settings)
    assert isinstance(settings, Settings)


def test_bad_value_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPRELAY_SMTP_PORT", "hunter2-secret")
    with pytest.raises(ConfigError) as info:
        load_settings(env_file=None)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("command", [["serve"], ["queue", "list"]])
def test_cli_exits_78_with_one_line(tmp_path: Path, command: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESPRELAY_")}
    env["ESPRELAY_SMTP_PORT"] = "not-a-port"
    result = subprocess.run(
        [sys.executable, "-m", "esprelay", *command],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=30,
        check=False,
    )
    assert result.returncode == 78  # EX_CONFIG
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "ESPRELAY_SMTP_PORT" in lines[0]
    assert "Traceback" not in result.stderr


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ESPRELAY_")}
        env["ESPRELAY_SMTP_PORT"] = str(port)
        result = subprocess.run(
            [sys.executable, "-m", "esprelay", "serve"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=30,
            check=False,
        )
    assert result.returncode == 75  # EX_TEMPFAIL: a restart may find the port free
    assert "cannot listen on" in result.stderr
    assert "Traceback" not in result.stderr
