"""SMTP AUTH: PLAIN and LOGIN over TLS, users file, rate limits, per-user sender rules."""

from __future__ import annotations

import base64
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from esprelay.smtp.auth import hash_password, verify_password
from tests.conftest import require_tool
from tests.relayproc import RelayProcess
from tests.securitykit import (
    ONLY_LOCALHOST,
    UNTRUSTED,
    Certs,
    Dialog,
    crlf,
    plain_auth,
    smtp_client,
    spool_show,
    spooled,
)

PRINTER_PASSWORD = "Pr1nter-sesame"
APP_PASSWORD = "app-Secret-42"


def queued_id(reply: bytes) -> str:
    text = reply.decode()
    assert "queued as " in text, text
    return text.rsplit("queued as ", 1)[1].strip()


def auth_env(workdir: Path, certs: Certs, **extra: str) -> dict[str, str]:
    users = workdir / "users"
    users.write_text(
        "# user:hash:allowed senders\n"
        f"printer:{hash_password(PRINTER_PASSWORD)}:scanner@example.com, example.net\n"
        f"nobody:{hash_password('unused')}\n"
    )
    return {
        **ONLY_LOCALHOST,
        **certs.env(),
        "ESPRELAY_AUTH_FILE": str(users),
        "ESPRELAY_AUTH_USER": "app",
        "ESPRELAY_AUTH_PASSWORD": APP_PASSWORD,
        **extra,
    }


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def authrelay(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[RelayProcess]:
    workdir = tmp_path_factory.mktemp("auth")
    relay = RelayProcess(workdir, auth_env(workdir, certs)).start()
    yield relay
    relay.kill()


def tls_client(relay: RelayProcess, certs: Certs) -> smtplib.SMTP:
    smtp = smtp_client(relay, source=UNTRUSTED)
    smtp.ehlo("device.test")
    smtp.starttls(context=certs.client_context())
    smtp.ehlo("device.test")
    return smtp


def test_auth_not_offered_in_plaintext_to_untrusted(authrelay: RelayProcess) -> None:
    with smtp_client(authrelay, source=UNTRUSTED) as smtp:
        smtp.ehlo("device.test")
        assert smtp.has_extn("starttls")
        assert not smtp.has_extn("auth")
        code, reply = smtp.docmd("AUTH", "PLAIN " + plain_auth("app", APP_PASSWORD).decode())
        assert code == 538, reply
        code, reply = smtp.docmd("MAIL FROM:<a@example.com>")
        assert code == 530 and b"STARTTLS" in reply
    assert spooled(authrelay) == []


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_over_starttls(authrelay: RelayProcess, certs: Certs, mechanism: str) -> None:
    with tls_client(authrelay, certs) as smtp:
        assert smtp.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
        smtp.user, smtp.password = "app", APP_PASSWORD
        auth = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
        code, _ = smtp.auth(mechanism, auth)
        assert code == 235
        raw = crlf(f"From: x@anywhere.example\nTo: b@example.org\nSubject: {mechanism}\n\nhi\n")
        assert smtp.mail("x@anywhere.example")[0] == 250
        assert smtp.rcpt("b@example.org")[0] == 250
        code, reply = smtp.data(raw)
        assert code == 250, reply
    meta = spool_show(authrelay, queued_id(reply))["meta"]
    assert isinstance(meta, dict)
    assert meta["auth_user"] == "app"
    assert meta["tls"] is True
    assert meta["client"] == UNTRUSTED


def test_lowercase_auth_login_from_trusted_network_in_plaintext(authrelay: RelayProcess) -> None:
    """Some devices send `auth login`; a trusted network may authenticate without TLS."""
    dialog = Dialog(authrelay.port)
    assert dialog.reply().startswith(b"220")
    assert b"250-AUTH LOGIN PLAIN" in dialog.command(b"ehlo printer")
    assert dialog.command(b"auth login") == b"334 VXNlciBOYW1lAA==\r\n"
    assert dialog.command(base64.b64encode(b"printer")).startswith(b"334 ")
    assert dialog.command(base64.b64encode(PRINTER_PASSWORD.encode())).startswith(b"235")
    assert dialog.command(b"mail from:<scanner@example.com>").startswith(b"250")
    assert dialog.command(b"rcpt to:<office@example.org>").startswith(b"250")
    assert dialog.command(b"data").startswith(b"354")
    reply = dialog.command(crlf("From: scanner@example.com\nSubject: scan\n\nscan\n.").rstrip())
    assert reply.startswith(b"250 2.0.0"), reply
    dialog.close()
    assert spool_show(authrelay, queued_id(reply))["meta"]["auth_user"] == "printer"  # type: ignore[index]


def test_auth_plain_lowercase_with_initial_response(authrelay: RelayProcess) -> None:
    dialog = Dialog(authrelay.port)
    dialog.reply()
    dialog.command(b"EHLO printer")
    assert dialog.command(b"auth plain " + plain_auth("app", APP_PASSWORD)).startswith(b"235")
    dialog.close()


def test_plaintext_auth_network_allowlist(
    relay_factory: type[RelayProcess], tmp_path: Path, certs: Certs
) -> None:
    env = auth_env(tmp_path, certs, ESPRELAY_PLAINTEXT_AUTH_NETWORKS="127.0.0.2/32")
    relay = relay_factory(env).start()
    with smtp_client(relay, source=UNTRUSTED) as smtp:
        smtp.ehlo("device.test")
        assert smtp.has_extn("auth")
        # Allowed to authenticate in plaintext, but not trusted: without AUTH, 530.
        assert smtp.docmd("MAIL FROM:<a@example.com>")[0] == 530
        smtp.login("app", APP_PASSWORD)
        smtp.sendmail("a@example.com", ["b@example.org"], crlf("Subject: t\n\nx\n"))
    relay.wait_delivered(1)


def test_wrong_password_rate_limited(
    relay_factory: type[RelayProcess], tmp_path: Path, certs: Certs
) -> None:
    env = auth_env(tmp_path, certs, ESPRELAY_AUTH_MAX_FAILURES="3")
    relay = relay_factory(env).start()
    for attempt in range(3):
        with tls_client(relay, certs) as smtp:
            smtp.user, smtp.password = "app", f"wrong-{attempt}"
            with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
                smtp.auth("PLAIN", smtp.auth_plain)
            assert failed.value.smtp_code == 535
    # Blocked now, even with the right password and on a new connection...
    with tls_client(relay, certs) as smtp:
        code, reply = smtp.docmd("AUTH", "PLAIN " + plain_auth("app", APP_PASSWORD).decode())
        assert code == 454, reply
        assert smtp.docmd("MAIL FROM:<a@example.com>")[0] == 530
    # ...but only for that client address.
    with smtp_client(relay) as smtp:
        smtp.ehlo("other.test")
        smtp.starttls(context=certs.client_context())
        smtp.ehlo("other.test")
        assert smtp.login("app", APP_PASSWORD)[0] == 235
    assert relay.log.count("AUTH failed: user='app' client=127.0.0.2") == 3
    assert "too many failures from client=127.0.0.2" in relay.log
    assert spooled(relay) == []


def test_unknown_user_and_garbage_refused(authrelay: RelayProcess, certs: Certs) -> None:
    with tls_client(authrelay, certs) as smtp:
        assert smtp.docmd("AUTH", "PLAIN " + plain_auth("ghost", "x").decode())[0] == 535
        assert smtp.docmd("AUTH", "PLAIN !!notbase64!!")[0] == 501
        assert smtp.docmd("AUTH", "CRAM-MD5")[0] == 504
        assert smtp.docmd("AUTH", "PLAIN " + base64.b64encode(b"no-nuls").decode())[0] == 501


def test_per_user_allowed_senders(authrelay: RelayProcess, certs: Certs) -> None:
    with tls_client(authrelay, certs) as smtp:
        smtp.login("printer", PRINTER_PASSWORD)
        code, reply = smtp.docmd("MAIL FROM:<ceo@example.com>")
        assert code == 553 and b"not allowed for this user" in reply
        assert smtp.docmd("MAIL FROM:<scanner@example.com>")[0] == 250
        assert smtp.docmd("RCPT TO:<b@example.org>")[0] == 250
        # The envelope is allowed, the From header is not: refused at DATA.
        code, reply = smtp.data(crlf("From: CEO <ceo@example.com>\nSubject: pay\n\nnow\n"))
        assert code == 550, reply
        # A domain rule: anyone at example.net.
        smtp.sendmail("x@example.net", ["b@example.org"], crlf("From: Y <y@example.net>\n\nok\n"))
    authrelay.wait_delivered(1)
    assert [m["mail_from"] for m in spooled(authrelay)].count("x@example.net") == 1


def test_swaks_auth_over_starttls(authrelay: RelayProcess, certs: Certs) -> None:
    swaks = require_tool("swaks")
    ca_file = certs.directory / "ca.pem"
    certs.ca.cert_pem.write_to_path(str(ca_file))
    result = subprocess.run(
        [
            swaks,
            "--server",
            f"127.0.0.1:{authrelay.port}",
            "--local-interface",
            UNTRUSTED,
            "--tls",
            "--tls-verify",
            "--tls-ca-path",
            str(ca_file),
            "--auth",
            "LOGIN",
            "--auth-user",
            "printer",
            "--auth-password",
            PRINTER_PASSWORD,
            "--from",
            "scanner@example.com",
            "--to",
            "office@example.org",
            "--header",
            "Subject: swaks auth",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0" in result.stdout and "queued as" in result.stdout


def test_hash_password_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "esprelay", "hash-password", "--user", "printer"],
        input="correct horse\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=tmp_path,
    )
    user, hashed = result.stdout.strip().split(":", 1)
    assert user == "printer" and hashed.startswith("$scrypt$")
    assert verify_password(b"correct horse", hashed)
    assert not verify_password(b"correct horse ", hashed)
    assert "correct horse" not in result.stdout + result.stderr


def test_bad_users_file_names_the_line_not_the_hash(
    relay_factory: type[RelayProcess], tmp_path: Path
) -> None:
    users = tmp_path / "users"
    users.write_text(f"ok:{hash_password('x')}\nbroken:$scrypt$garbage-hash-value\n")
    relay = relay_factory({"ESPRELAY_AUTH_FILE": str(users)})
    with pytest.raises(RuntimeError, match="did not start"):
        relay.start()
    assert relay.proc is not None
    assert relay.proc.wait(15) == 78  # EX_CONFIG
    assert "ESPRELAY_AUTH_FILE line 2" in relay.log
    assert "garbage-hash-value" not in relay.log
