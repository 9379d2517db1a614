"""Once esprelay said 250, the message survives SIGKILL and is delivered once."""

from __future__ import annotations

import json
import signal
import smtplib
import socket
import time

from tests.relayproc import RelayProcess

N = 40


def send_many(relay: RelayProcess, count: int) -> list[str]:
    ids = []
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        for i in range(count):
            smtp.mail("app@example.com")
            smtp.rcpt(f"user{i}@example.org")
            code, reply = smtp.data(f"Subject: message {i}\r\n\r\nbody {i}\r\n".encode())
            assert code == 250, reply
            ids.append(reply.decode().rsplit(" ", 1)[1])
    return ids


def spool_rows(relay: RelayProcess) -> list[dict[str, object]]:
    out = relay.cli("queue", "list", "--json", "--limit", "10000").stdout
    return [json.loads(line) for line in out.splitlines()]


def test_sigkill_after_250_with_delivery_paused(relay_factory: type[RelayProcess]) -> None:
    first = relay_factory({"ESPRELAY_DELIVERY_CONCURRENCY": "0"}).start()
    ids = send_many(first, N)
    first.stop(signal.SIGKILL)
    assert first.delivered_ids() == []

    second = relay_factory().start()
    delivered = second.wait_delivered(N)
    assert sorted(delivered) == sorted(ids)
    for message_id in ids:
        record = json.loads((second.outbox / f"{message_id}.json").read_text())
        index = int(record["rcpt_tos"][0].removeprefix("user").split("@")[0])
        assert (second.outbox / f"{message_id}.eml").read_bytes() == (
            f"Subject: message {index}\r\n\r\nbody {index}\r\n".encode()
        )
    rows = spool_rows(second)
    assert {r["id"] for r in rows} == set(ids)
    assert all(r["state"] == "delivered" and r["attempts"] == 1 for r in rows), rows


def test_sigkill_while_delivering(relay_factory: type[RelayProcess]) -> None:
    first = relay_factory().start()
    ids = send_many(first, N)
    first.stop(signal.SIGKILL)  # some delivered, some in flight, some queued

    second = relay_factory().start()
    delivered = second.wait_delivered(N)
    assert sorted(delivered) == sorted(ids)  # every one, once (files are keyed by id)
    time.sleep(0.5)
    rows = spool_rows(second)
    assert {r["id"] for r in rows} == set(ids)
    assert all(r["state"] == "delivered" for r in rows), rows


def test_sigterm_finishes_message_under_way(relay_factory: type[RelayProcess]) -> None:
    relay = relay_factory({"ESPRELAY_DELIVERY_CONCURRENCY": "0"}).start()
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    stream = sock.makefile("rb")
    assert stream.readline().startswith(b"220")
    for line in (b"EHLO client.test", b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.org>"):
        sock.sendall(line + b"\r\n")
        while stream.readline()[3:4] == b"-":
            pass
    sock.sendall(b"DATA\r\n")
    assert stream.readline().startswith(b"354")
    sock.sendall(b"Subject: under way\r\n\r\nfirst half\r\n")

    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGTERM)
    relay.wait_for_log("shutting down")

    # A new session is told to come back later.
    with (
        socket.create_connection(("127.0.0.1", relay.port), timeout=10) as late,
        late.makefile("rb") as late_stream,
    ):
        assert late_stream.readline().startswith(b"421")

    sock.sendall(b"second half\r\n.\r\n")
    reply = stream.readline()
    assert reply.startswith(b"250 2.0.0"), reply
    stream.close()
    sock.close()
    assert relay.proc.wait(20) == 0

    restarted = relay_factory().start()
    [message_id] = restarted.wait_delivered(1)
    assert reply.decode().strip().endswith(message_id)
    assert (restarted.outbox / f"{message_id}.eml").read_bytes() == (
        b"Subject: under way\r\n\r\nfirst half\r\nsecond half\r\n"
    )


def test_second_serve_on_the_same_sqlite_spool_is_refused(
    relay_factory: type[RelayProcess], relay: RelayProcess
) -> None:
    other = relay_factory({"ESPRELAY_SMTP_PORT": "0"})
    try:
        other.start(timeout=10)
    except RuntimeError as exc:
        assert "in use by another esprelay process" in str(exc)
    else:
        raise AssertionError("a second serve on one SQLite spool must not start")
