"""`esprelay doctor` and `esprelay config`, run as a user runs them: a real process
against fake ESPs on loopback, a spool in tmp_path, closed ports for what must fail."""

from __future__ import annotations

import base64
import datetime
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from esprelay.config import Settings
from esprelay.doctor import DEFAULT_SMTP_PROBE_HOST, listener_tls_checks
from esprelay.testing.fakeesp import FakeESP, Recorded, Reply
from tests.securitykit import Certs

SECRETS = {
    "SG_KEY": "SG.sendgrid-secret-4711",
    "MG_KEY": "mailgun-secret-4712",
    "PM_TOKEN": "postmark-secret-4713",
    "RS_KEY": "re_resend-secret-4714",
    "BV_KEY": "xkeysib-brevo-secret-4715",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-4716",
}
STATUSES = {"pass", "info", "warn", "fail"}


def respond(request: Recorded) -> Reply:
    """The ESPs' check endpoints, each checking its own credentials as the API would."""
    auth = request.headers.get("authorization", "")
    basic = base64.b64encode(f"api:{SECRETS['MG_KEY']}".encode()).decode()
    if request.path == "/v3/scopes" and auth == f"Bearer {SECRETS['SG_KEY']}":
        return Reply(200, {"scopes": ["mail.send", "user.profile.read"]})
    if request.path == "/v3/domains/mg.example.com" and auth == f"Basic {basic}":
        return Reply(200, {"domain": {"name": "mg.example.com", "state": "active"}})
    if (
        request.path == "/server"
        and request.headers.get("x-postmark-server-token") == (SECRETS["PM_TOKEN"])
    ):
        return Reply(200, {"ID": 1, "Name": "esprelay"})
    if request.path == "/domains" and auth == f"Bearer {SECRETS['RS_KEY']}":
        return Reply(200, {"data": []})
    if request.path == "/v3/account" and request.headers.get("api-key") == SECRETS["BV_KEY"]:
        return Reply(200, {"email": "ops@example.com"})
    if request.path == "/v2/email/account" and auth.startswith("AWS4-HMAC-SHA256 "):
        return Reply(200, {"SendingEnabled": True, "ProductionAccessEnabled": True})
    return Reply(401, {"message": "unauthorized"})


@pytest.fixture
def esp() -> Iterator[FakeESP]:
    with FakeESP(respond) as fake:
        yield fake


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def environment(tmp_path: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ESPRELAY_", "AWS_")) and "proxy" not in k.lower()
    }
    env.update(
        {
            "ESPRELAY_SPOOL_URL": f"sqlite:///{tmp_path / 'data' / 'spool.db'}",
            "ESPRELAY_OUTBOX_DIR": str(tmp_path / "outbox"),
            "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
            **extra,
        }
    )
    return env


def esprelay(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "esprelay", *args],
        capture_output=True,
        text=True,
        env=environment(tmp_path, env or {}),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )


def doctor(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return esprelay(
        tmp_path, "doctor", "--smtp-probe-host", "127.0.0.1", "--timeout", "5", *args, env=env
    )


def checks(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, str]]:
    report = json.loads(result.stdout)
    assert set(report) == {"ok", "checks", "config"}
    for check in report["checks"]:
        assert set(check) == {"name", "status", "detail", "fix"}
        assert check["status"] in STATUSES
        assert all(isinstance(check[key], str) for key in check)
    for row in report["config"]:
        assert set(row) == {"variable", "value", "source"}
    assert report["ok"] == (result.returncode == 0)
    return {check["name"]: check for check in report["checks"]}


def assert_no_secret(result: subprocess.CompletedProcess[str]) -> None:
    for secret in SECRETS.values():
        assert secret not in result.stdout
        assert secret not in result.stderr


def make_spool(tmp_path: Path) -> None:
    created = esprelay(tmp_path, "db", "upgrade")
    assert created.returncode == 0, created.stderr


ROUTES = """
[providers.sg]
kind = "sendgrid"
api_url = "{url}"
api_key_env = "SG_KEY"

[providers.mg]
kind = "mailgun"
api_url = "{url}"
domain = "mg.example.com"
api_key_env = "MG_KEY"

[providers.pm]
kind = "postmark"
api_url = "{url}"
server_token_env = "PM_TOKEN"

[providers.rs]
kind = "resend"
api_url = "{url}"
api_key_env = "RS_KEY"

[providers.bv]
kind = "brevo"
api_url = "{url}"
api_key_env = "BV_KEY"

[providers.aws]
kind = "ses"
region = "eu-west-1"
endpoint_url = "{url}"

[providers.box]
kind = "outbox"

[default]
providers = ["sg", "mg", "pm", "rs", "bv", "aws", "box"]
"""


