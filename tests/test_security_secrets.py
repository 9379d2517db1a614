"""No secret in any log line, reply, crash output or repr: a full DEBUG run, grepped."""

from __future__ import annotations

import base64
import os
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from esprelay.config import Settings
from esprelay.providers.registry import configure, get_kind
from esprelay.smtp.auth import UserDB, hash_password
from tests.relayproc import RelayProcess
from tests.securitykit import UNTRUSTED, Certs, Dialog, crlf, plain_auth

AUTH_PASSWORD = "Sec-AuthPass-7f3a9c"
FILE_PASSWORD = "Sec-FilePass-2b8e41"
WRONG_PASSWORD = "Sec-WrongPass-99d0e1"
API_KEYS = {
    "ESPRELAY_SENDGRID_API_KEY": "SG.sec-sendgrid-key-0a1b2c",
    "ESPRELAY_MAILGUN_API_KEY": "key-sec-mailgun-3d4e5f",
    "ESPRELAY_POSTMARK_SERVER_TOKEN": "sec-postmark-token-6a7b8c",
}


def secrets_env(workdir: Path, certs: Certs) -> tuple[dict[str, str], list[str]]:
    hashed = hash_password(FILE_PASSWORD)
    users = workdir / "users"
    users.write_text(f"filer:{hashed}:example.com\n")
    env = {
        **certs.env(),
        **API_KEYS,
        "ESPRELAY_TRUSTED_NETWORKS": "127.0.0.1/32",
        "ESPRELAY_LOG_LEVEL": "DEBUG",
        "ESPRELAY_AUTH_USER": "app",
        "ESPRELAY_AUTH_PASSWORD": AUTH_PASSWORD,
        "ESPRELAY_AUTH_FILE": str(users),
        "ESPRELAY_SMTPS_PORT": "0",
    }
    salt_and_key = hashed.rsplit("$", 2)[1:]
    secret_texts = [AUTH_PASSWORD, FILE_PASSWORD, WRONG_PASSWORD, hashed, *salt_and_key]
    secret_texts += list(API_KEYS.values())
    for password in (AUTH_PASSWORD, FILE_PASSWORD, WRONG_PASSWORD):
        secret_texts.append(base64.b64encode(password.encode()).decode())
        for user in ("app", "filer"):
            secret_texts.append(plain_auth(user, password).decode())
    return env, secret_texts


def assert_clean(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in text, f"secret {secret[:6]}... leaked"


@pytest.mark.parametrize("engine", ["native", "aiosmtpd"])
def test_full_debug_run_leaks_no_secret(
    relay_factory: type[RelayProcess], tmp_path: Path, engine: str
) -> None:
    certs = Certs(tmp_path)
    env, secrets = secrets_env(tmp_path, certs)
    relay = relay_factory({**env, "ESPRELAY_SMTP_ENGINE": engine}).start()
    replies = []

    # AUTH PLAIN with an initial response, then a wrong one, over STARTTLS.
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=15, source_address=(UNTRUSTED, 0)) as smtp:
        smtp.set_debuglevel(0)
        smtp.ehlo("a.test")
        smtp.starttls(context=certs.client_context())
        smtp.ehlo("a.test")
        replies.append(smtp.docmd("AUTH", "PLAIN " + plain_auth("app", WRONG_PASSWORD).decode()))
        smtp.login("app", AUTH_PASSWORD)
        smtp.sendmail("a@example.com", ["b@example.org"], crlf("Subject: s\n\nbody\n"))
    # AUTH LOGIN step by step, including a password sent without base64, in plaintext
    # from a trusted address (where AUTH is offered without TLS).
    dialog = Dialog(relay.port)
    replies.append((0, dialog.reply()))
    replies.append((0, dialog.command(b"ehlo b.test")))
    for answer in (FILE_PASSWORD.encode(), base64.b64encode(WRONG_PASSWORD.encode())):
        replies.append((0, dialog.command(b"auth login")))
        replies.append((0, dialog.command(base64.b64encode(b"filer"))))
        replies.append((0, dialog.command(answer)))
    replies.append((0, dialog.command(b"auth login " + base64.b64encode(b"filer"))))
    replies.append((0, dialog.command(base64.b64encode(FILE_PASSWORD.encode()))))
    # A password typed into the user name field.
    replies.append((0, dialog.command(b"auth login " + base64.b64encode(WRONG_PASSWORD.encode()))))
    replies.append((0, dialog.command(base64.b64encode(b"x"))))
    replies.append((0, dialog.command(b"AUTH PLAIN")))
    replies.append((0, dialog.command(plain_auth("app", AUTH_PASSWORD))))
    dialog.close()
    relay.wait_delivered(1)
    assert relay.stop() == 0

    log = relay.log
    assert "AUTH ok: user='app'" in log and "AUTH failed: user='filer'" in log
    assert ">> b'AUTH PLAIN ********'" in log  # DEBUG command logging was really on
    assert_clean(log, secrets)
    assert_clean(repr(replies), secrets)
    for path in relay.outbox.iterdir():
        assert_clean(path.read_text(errors="replace"), secrets)


def test_config_error_output_leaks_no_secret(tmp_path: Path) -> None:
    certs = Certs(tmp_path)
    env, secrets = secrets_env(tmp_path, certs)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ESPRELAY_")}
    environ.update(env)
    environ["ESPRELAY_MAX_ERRORS"] = AUTH_PASSWORD  # a bad value that is also a secret
    result = subprocess.run(
        [sys.executable, "-m", "esprelay", "serve"],
        env=environ,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 78  # EX_CONFIG
    assert "ESPRELAY_MAX_ERRORS" in result.stderr
    assert_clean(result.stdout + result.stderr, secrets)


def test_repr_hides_secrets(tmp_path: Path) -> None:
    hashed = hash_password(FILE_PASSWORD)
    users_file = tmp_path / "users"
    users_file.write_text(f"filer:{hashed}\n")
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        auth_user="app",
        auth_password=AUTH_PASSWORD,  # type: ignore[arg-type]
        auth_file=users_file,
    )
    provider = configure(get_kind("sendgrid"), {"api_key": API_KEYS["ESPRELAY_SENDGRID_API_KEY"]})
    users = UserDB.load(users_file, "app", AUTH_PASSWORD)
    user = users.authenticate(b"filer", FILE_PASSWORD.encode())
    assert user is not None
    texts = [repr(settings), str(settings), repr(users), repr(user), str(user)]
    texts += [repr(settings.model_dump()), repr(provider), str(provider.settings)]
    texts.append(repr(provider.settings.model_dump()))
    assert_clean("\n".join(texts), [AUTH_PASSWORD, FILE_PASSWORD, hashed, *API_KEYS.values()])
