"""The spool settings added for PostgreSQL, and that they are documented."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from esprelay.config import Settings, load_settings
from esprelay.errors import ConfigError
from esprelay.spool import open_spool
from esprelay.spool.postgres import PostgresSpool

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("ESPRELAY_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_defaults() -> None:
    settings = load_settings(env_file=None)
    assert settings.spool_auto_migrate is True
    assert settings.spool_pool_size == 10


def test_values_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPRELAY_SPOOL_AUTO_MIGRATE", "false")
    monkeypatch.setenv("ESPRELAY_SPOOL_POOL_SIZE", "3")
    settings = load_settings(env_file=None)
    assert settings.spool_auto_migrate is False
    assert settings.spool_pool_size == 3


def test_pool_size_must_be_positive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPRELAY_SPOOL_POOL_SIZE", "0")
    with pytest.raises(ConfigError, match="ESPRELAY_SPOOL_POOL_SIZE"):
        load_settings(env_file=None)


def test_postgresql_urls_select_the_shared_spool() -> None:
    for url in ("postgresql://relay@db/mail", "postgres://relay@db/mail"):
        spool = open_spool(url, exclusive=True, owner="h:1", auto_migrate=False, pool_size=4)
        assert isinstance(spool, PostgresSpool)
        assert (spool.owner, spool.auto_migrate, spool.pool_size) == ("h:1", False, 4)
    # Admin commands never take back anybody's leases.
    shared = open_spool("postgresql://relay@db/mail", owner="h:1")
    assert isinstance(shared, PostgresSpool)
    assert shared.owner is None
    with pytest.raises(ConfigError, match="postgresql://"):
        open_spool("mysql://relay@db/mail")


@pytest.mark.parametrize("field", ["spool_auto_migrate", "spool_pool_size", "lease_time"])
def test_documented(field: str) -> None:
    variable = f"ESPRELAY_{field.upper()}"
    assert field in Settings.model_fields
    assert f"{variable}=" in (ROOT / ".env.example").read_text()
    assert f"`{variable}`" in (ROOT / "README.md").read_text()