def test_every_kind_checked_against_fake_esps(tmp_path: Path, esp: FakeESP) -> None:
    make_spool(tmp_path)
    routes = tmp_path / "routes.toml"
    routes.write_text(ROUTES.format(url=esp.url))
    certs = Certs(tmp_path)
    env = {
        "ESPRELAY_ROUTES_FILE": str(routes),
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        **SECRETS,
        **certs.env(),
    }
    result = doctor(tmp_path, env, "--json")
    found = checks(result)
    assert result.returncode == 0, result.stdout
    for name in ("sg", "mg", "pm", "rs", "bv", "aws"):
        assert found[f"credentials {name}"]["status"] == "pass", found[f"credentials {name}"]
    assert found["credentials box"]["status"] == "info"
    assert "no check available" in found["credentials box"]["detail"]
    assert found["provider box"]["status"] == "warn"  # the outbox sends nothing
    port = esp.url.rsplit(":", 1)[1]
    assert found[f"tcp 127.0.0.1:{port}"]["status"] == "pass"
    assert found["spool"]["status"] == "pass"
    assert found["queue"]["detail"].startswith("0 message(s)")
    assert found["listener tls"]["status"] == "pass"
    # Harmless reads only: every request a GET, no mail sent.
    assert {r.method for r in esp.requests} == {"GET"}
    assert len(esp.requests) == 6
    assert_no_secret(result)

    text = doctor(tmp_path, env)
    assert text.returncode == 0, text.stdout
    assert "[PASS] credentials sg:" in text.stdout
    assert_no_secret(text)


def test_closed_port_is_a_failure_with_its_fix(tmp_path: Path) -> None:
    make_spool(tmp_path)
    port = closed_port()
    env = {
        "ESPRELAY_PROVIDER": "sendgrid",
        "ESPRELAY_SENDGRID_API_KEY": SECRETS["SG_KEY"],
        "ESPRELAY_SENDGRID_API_URL": f"http://127.0.0.1:{port}",
    }
    result = doctor(tmp_path, env, "--json")
    assert result.returncode == 1
    found = checks(result)
    tcp = found[f"tcp 127.0.0.1:{port}"]
    assert tcp["status"] == "fail"
    assert "Connection refused" in tcp["detail"]
    assert "allow outbound TCP" in tcp["fix"]
    assert found["credentials sendgrid"]["status"] == "fail"
    assert_no_secret(result)

    text = doctor(tmp_path, env)
    assert text.returncode == 1
    assert f"[FAIL] tcp 127.0.0.1:{port}: cannot connect" in text.stdout
    assert "       fix: allow outbound TCP" in text.stdout
    assert "       ESPRELAY_SENDGRID_API_KEY=********  # environment" in text.stdout
    assert "Traceback" not in text.stderr


def test_refused_key_fails_with_its_fix(tmp_path: Path, esp: FakeESP) -> None:
    make_spool(tmp_path)
    env = {
        "ESPRELAY_PROVIDER": "brevo",
        "ESPRELAY_BREVO_API_KEY": "xkeysib-wrong-secret-4799",
        "ESPRELAY_BREVO_API_URL": esp.url,
    }
    result = doctor(tmp_path, env, "--json")
    assert result.returncode == 1
    check = checks(result)["credentials brevo"]
    assert check["status"] == "fail"
    assert "HTTP 401" in check["detail"]
    assert "ESPRELAY_BREVO_API_KEY" in check["fix"]
    assert "xkeysib-wrong-secret-4799" not in result.stdout + result.stderr
    assert esp.requests[0].path == "/v3/account"


def test_outbound_smtp_refused_is_reported_not_failed(tmp_path: Path) -> None:
    make_spool(tmp_path)
    result = doctor(tmp_path, {"ESPRELAY_OUTBOX_DIR": str(tmp_path / "outbox")}, "--json")
    found = checks(result)
    for port in (25, 465, 587, 2525):
        assert found[f"smtp egress {port}"]["status"] in ("info", "pass")
    # Nothing unprivileged listens on 25 here: connection refused, reported as blocked.
    assert found["smtp egress 25"]["status"] == "info"
    assert "blocked or no network" in found["smtp egress 25"]["detail"]
    assert "Connection refused" in found["smtp egress 25"]["detail"]
    assert result.returncode == 0  # blocked SMTP is why esprelay exists, not a failure


