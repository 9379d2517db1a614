"""Deployments that work the first time, through the real CLI and a running esprelay:
exit 78 for every configuration error, queue commands that never create a spool, an
open relay refused and the 530 trap named at start-up, and Postfix's habits (queue
hold/release/flush, mailq, sendmail -bp and grouped flags)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import smtplib
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from esprelay.app import Relay
from esprelay.config import Settings
from esprelay.listeners import exposure_warnings
from esprelay.sendmail import parse_args
from tests.pgutil import temporary_database
from tests.relayproc import RelayProcess

ROOT = Path(__file__).resolve().parent.parent
EX_CONFIG = 78


def esprelay(
    *args: str, cwd: Path, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ESPRELAY_")}
    return subprocess.run(
        [sys.executable, "-m", "esprelay", *args],
        capture_output=True, text=True, timeout=60, cwd=cwd, env={**base, **(env or {})},
        input=stdin,
    )  # fmt: skip


def relay_cli(relay: RelayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """A command run as an operator would beside the running relay: same settings."""
    return esprelay(*args, cwd=relay.workdir, env=relay.env)


def send(relay: RelayProcess, subject: str, rcpts: tuple[str, ...] = ("ops@example.org",)) -> str:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        assert smtp.mail("app@example.com")[0] == 250
        for rcpt in rcpts:
            assert smtp.rcpt(rcpt)[0] == 250
        code, reply = smtp.data(f"Subject: {subject}\r\n\r\nbody\r\n".encode())
    assert code == 250
    return reply.decode().rsplit(" ", 1)[1]


# -- exit 78 (EX_CONFIG) for every configuration error ---------------------------------------

COMMANDS = [
    ["serve"],
    ["queue", "list"],
    ["queue", "hold", "ALL"],
    ["queue", "flush"],
    ["mailq"],
    ["db", "upgrade"],
    ["send-test", "--to", "ops@example.org"],
    ["config"],
    ["doctor", "--timeout", "0.5", "--smtp-probe-host", "127.0.0.1"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_an_invalid_setting_exits_78_naming_it(tmp_path: Path, command: list[str]) -> None:
    result = esprelay(*command, cwd=tmp_path, env={"ESPRELAY_MAX_RECIPIENTS": "lots"})
    assert result.returncode == EX_CONFIG, result.stdout + result.stderr
    assert "ESPRELAY_MAX_RECIPIENTS" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # no spool, no outbox made on the way


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"ESPRELAY_PROVIDER": "nosuchesp"}, "ESPRELAY_PROVIDER"),
        ({"ESPRELAY_ROUTES_FILE": "/nonexistent/routes.json"}, "ESPRELAY_ROUTES_FILE"),
        ({"ESPRELAY_ENV_FILE": "/nonexistent/esprelay.env"}, "ESPRELAY_ENV_FILE"),
        ({"ESPRELAY_TRUSTED_NETWORKS": "0.0.0.0/0"}, "ESPRELAY_TRUSTED_NETWORKS"),
    ],
    ids=["unknown-provider", "bad-routes", "missing-env-file", "open-relay"],
)
@pytest.mark.parametrize("command", [["serve"], ["queue", "list"], ["config"]], ids=" ".join)
def test_every_kind_of_configuration_error_exits_78(
    tmp_path: Path, env: dict[str, str], named: str, command: list[str]
) -> None:
    if command[0] == "queue" and named == "ESPRELAY_ROUTES_FILE":
        # The queue commands read the spool, never the routes: an operator can still look
        # at the queue while broken routes keep the service down.  The spool is missing.
        named = "ESPRELAY_SPOOL_URL"
    result = esprelay(*command, cwd=tmp_path, env=env)
    assert result.returncode == EX_CONFIG, result.stderr
    assert named in result.stderr and "Traceback" not in result.stderr


def test_a_bad_env_file_exits_78(tmp_path: Path) -> None:
    env_file = tmp_path / "esprelay.env"
    env_file.write_text("ESPRELAY_SMTP_PORT=99999\n")
    result = esprelay("--env-file", str(env_file), "queue", "list", cwd=tmp_path)
    assert result.returncode == EX_CONFIG and "ESPRELAY_SMTP_PORT" in result.stderr
    result = esprelay("--env-file", str(tmp_path / "typo.env"), "serve", cwd=tmp_path)
    assert result.returncode == EX_CONFIG and "typo.env" in result.stderr


def test_sendmail_exits_78_on_a_bad_env_file_or_setting(tmp_path: Path) -> None:
    message = "To: ops@example.org\n\nhi\n"
    result = esprelay("--env-file", str(tmp_path / "nope.env"), "sendmail", "-t", cwd=tmp_path)
    assert result.returncode == EX_CONFIG and "nope.env" in result.stderr
    env = {"ESPRELAY_SMTP_PORT": "not-a-port"}
    result = esprelay("sendmail", "-t", cwd=tmp_path, env=env, stdin=message)
    assert result.returncode == EX_CONFIG and "ESPRELAY_SMTP_PORT" in result.stderr


def test_the_systemd_unit_does_not_restart_on_78_and_waits_for_the_drain() -> None:
    unit = (ROOT / "contrib" / "systemd" / "esprelay.service").read_text()
    assert re.search(r"^RestartPreventExitStatus=78$", unit, re.MULTILINE)
    [timeout] = re.findall(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE)
    # The drain: transactions, deliveries, then failure notices, each up to the grace.
    grace = Settings.model_fields["shutdown_grace"].default
    assert int(timeout) >= 3 * grace + 10


# -- queue commands never create a spool ----------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [["queue", "list"], ["queue", "hold", "ALL"], ["queue", "flush"], ["mailq"]],
    ids=" ".join,
)
def test_queue_commands_refuse_a_spool_that_does_not_exist(
    tmp_path: Path, command: list[str]
) -> None:
    result = esprelay(*command, cwd=tmp_path)  # the default spool, relative to here
    assert result.returncode == EX_CONFIG, result.stdout
    assert str(tmp_path / "esprelay-data" / "spool.db") in result.stderr
    assert "--env-file" in result.stderr
    assert list(tmp_path.iterdir()) == []
    elsewhere = tmp_path / "srv" / "spool.db"
    result = esprelay(*command, cwd=tmp_path, env={"ESPRELAY_SPOOL_URL": f"sqlite:///{elsewhere}"})
    assert result.returncode == EX_CONFIG
    assert str(elsewhere) in result.stderr and "from the environment" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_queue_commands_refuse_a_postgresql_database_without_the_schema(tmp_path: Path) -> None:
    with temporary_database() as url:
        env = {"ESPRELAY_SPOOL_URL": url}
        result = esprelay("queue", "list", cwd=tmp_path, env=env)
        assert result.returncode == EX_CONFIG, result.stdout + result.stderr
        assert "no esprelay spool" in result.stderr and "db upgrade" in result.stderr

        async def tables() -> list[str]:
            conn = await asyncpg.connect(url, timeout=5)
            try:
                rows = await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE tablename LIKE 'esprelay%'"
                )
            finally:
                await conn.close()
            return [row[0] for row in rows]

        assert asyncio.run(tables()) == []  # not migrated by a queue command
        assert esprelay("db", "upgrade", cwd=tmp_path, env=env).returncode == 0
        result = esprelay("mailq", cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "Mail queue is empty\n"


# -- open relay, and what clients beyond loopback will see ----------------------------------


@pytest.mark.parametrize("everyone", ["0.0.0.0/0", "::/0", "10.0.0.0/8 0.0.0.0/0"])
def test_an_open_relay_is_refused_at_start(
    relay_factory: type[RelayProcess], everyone: str
) -> None:
    relay = relay_factory({"ESPRELAY_TRUSTED_NETWORKS": everyone})
    with pytest.raises(RuntimeError, match="did not start"):
        relay.start()
    assert relay.proc is not None and relay.proc.wait(15) == EX_CONFIG
    assert "open relay" in relay.log and "ESPRELAY_ALLOW_OPEN_RELAY=true" in relay.log


def test_an_open_relay_starts_when_asked_for_by_name(relay_factory: type[RelayProcess]) -> None:
    relay = relay_factory(
        {"ESPRELAY_TRUSTED_NETWORKS": "0.0.0.0/0", "ESPRELAY_ALLOW_OPEN_RELAY": "true"}
    ).start()
    send(relay, "trusted")
    relay.wait_delivered(1)


async def test_listening_beyond_loopback_warns_of_530_and_the_outbox(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real relay, on loopback (tests stay there), told its address is not loopback:
    the warnings come from what the listener is bound to."""
    monkeypatch.setattr("esprelay.listeners._is_loopback", lambda address: False)
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        smtp_host="127.0.0.1",
        smtp_port=0,
        http_enabled=False,
        spool_url=f"sqlite:///{tmp_path / 'spool.db'}",
    )
    relay = Relay(settings)
    with caplog.at_level(logging.WARNING, logger="esprelay"):
        await relay.start()
        try:
            port = relay.smtp_port
            assert port is not None

            def mail_from() -> int:
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                    smtp.ehlo("client.test")
                    return smtp.mail("app@example.com")[0]

            assert await asyncio.to_thread(mail_from) == 250  # loopback itself is trusted
        finally:
            await relay.shutdown()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    [trap] = [w for w in warnings if "530 5.7.0 Authentication required" in w]
    assert "ESPRELAY_TRUSTED_NETWORKS" in trap and "ESPRELAY_AUTH_FILE" in trap
    [outbox] = [w for w in warnings if "outbox provider" in w]
    assert "NOT delivered" in outbox


