"""Security settings, checked once at start-up; policy and limiter building blocks."""

from __future__ import annotations

from pathlib import Path

import pytest

from esprelay.config import load_settings
from esprelay.errors import ConfigError
from esprelay.smtp.auth import FailureLimiter, UserDB, hash_password, parse_sender_rules
from esprelay.smtp.policy import RelayPolicy, in_networks, parse_networks, sender_matches


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    monkeypatch.chdir(tmp_path)
    for name in ("TRUSTED_NETWORKS", "AUTH_USER", "AUTH_PASSWORD", "TLS_CERT_FILE"):
        monkeypatch.delenv(f"ESPRELAY_{name}", raising=False)
    return monkeypatch


def test_defaults_trust_loopback_only(env: pytest.MonkeyPatch) -> None:
    settings = load_settings(None)
    assert settings.trusted_networks == ("127.0.0.0/8", "::1/128")
    assert settings.tls_min_version == "1.2"
    assert settings.repair_headers is True


def test_network_list_parsing(env: pytest.MonkeyPatch) -> None:
    env.setenv("ESPRELAY_TRUSTED_NETWORKS", "10.0.0.0/8, 192.168.1.7 fd00::/8")
    assert load_settings(None).trusted_networks == ("10.0.0.0/8", "192.168.1.7", "fd00::/8")
    env.setenv("ESPRELAY_TRUSTED_NETWORKS", "")
    assert load_settings(None).trusted_networks == ()


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"ESPRELAY_TRUSTED_NETWORKS": "10.0.0.0/8,everyone"}, "ESPRELAY_TRUSTED_NETWORKS"),
        ({"ESPRELAY_TLS_CERT_FILE": "/x.pem"}, "go together"),
        ({"ESPRELAY_SMTPS_PORT": "465"}, "ESPRELAY_SMTPS_PORT needs"),
        ({"ESPRELAY_AUTH_USER": "app"}, "go together"),
        ({"ESPRELAY_TLS_MIN_VERSION": "1.4"}, "ESPRELAY_TLS_MIN_VERSION"),
        ({"ESPRELAY_FORCE_FROM": "not-an-address"}, "ESPRELAY_FORCE_FROM"),
    ],
)
def test_bad_security_settings(
    env: pytest.MonkeyPatch, variables: dict[str, str], message: str
) -> None:
    for name, value in variables.items():
        env.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        load_settings(None)


def test_networks_and_mapped_addresses() -> None:
    networks = parse_networks(["127.0.0.1/32", "10.0.0.0/8"])
    assert in_networks("127.0.0.1", networks)
    assert in_networks("::ffff:10.1.2.3", networks)  # an IPv4 client on a dual-stack socket
    assert not in_networks("127.0.0.2", networks)
    assert not in_networks("garbage", networks)
    assert in_networks("::1", parse_networks(["::1"]))


def test_sender_rules() -> None:
    rules = parse_sender_rules("Scanner@Example.com, @example.net example.org")
    assert rules == ("scanner@example.com", "example.net", "example.org")
    assert sender_matches("SCANNER@example.com", rules)
    assert sender_matches("any@example.net", rules)
    assert not sender_matches("other@example.com", rules)
    assert not sender_matches("x@sub.example.org", rules)  # exact domains only
    with pytest.raises(ValueError, match="addresses or domains"):
        parse_sender_rules("a@b@c")
    policy = RelayPolicy(parse_networks([]), allowed_sender_domains=("example.com",))
    assert policy.sender_error("a@example.com", None) is None
    assert policy.sender_error("a@example.com", ("b@example.com",)) is not None
    assert policy.sender_error("a@evil.example", None) is not None


def test_users_file_and_single_user(tmp_path: Path) -> None:
    users_file = tmp_path / "users"
    users_file.write_text(f"# comment\n\nprinter:{hash_password('pw1')}:example.com\n")
    users = UserDB.load(users_file, "app", "pw2")
    assert len(users) == 2
    printer = users.authenticate(b"printer", b"pw1")
    assert printer is not None and printer.allowed_senders == ("example.com",)
    assert users.authenticate(b"printer", b"pw2") is None
    assert users.authenticate(b"app", b"pw2") is not None
    assert users.authenticate(b"\xff", b"pw2") is None
    with pytest.raises(ConfigError, match="defined twice"):
        UserDB.load(users_file, "printer", "x")
    with pytest.raises(ConfigError, match="cannot read"):
        UserDB.load(tmp_path / "missing")


def test_failure_limiter() -> None:
    limiter = FailureLimiter(max_failures=2, window=3600)
    limiter.reserve("10.0.0.1")
    assert not limiter.blocked("10.0.0.1")
    limiter.reserve("10.0.0.1")
    assert limiter.blocked("10.0.0.1")
    assert not limiter.blocked("10.0.0.2")
    forgetful = FailureLimiter(max_failures=1, window=0)
    forgetful.reserve("10.0.0.1")
    assert not forgetful.blocked("10.0.0.1")  # outside the window already
