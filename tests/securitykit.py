"""Helpers shared by the security tests: spool inspection, raw dialogs, certificates."""

from __future__ import annotations

import base64
import json
import smtplib
import socket
import ssl
import subprocess
from pathlib import Path

import trustme

from tests.relayproc import RelayProcess

UNTRUSTED = "127.0.0.2"  # a loopback address outside ESPRELAY_TRUSTED_NETWORKS=127.0.0.1/32
ONLY_LOCALHOST = {"ESPRELAY_TRUSTED_NETWORKS": "127.0.0.1/32"}


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


def esprelay_cli(relay: RelayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return relay.cli(*args, check=False, timeout=60)


def spooled(relay: RelayProcess) -> list[dict[str, object]]:
    """Every message in the relay's spool, whatever its state (via `esprelay queue list`)."""
    result = esprelay_cli(relay, "queue", "list", "--json", "--limit", "100000")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def spool_show(relay: RelayProcess, message_id: str) -> dict[str, object]:
    result = esprelay_cli(relay, "queue", "show", message_id)
    assert result.returncode == 0, result.stderr
    shown: dict[str, object] = json.loads(result.stdout)
    return shown


def smtp_client(
    relay: RelayProcess, source: str = "127.0.0.1", port: int | None = None
) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port or relay.port, timeout=15, source_address=(source, 0))


class Dialog:
    """A raw SMTP conversation over one socket: send exact bytes, read reply lines."""

    def __init__(
        self, port: int, source: str = "127.0.0.1", sock: socket.socket | None = None
    ) -> None:
        self.sock = sock or socket.create_connection(
            ("127.0.0.1", port), timeout=15, source_address=(source, 0)
        )
        self.stream = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        return self.stream.readline()

    def reply(self) -> bytes:
        """One whole (possibly multi-line) reply; b"" at end of stream."""
        lines = []
        while True:
            line = self.stream.readline()
            if not line:
                break
            lines.append(line)
            if line[3:4] != b"-":
                break
        return b"".join(lines)

    def command(self, data: bytes) -> bytes:
        self.send(data + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        """True once the server has closed the connection."""
        try:
            return self.stream.read() == b""
        except (ConnectionResetError, TimeoutError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


def plain_auth(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


class Certs:
    """A trustme CA and server certificates written where esprelay can read them."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.directory = directory
        self.cert_file = directory / "server.pem"
        self.key_file = directory / "server.key"
        self.issue()

    def issue(self) -> trustme.LeafCert:
        leaf = self.ca.issue_cert("localhost", "127.0.0.1")
        # Write to temporary names and rename, as certbot-style tools do.
        for blob, path in (
            (b"".join(b.bytes() for b in leaf.cert_chain_pems), self.cert_file),
            (leaf.private_key_pem.bytes(), self.key_file),
        ):
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(blob)
            tmp.replace(path)
        self.leaf = leaf
        return leaf

    def leaf_der(self) -> bytes:
        return ssl.PEM_cert_to_DER_cert(self.leaf.cert_chain_pems[0].bytes().decode())

    def env(self) -> dict[str, str]:
        return {
            "ESPRELAY_TLS_CERT_FILE": str(self.cert_file),
            "ESPRELAY_TLS_KEY_FILE": str(self.key_file),
        }

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context
