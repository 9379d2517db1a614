"""SIGHUP reload without dropping sessions, and JSON log lines that trace one message."""

from __future__ import annotations

import json
import logging
import signal
import smtplib
import time
from pathlib import Path

from esprelay.logsetup import JsonFormatter
from tests.opshttp import TOKEN, http, send
from tests.relayproc import RelayProcess


def test_sighup_reloads_and_keeps_an_open_session(relay_factory: type[RelayProcess]) -> None:
    relay = relay_factory()
    env_file = relay.workdir / ".env"
    env_file.write_text("ESPRELAY_LOG_LEVEL=INFO\n")
    relay.start()
    assert relay.proc is not None
    with http(relay) as client:
        assert client.get("/api/messages").status_code == 404  # no admin token yet

    smtp = smtplib.SMTP("127.0.0.1", relay.port, timeout=30)
    try:
        smtp.ehlo("client.test")
        assert smtp.mail("app@example.com")[0] == 250

        env_file.write_text(
            f"ESPRELAY_LOG_LEVEL=DEBUG\nESPRELAY_ADMIN_TOKEN={TOKEN}\nESPRELAY_HOSTNAME=renamed\n"
        )
        relay.proc.send_signal(signal.SIGHUP)
        relay.wait_for_log(r"reload done")
        assert "applied: ESPRELAY_ADMIN_TOKEN, ESPRELAY_LOG_LEVEL" in relay.log
        assert "only applied after a restart: ESPRELAY_HOSTNAME" in relay.log
        assert TOKEN not in relay.log

        # The session opened before the reload carries on as if nothing happened.
        assert smtp.rcpt("ops@example.org")[0] == 250
        code, reply = smtp.data(b"Subject: across a reload\r\n\r\nstill here\r\n")
        assert code == 250, reply
    finally:
        smtp.quit()
    relay.wait_delivered(1)

    # The new token and log level are in force.
    with http(relay) as client:
        listed = client.get("/api/messages", headers={"Authorization": f"Bearer {TOKEN}"})
        assert listed.status_code == 200
        assert len(listed.json()["messages"]) == 1
    relay.wait_for_log(r"DEBUG esprelay\.http: http GET /api/messages -> 200")
    assert "still here" not in relay.log  # DEBUG shows SMTP commands, never the body

    # A broken file is refused and the running configuration stays.
    env_file.write_text("ESPRELAY_MAX_RECIPIENTS=lots\n")
    relay.proc.send_signal(signal.SIGHUP)
    relay.wait_for_log(
        r"reload refused, keeping the running configuration: ESPRELAY_MAX_RECIPIENTS"
    )
    send(relay)
    relay.wait_delivered(2)
    assert relay.stop() == 0


def test_json_logs_trace_one_message(relay_factory: type[RelayProcess]) -> None:
    relay = relay_factory({"ESPRELAY_LOG_FORMAT": "json"}).start()
    message_id = send(relay)
    relay.wait_delivered(1)
    relay.wait_for_log(rf'"message_id": "{message_id}"', count=2)
    entries = [
        json.loads(line)
        for line in relay.log.splitlines()
        if line and not line.startswith("--- start")
    ]
    assert all({"ts", "level", "logger", "msg"} <= entry.keys() for entry in entries)
    traced = [e for e in entries if e.get("message_id") == message_id]
    assert [e["event"] for e in traced] == ["accepted", "delivered"]
    accepted, done = traced
    assert accepted["client"] == "127.0.0.1"
    assert accepted["rcpts"] == 1
    assert accepted["provider"] == "outbox"
    assert done["provider_message_id"] == f"outbox-{message_id}"
    assert done["attempt"] == 1
    # The human text stays in msg, so text and JSON logs are read the same way.
    assert f"delivered id={message_id}" in done["msg"]


def test_json_formatter_handles_exceptions_and_odd_values() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "bad %s", ("thing",), None)
        import sys

        record.exc_info = sys.exc_info()
    record.odd = object()
    entry = json.loads(JsonFormatter().format(record))
    assert entry["msg"] == "bad thing"
    assert "ValueError: boom" in entry["exc"]
    assert entry["odd"].startswith("<object object")


def test_sighup_reloads_routes_in_place(relay_factory: type[RelayProcess], tmp_path: Path) -> None:
    a, b = tmp_path / "outbox-a", tmp_path / "outbox-b"
    providers = (
        f'[providers.a]\nkind = "outbox"\ndir = "{a}"\n\n'
        f'[providers.b]\nkind = "outbox"\ndir = "{b}"\n\n'
    )
    routes = tmp_path / "routes.toml"
    routes.write_text(providers + '[default]\nproviders = ["a"]\n')
    relay = relay_factory({"ESPRELAY_ROUTES_FILE": str(routes)}).start()
    assert relay.proc is not None

    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        assert smtp.mail("app@example.com")[0] == 250
        routes.write_text(
            providers
            + '[[routes]]\nrecipient_domains = ["partner.example"]\nproviders = ["b"]\n\n'
            + '[default]\nproviders = ["a"]\n'
        )
        relay.proc.send_signal(signal.SIGHUP)
        relay.wait_for_log(r"routes reloaded: 1 route\(s\), default -> a")
        # The session opened before the reload is routed by the new table.
        assert smtp.rcpt("someone@partner.example")[0] == 250
        assert smtp.data(b"Subject: to the partner\r\n\r\nx\r\n")[0] == 250
    send(relay, rcpt="ops@example.org")
    wait_for_files(b, 1)
    wait_for_files(a, 1)

    # Adding a provider needs a restart: the running routes stay.
    routes.write_text(
        providers + f'[providers.c]\nkind = "outbox"\ndir = "{tmp_path / "c"}"\n'
        '[default]\nproviders = ["c"]\n'
    )
    relay.proc.send_signal(signal.SIGHUP)
    relay.wait_for_log(r"providers were added, removed or changed.*restart to apply")
    relay.wait_for_log(r"reload done \(1 callback\(s\) failed\)")
    send(relay, rcpt="other@partner.example")
    wait_for_files(b, 2)
    assert not (tmp_path / "c").exists()


def wait_for_files(directory: Path, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if directory.exists() and len(list(directory.glob("*.json"))) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} message(s) in {directory}")