def test_no_warning_on_loopback_or_with_auth_or_a_named_subnet() -> None:
    base = {"_env_file": None}
    plain = Settings(**base)  # type: ignore[arg-type]
    assert exposure_warnings(plain, ["127.0.0.1"], auth_users=0, provider_kinds=["outbox"]) == []
    assert exposure_warnings(plain, ["::1"], auth_users=0, provider_kinds=["sendgrid"]) == []
    [trap] = exposure_warnings(plain, ["0.0.0.0"], auth_users=0, provider_kinds=["sendgrid"])
    assert "0.0.0.0" in trap and "530" in trap
    assert exposure_warnings(plain, ["0.0.0.0"], auth_users=1, provider_kinds=["sendgrid"]) == []
    subnet = Settings(**base, trusted_networks="127.0.0.0/8 10.0.5.0/24")  # type: ignore[arg-type]
    assert exposure_warnings(subnet, ["::"], auth_users=0, provider_kinds=["sendgrid"]) == []
    [outbox] = exposure_warnings(subnet, ["::"], auth_users=0, provider_kinds=["outbox"])
    assert "outbox" in outbox


# -- Postfix habits: hold, release, flush, mailq, sendmail -bp ------------------------------


def test_hold_release_flush_and_mailq_on_a_running_relay(
    relay_factory: type[RelayProcess],
) -> None:
    # The outbox path is a file: every delivery is deferred (retried an hour later) until
    # it is removed, so the messages wait in the queue where the commands act on them.
    relay = relay_factory({"ESPRELAY_RETRY_CONFIG_ERROR": "1h"})
    relay.workdir.mkdir(exist_ok=True)
    relay.outbox.write_text("in the way")
    relay.start()
    held = send(relay, "held", ("a@example.org", "b@example.org"))
    flushed = send(relay, "flushed")
    relay.wait_for_log(r"deferred id=\w+ provider=outbox", count=2)

    hold = relay_cli(relay, "queue", "hold", held, "00000000000ffffffffff")
    assert hold.returncode == 1  # the unknown id is named
    assert hold.stdout == "1 message(s) held\n" and "00000000000ffffffffff" in hold.stderr

    mailq = relay_cli(relay, "mailq")
    assert mailq.returncode == 0, mailq.stderr
    lines = mailq.stdout.splitlines()
    assert lines[0].startswith("-Queue ID-") and "-Sender/Recipient-" in lines[0]
    [held_line] = [i for i, line in enumerate(lines) if line.startswith(held)]
    assert re.match(rf"{held}! +\d+ \w{{3}} \w{{3}} [ \d]\d \d\d:\d\d:\d\d  app@example.com$",
                    lines[held_line])  # fmt: skip
    assert lines[held_line + 1].startswith("(") and "outbox" in lines[held_line + 1]
    assert lines[held_line + 2].strip() == "a@example.org"
    assert lines[held_line + 3].strip() == "b@example.org"
    assert lines[held_line + 2].index("a@") == lines[held_line].index("app@")
    assert any(re.match(rf"{flushed}  +\d+ ", line) for line in lines)
    assert lines[-1] == "-- 1 Kbytes in 2 Requests."
    assert relay_cli(relay, "queue", "list", "--format", "mailq").stdout == mailq.stdout
    # sendmail -bp is mailq too (Postfix's habit), through the same configuration.
    bp = relay_cli(relay, "sendmail", "-bp")
    assert bp.returncode == 0 and bp.stdout == mailq.stdout
    listed = relay_cli(relay, "queue", "list", "--json")
    assert {(m["id"], m["held"]) for m in map(_json, listed.stdout.splitlines())} == {
        (held, True),
        (flushed, False),
    }

    # Due now by hand, and flushed: only the message that is not held goes out.
    relay.outbox.unlink()
    assert relay_cli(relay, "queue", "retry", held).returncode == 0
    flush = relay_cli(relay, "queue", "flush")
    assert flush.returncode == 0 and flush.stdout == "1 message(s) due now\n"
    relay.wait_delivered(1)
    shown = _json(relay_cli(relay, "queue", "show", held).stdout)
    assert shown["state"] == "queued" and shown["attempts"] == 1  # never leased again

    release = relay_cli(relay, "queue", "release", "ALL")
    assert release.returncode == 0 and release.stdout == "1 message(s) released, due now\n"
    assert set(relay.wait_delivered(2)) == {held, flushed}
    assert relay_cli(relay, "mailq").stdout == "Mail queue is empty\n"
    assert relay_cli(relay, "queue", "release", held).returncode == 1  # no longer held


