"""Large messages written to a file while they arrive (``esprelay.spill``), end to end.

A real relay with ``ESPRELAY_SMTP_SPILL_SIZE=256K``, real SMTP clients, and the far end
(the outbox, or a loopback ESP) receiving exactly what the relay would have sent for the
same message held in memory: kept as its file, read back for a repair, through the
PostgreSQL spool and passthrough mode; what a killed relay leaves behind.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from esprelay.message.repair import normalize_line_endings
from esprelay.testing.fakeesp import FakeESP, Reply
from tests.pgutil import temporary_database
from tests.relayproc import RelayProcess
from tests.test_e2e_durability import spool_rows

SPILL = {"ESPRELAY_SMTP_SPILL_SIZE": "256K"}
LINE = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"


def big(header: bytes, lines: int = 20_000, line: bytes = LINE) -> bytes:
    """A message of ``lines`` body lines (1.4 MB by default), some starting with a dot."""
    body = b"".join((b"." + line if i % 997 == 0 else line) for i in range(lines))
    return header + b"\r\n" + body


HEADER = b"From: app@example.com\r\nTo: ops@example.org\r\nSubject: big\r\n"
DATED = HEADER + b"Date: Sat, 05 Dec 2026 18:00:00 +0000\r\nMessage-ID: <big@example.com>\r\n"


def send(relay: RelayProcess, raw: bytes) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as smtp:
        smtp.ehlo("client.test")
        assert smtp.mail("app@example.com")[0] == 250
        assert smtp.rcpt("ops@example.org")[0] == 250
        code, reply = smtp.data(raw)
        return code, reply.decode()


def queued_id(reply: str) -> str:
    assert "queued as " in reply, reply
    return reply.rsplit("queued as ", 1)[1].strip()


def bodies(relay: RelayProcess) -> Path:
    return relay.workdir / "data" / "spool.db.bodies"


def spill_files(relay: RelayProcess) -> list[str]:
    return [n for n in os.listdir(bodies(relay)) if n.startswith(".spill-")]


def test_large_messages_arrive_exactly_whatever_they_need(
    relay_factory: type[RelayProcess],
) -> None:
    relay = relay_factory(SPILL).start()
    clean = big(DATED)
    # Three bare LFs far past the part kept in memory.
    bare = clean[:1_000_000] + clean[1_000_000:].replace(b"again.\r\n", b"again.\n", 3)
    # A header of 150 KB: too long for the checks to read it in the part kept in memory.
    late_header = big(DATED + b"".join(b"X-Long-%d: %s\r\n" % (i, b"y" * 980) for i in range(150)))
    sent = {}
    for raw in (clean, bare, late_header):
        code, reply = send(relay, raw)
        assert code == 250, reply
        sent[queued_id(reply)] = raw
    delivered = relay.wait_delivered(len(sent))
    assert sorted(delivered) == sorted(sent)
    for message_id, raw in sent.items():
        assert (relay.outbox / f"{message_id}.eml").read_bytes() == normalize_line_endings(raw)
    assert spill_files(relay) == []
    # Delivered: the body files (the files written at DATA, kept) are gone too.
    assert os.listdir(bodies(relay)) == []
    [bare_id] = [i for i, raw in sent.items() if raw is bare]
    assert json.loads(relay.cli("queue", "show", bare_id).stdout)["meta"]["repairs"] == [
        "bare CR/LF normalised to CRLF"
    ]


def test_a_header_repaired_on_a_large_message(relay_factory: type[RelayProcess]) -> None:
    relay = relay_factory({**SPILL, "ESPRELAY_REPAIR_HEADERS": "true"}).start()
    raw = big(HEADER)  # no Date, no Message-ID
    code, reply = send(relay, raw)
    assert code == 250, reply
    [message_id] = relay.wait_delivered(1)
    got = (relay.outbox / f"{message_id}.eml").read_bytes()
    assert got.startswith(b"Date: ")
    assert b"\r\nMessage-ID: <" in got[:300]
    assert got.endswith(raw)
    assert spill_files(relay) == []


def test_a_large_message_to_an_http_esp(relay_factory: type[RelayProcess]) -> None:
    attachment = os.urandom(900_000)
    encoded = base64.encodebytes(attachment).replace(b"\n", b"\r\n")
    raw = (
        DATED
        + b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        + b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        + b"--b\r\nContent-Type: application/octet-stream\r\n"
        + b'Content-Disposition: attachment; filename="blob.bin"\r\n'
        + b"Content-Transfer-Encoding: base64\r\n\r\n"
        + encoded
        + b"--b--\r\n"
    )
    with FakeESP(lambda request: Reply(202, b"", {"X-Message-Id": "sg-1"})) as esp:
        relay = relay_factory(
            {
                **SPILL,
                "ESPRELAY_PROVIDER": "sendgrid",
                "ESPRELAY_SENDGRID_API_KEY": "SG.key",
                "ESPRELAY_SENDGRID_API_URL": esp.url,
            }
        ).start()
        code, reply = send(relay, raw)
        assert code == 250, reply
        [request] = esp.wait_for(1)
    payload = request.json()
    [sent] = payload["attachments"]
    assert sent["filename"] == "blob.bin"
    assert base64.b64decode(sent["content"]) == attachment
    assert payload["content"] == [{"type": "text/plain", "value": "see attached"}]
    relay.wait_for_log(r"delivered id=\S+ provider=sendgrid")
    assert spill_files(relay) == []


@pytest.fixture
def pg_url() -> Iterator[str]:
    with temporary_database() as url:
        yield url


def test_a_large_message_through_the_postgresql_spool(
    relay_factory: type[RelayProcess], pg_url: str
) -> None:
    relay = relay_factory(
        {**SPILL, "ESPRELAY_SPOOL_URL": pg_url, "ESPRELAY_REPAIR_HEADERS": "true"}
    ).start()
    raws = [big(DATED), big(DATED, lines=40_000), big(HEADER)]
    ids = []
    for raw in raws:
        code, reply = send(relay, raw)
        assert code == 250, reply
        ids.append(queued_id(reply))
    relay.wait_delivered(3)
    for message_id, raw in zip(ids[:2], raws[:2], strict=True):
        assert (relay.outbox / f"{message_id}.eml").read_bytes() == raw
    repaired = (relay.outbox / f"{ids[2]}.eml").read_bytes()
    assert repaired.startswith(b"Date: ") and repaired.endswith(raws[2])


def test_a_large_message_in_passthrough_mode(relay_factory: type[RelayProcess]) -> None:
    with FakeESP(lambda request: Reply(202, b"", {"X-Message-Id": "sg-2"})) as esp:
        relay = relay_factory(
            {
                **SPILL,
                "ESPRELAY_DELIVERY_MODE": "passthrough",
                "ESPRELAY_PROVIDER": "sendgrid",
                "ESPRELAY_SENDGRID_API_KEY": "SG.key",
                "ESPRELAY_SENDGRID_API_URL": esp.url,
            }
        ).start()
        raw = big(DATED)
        code, reply = send(relay, raw)
        assert code == 250 and "sendgrid:sg-2" in reply, reply
        [request] = esp.wait_for(1)
    [content] = request.json()["content"]
    assert content["value"].encode() == raw.split(b"\r\n\r\n", 1)[1]


def test_killed_while_a_large_message_arrives(relay_factory: type[RelayProcess]) -> None:
    """A message cut off by SIGKILL was never answered: nothing of it is kept, and its
    file goes when the spool next opens.  One answered 250 is delivered after it."""
    first = relay_factory({**SPILL, "ESPRELAY_DELIVERY_CONCURRENCY": "0"}).start()
    raw = big(DATED)
    code, reply = send(first, raw)
    assert code == 250, reply
    answered = queued_id(reply)
    with socket.create_connection(("127.0.0.1", first.port), timeout=30) as client:
        client.recv(1024)
        client.sendall(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n")
        time.sleep(0.2)
        client.sendall(b"DATA\r\n")
        time.sleep(0.2)
        client.sendall(raw[:1_000_000])
        deadline = time.monotonic() + 30
        while not spill_files(first) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(spill_files(first)) == 1
        first.stop(signal.SIGKILL)

    second = relay_factory(SPILL).start()
    assert second.wait_delivered(1) == [answered]
    assert (second.outbox / f"{answered}.eml").read_bytes() == raw
    assert spill_files(second) == []
    assert [r["id"] for r in spool_rows(second)] == [answered]
