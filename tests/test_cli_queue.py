"""`esprelay queue` against the spool of a running bridge."""

from __future__ import annotations

import json
import shutil
import smtplib
import subprocess

from tests.relayproc import RelayProcess


def cli(relay: RelayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return relay.cli(*args, check=False)


def send(relay: RelayProcess, subject: str) -> str:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("app@example.com")
        smtp.rcpt("ops@example.org")
        code, reply = smtp.data(f"Subject: {subject}\r\n\r\nbody\r\n".encode())
    assert code == 250
    return reply.decode().rsplit(" ", 1)[1]


def test_list_show_retry_delete(relay_factory: type[RelayProcess], tmp_path: object) -> None:
    # The outbox path is a file, so delivery fails (a configuration problem: retried
    # slowly) and the message waits in the queue where we can act on it.
    relay = relay_factory({"ESPRELAY_RETRY_CONFIG_ERROR": "1h"})
    relay.workdir.mkdir(exist_ok=True)
    relay.outbox.write_text("in the way")
    relay.start()
    first = send(relay, "first")
    second = send(relay, "second")
    relay.wait_for_log(r"deferred id=\w+ provider=outbox", count=2)
    assert "configuration problem" in relay.log

    listing = cli(relay, "queue", "list")
    assert listing.returncode == 0, listing.stderr
    assert first in listing.stdout and second in listing.stdout
    rows = [json.loads(line) for line in cli(relay, "queue", "list", "--json").stdout.splitlines()]
    assert {r["id"]: r["state"] for r in rows} == {first: "queued", second: "queued"}

    shown = cli(relay, "queue", "show", first, "--body")
    assert shown.returncode == 0
    assert "cannot write to outbox" in shown.stdout
    assert '"outcome": "deferred"' in shown.stdout
    assert "Subject: first" in shown.stdout

    assert cli(relay, "queue", "delete", second).returncode == 0
    assert cli(relay, "queue", "show", second).returncode == 1
    assert cli(relay, "queue", "delete", "nonexistent").returncode == 1

    relay.outbox.unlink()  # fix the problem, then retry by hand
    retried = cli(relay, "queue", "retry", first)
    assert retried.returncode == 0, retried.stderr
    assert relay.wait_delivered(1) == [first]
    rows = [json.loads(line) for line in cli(relay, "queue", "list", "--json").stdout.splitlines()]
    assert [(r["id"], r["state"]) for r in rows] == [(first, "delivered")]
    assert cli(relay, "queue", "retry", "nonexistent").returncode == 1
    shutil.rmtree(relay.outbox)