def _json(text: str) -> dict[str, object]:
    import json

    value = json.loads(text)
    assert isinstance(value, dict)
    return value


@pytest.mark.parametrize(
    ("argv", "sender", "rcpts", "extract", "dots"),
    [
        (["-ti"], None, [], True, True),
        (["-it"], None, [], True, True),
        (["-tif", "a@b.c"], "a@b.c", [], True, True),
        (["-tfa@b.c", "x@y.z"], "a@b.c", ["x@y.z"], True, False),
        (["-toi", "x@y.z"], None, ["x@y.z"], True, True),
        (["-oi", "-t"], None, [], True, True),
        (["-Uti", "-em"], None, [], True, True),
        (["-vtF", "Nightly", "x@y.z"], None, ["x@y.z"], True, False),
    ],
)
def test_grouped_flags_as_postfix_sendmail_takes_them(
    argv: list[str], sender: str | None, rcpts: list[str], extract: bool, dots: bool
) -> None:
    opts = parse_args(argv)
    assert (opts.sender, opts.recipients, opts.extract, opts.ignore_dots) == (
        sender,
        rcpts,
        extract,
        dots,
    )


def test_sendmail_ti_submits_through_a_running_relay(relay: RelayProcess, tmp_path: Path) -> None:
    env = {"ESPRELAY_SMTP_HOST": "127.0.0.1", "ESPRELAY_SMTP_PORT": str(relay.port)}
    for flags in (["-ti"], ["-it"], ["-tif", "cron@example.com"]):
        result = esprelay(
            "sendmail", *flags, cwd=tmp_path, env=env,
            stdin="To: ops@example.org\nSubject: cron\n\n.\nline after a dot\n",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    ids = relay.wait_delivered(3)
    for message_id in ids:
        assert b"line after a dot" in (relay.outbox / f"{message_id}.eml").read_bytes()


def test_installed_as_mailq(tmp_path: Path) -> None:
    """A symlink named mailq to the esprelay script is Postfix's mailq."""
    script = Path(sys.executable).parent / "esprelay"
    if not script.exists():
        pytest.skip("the esprelay console script is not installed next to this Python")
    env_file = tmp_path / "esprelay.env"
    env_file.write_text(f"ESPRELAY_SPOOL_URL=sqlite:///{tmp_path / 'spool.db'}\n")
    assert esprelay("--env-file", str(env_file), "db", "upgrade", cwd=tmp_path).returncode == 0
    link = tmp_path / "mailq"
    link.symlink_to(script)
    base = {k: v for k, v in os.environ.items() if not k.startswith("ESPRELAY_")}
    result = subprocess.run(
        [str(link)], capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={**base, "ESPRELAY_ENV_FILE": str(env_file)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Mail queue is empty\n"