def test_help_names_the_default_probe_host(tmp_path: Path) -> None:
    # The CLI does not import esprelay.doctor (sendmail starts through it): its help
    # repeats the default, which must stay the one doctor uses.
    shown = esprelay(tmp_path, "doctor", "--help")
    assert DEFAULT_SMTP_PROBE_HOST in " ".join(shown.stdout.split())


def test_missing_spool_is_reported_and_not_created(tmp_path: Path) -> None:
    result = doctor(tmp_path, {}, "--json")
    assert result.returncode == 1
    spool = checks(result)["spool"]
    assert spool["status"] == "fail"
    assert str(tmp_path / "data" / "spool.db") in spool["detail"]
    assert not (tmp_path / "data").exists()


def test_configuration_error_is_a_failure_line(tmp_path: Path) -> None:
    result = doctor(tmp_path, {"ESPRELAY_SMTP_PORT": "not-a-port"}, "--json")
    assert result.returncode == 78  # EX_CONFIG, as every command
    check = checks(result)["configuration"]
    assert check["status"] == "fail"
    assert "ESPRELAY_SMTP_PORT" in check["detail"]
    assert "Traceback" not in result.stderr

    text = doctor(tmp_path, {"ESPRELAY_PROVIDER": "nosuchkind"})
    assert text.returncode == 78
    assert "[FAIL] configuration:" in text.stdout
    assert "Traceback" not in text.stderr


def test_config_masks_secrets_and_names_sources(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        f"ESPRELAY_SENDGRID_API_KEY={SECRETS['SG_KEY']}\nESPRELAY_HOSTNAME=from-dotenv\n"
    )
    env = {
        "ESPRELAY_PROVIDER": "sendgrid",
        "ESPRELAY_ADMIN_TOKEN": "admin-token-secret-4720",
        "ESPRELAY_SPOOL_URL": "postgresql://esprelay:pg-secret-4721@db.example/esprelay",
    }
    result = esprelay(tmp_path, "config", "--json", env=env)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["ESPRELAY_SENDGRID_API_KEY"] == {"value": "********", "source": ".env"}
    assert config["ESPRELAY_ADMIN_TOKEN"] == {"value": "********", "source": "environment"}
    assert config["ESPRELAY_HOSTNAME"] == {"value": "from-dotenv", "source": ".env"}
    assert config["ESPRELAY_PROVIDER"]["source"] == "environment"
    assert config["ESPRELAY_SMTP_PORT"] == {"value": 2525, "source": "default"}
    assert config["ESPRELAY_SPOOL_URL"]["value"] == (
        "postgresql://esprelay:********@db.example/esprelay"
    )

    text = esprelay(tmp_path, "config", env=env)
    assert text.returncode == 0
    assert "ESPRELAY_SENDGRID_API_KEY=********  # .env" in text.stdout
    for output in (result, text):
        for secret in (SECRETS["SG_KEY"], "admin-token-secret-4720", "pg-secret-4721"):
            assert secret not in output.stdout + output.stderr


def test_send_test_only_when_asked(tmp_path: Path, relay_factory: type) -> None:
    relay = relay_factory().start()
    env = {k: v for k, v in relay.env.items() if k != "ESPRELAY_SMTP_PORT"}
    env["ESPRELAY_SMTP_PORT"] = str(relay.port)
    quiet = doctor(tmp_path, env, "--json")
    assert "send-test" not in checks(quiet)
    assert not relay.outbox.exists() or not any(relay.outbox.iterdir())

    sent = doctor(tmp_path, env, "--json", "--send-test", "ops@example.org")
    check = checks(sent)["send-test"]
    assert check["status"] == "pass", check
    assert "ops@example.org" in check["detail"]
    relay.wait_for_log(r"delivered id=\w+ provider=outbox")


# -- the listener's certificate, with a driven clock --------------------------------------------


def test_listener_certificate_expiry(tmp_path: Path) -> None:
    ca = trustme.CA()
    expires = datetime.datetime(2031, 1, 10, 12, 0, tzinfo=datetime.UTC)
    leaf = ca.issue_cert("localhost", not_after=expires)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    settings = Settings(_env_file=None, tls_cert_file=cert, tls_key_file=key)  # type: ignore[call-arg]
    day = 86400
    at = expires.timestamp()
    [fine] = listener_tls_checks(settings, now=at - 30 * day)
    assert fine.status == "pass"
    [soon] = listener_tls_checks(settings, now=at - 3 * day)
    assert soon.status == "warn"
    assert "renew" in soon.fix
    [gone] = listener_tls_checks(settings, now=at + day)
    assert gone.status == "fail"
    assert "expired" in gone.detail
