"""esprelay behind a PROXY protocol load balancer, both engines, real sockets.

The "balancer" is the test client on 127.0.0.1 (``ESPRELAY_PROXY_TRUSTED``); it sends a
v1 or v2 header naming a documentation address, then speaks SMTP (or TLS on the SMTPS
port).  Loopback itself is NOT in the trusted networks: a session that saw the socket's
peer instead of the header's would be refused where these tests expect a relay, and the
other way round.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import smtplib
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from esprelay.config import Settings
from esprelay.listeners import proxy_config
from tests.conftest import require_tool
from tests.relayproc import RelayProcess
from tests.securitykit import Certs, Dialog, crlf, plain_auth, spool_show

PASSWORD = "proxy-Secret-7"
TRUSTED_CLIENT = "192.0.2.10"  # in ESPRELAY_TRUSTED_NETWORKS
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(source: str, port: int = 40000) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    dest = "2001:db8::1" if ":" in source else "10.0.0.1"
    return f"PROXY {family} {source} {dest} {port} 25\r\n".encode()


def v2(source: str | None, port: int = 40000) -> bytes:
    """A v2 PROXY header for ``source``; None: the LOCAL command (a health check)."""
    if source is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    ip = ipaddress.ip_address(source)
    dest = ipaddress.ip_address("10.0.0.1" if ip.version == 4 else "2001:db8::1")
    body = ip.packed + dest.packed + struct.pack("!HH", port, 25)
    family = 0x11 if ip.version == 4 else 0x21
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


class ProxiedSMTP(smtplib.SMTP):
    """smtplib's client behind a balancer: the header goes first on the socket."""

    def __init__(self, port: int, header: bytes, source: str = "127.0.0.1") -> None:
        self._header = header
        super().__init__("127.0.0.1", port, timeout=15, source_address=(source, 0))

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = super()._get_socket(host, port, timeout)
        sock.sendall(self._header)
        return sock


def proxied_dialog(port: int, header: bytes, source: str = "127.0.0.1") -> Dialog:
    dialog = Dialog(port, source)
    dialog.send(header)
    return dialog


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(
    scope="module",
    params=[("native", "auto"), ("aiosmtpd", "auto"), ("native", "asyncio")],
    ids=["native", "aiosmtpd", "native-asyncio-loop"],
)
def relay(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, certs: Certs
) -> Iterator[RelayProcess]:
    """Both engines on the default event loop (uvloop), and asyncio's loop too: the gate
    reads on each loop's transports."""
    engine, event_loop = request.param
    workdir = tmp_path_factory.mktemp(f"proxy-{engine}")
    proc = RelayProcess(
        workdir,
        {
            **certs.env(),
            "ESPRELAY_SMTP_ENGINE": engine,
            "ESPRELAY_EVENT_LOOP": event_loop,
            "ESPRELAY_SMTPS_PORT": "0",
            "ESPRELAY_PROXY_PROTOCOL": "true",
            "ESPRELAY_PROXY_TRUSTED": "127.0.0.1/32",
            "ESPRELAY_PROXY_PROTOCOL_TIMEOUT": "1",
            "ESPRELAY_TRUSTED_NETWORKS": "192.0.2.0/24",
            "ESPRELAY_PLAINTEXT_AUTH_NETWORKS": "203.0.113.0/24",
            "ESPRELAY_AUTH_USER": "app",
            "ESPRELAY_AUTH_PASSWORD": PASSWORD,
            "ESPRELAY_AUTH_MAX_FAILURES": "1",
            "ESPRELAY_MAX_CONNECTIONS_PER_CLIENT": "2",
        },
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def smtps_port(relay: RelayProcess) -> int:
    match = re.search(r"smtps listening on [^:]+:(\d+)", relay.log)
    assert match, relay.log
    return int(match.group(1))


def queued_id(reply: bytes | str) -> str:
    text = reply.decode() if isinstance(reply, bytes) else reply
    assert "queued as " in text, text
    return text.rsplit("queued as ", 1)[1].strip()


MESSAGE = crlf("From: app@example.com\nTo: b@example.org\nSubject: proxied\n\nhello\n")


@pytest.mark.parametrize("make_header", [v1, v2], ids=["v1", "v2"])
def test_the_header_names_the_client_that_is_trusted(
    relay: RelayProcess, make_header: object
) -> None:
    assert callable(make_header)
    with ProxiedSMTP(relay.port, make_header(TRUSTED_CLIENT)) as smtp:
        smtp.ehlo("client.example")
        assert smtp.mail("app@example.com")[0] == 250
        assert smtp.rcpt("b@example.org")[0] == 250
        code, reply = smtp.data(MESSAGE)
        assert code == 250, reply
    meta = spool_show(relay, queued_id(reply))["meta"]
    assert isinstance(meta, dict)
    assert meta["client"] == TRUSTED_CLIENT


@pytest.mark.parametrize(
    "header",
    [v1("198.51.100.7"), v2("198.51.100.7"), v1("2001:db8::5"), v2("2001:db8::5")],
    ids=["v1", "v2", "v1-ipv6", "v2-ipv6"],
)
def test_a_client_outside_the_trusted_networks_must_authenticate(
    relay: RelayProcess, header: bytes
) -> None:
    with ProxiedSMTP(relay.port, header) as smtp:
        smtp.ehlo("client.example")
        code, _ = smtp.mail("app@example.com")
        assert code == 530
    client = "2001:db8::5" if b":" in header or header[12:14] == b"\x21\x21" else "198.51.100.7"
    relay.wait_for_log(rf"relay refused: client={re.escape(client)} not trusted")


@pytest.mark.parametrize("header", [v2(None), b"PROXY UNKNOWN\r\n"], ids=["v2-local", "v1-unknown"])
def test_local_and_unknown_keep_the_balancer_address(relay: RelayProcess, header: bytes) -> None:
    before = relay.log.count("relay refused: client=127.0.0.1 ")
    with ProxiedSMTP(relay.port, header) as smtp:
        smtp.ehlo("health.check")
        assert smtp.mail("app@example.com")[0] == 530  # 127.0.0.1 is not trusted
    relay.wait_for_log(r"relay refused: client=127\.0\.0\.1 ", count=before + 1)


def test_a_peer_outside_proxy_trusted_is_refused(relay: RelayProcess) -> None:
    """A header from anyone but the balancer could name any address: the connection is
    closed before the greeting."""
    dialog = proxied_dialog(relay.port, v1(TRUSTED_CLIENT), source="127.0.0.2")
    try:
        assert dialog.closed()
    finally:
        dialog.close()
    relay.wait_for_log(r"PROXY protocol: refusing client=127\.0\.0\.2")


def test_a_trusted_peer_must_send_a_header(relay: RelayProcess) -> None:
    dialog = proxied_dialog(relay.port, b"EHLO client.example\r\n")
    try:
        assert dialog.closed()
    finally:
        dialog.close()
    relay.wait_for_log(r"proxy=127\.0\.0\.1: not a PROXY protocol header")


def test_a_trusted_peer_that_sends_nothing_is_closed_after_the_timeout(
    relay: RelayProcess,
) -> None:
    dialog = Dialog(relay.port)
    try:
        assert dialog.closed()
    finally:
        dialog.close()
    relay.wait_for_log(r"proxy=127\.0\.0\.1: no header within 1s")


def test_auth_failures_count_against_the_real_client(relay: RelayProcess) -> None:
    """ESPRELAY_AUTH_MAX_FAILURES=1: the client that failed is blocked, not every
    client behind the same balancer."""
    with ProxiedSMTP(relay.port, v2("203.0.113.5")) as smtp:
        smtp.ehlo("client.example")
        code, _ = smtp.docmd("AUTH", "PLAIN " + plain_auth("app", "wrong").decode())
        assert code == 535
    with ProxiedSMTP(relay.port, v2("203.0.113.5")) as smtp:
        smtp.ehlo("client.example")
        code, _ = smtp.docmd("AUTH", "PLAIN " + plain_auth("app", PASSWORD).decode())
        assert code == 454  # blocked
    with ProxiedSMTP(relay.port, v1("203.0.113.6")) as smtp:
        smtp.ehlo("client.example")
        code, _ = smtp.docmd("AUTH", "PLAIN " + plain_auth("app", PASSWORD).decode())
        assert code == 235
        assert smtp.mail("app@example.com")[0] == 250


def test_connection_limits_count_the_real_client(relay: RelayProcess) -> None:
    """ESPRELAY_MAX_CONNECTIONS_PER_CLIENT=2 applies per client, not per balancer."""
    dialogs = [proxied_dialog(relay.port, v1("198.51.100.20")) for _ in range(3)]
    dialogs.append(proxied_dialog(relay.port, v2("198.51.100.21")))
    try:
        greetings = [d.reply()[:3] for d in dialogs]
    finally:
        for dialog in dialogs:
            dialog.close()
    assert greetings == [b"220", b"220", b"421", b"220"]


class TLSOverSocket:
    """A TLS client on a plain socket whose first write is the PROXY header and the
    ClientHello together, as a balancer forwards a client that spoke at once."""

    def __init__(
        self, sock: socket.socket, context: ssl.SSLContext, header: bytes, early: bytes = b""
    ) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.buffer = b""
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()
        sock.sendall(header + self.outgoing.read())
        self._run(self.tls.do_handshake, flush=False)
        if early:
            # Commands in the same segment as the end of the handshake (the server has
            # them before its TLS layer hands the connection to the session).
            self.tls.write(early)
        self._flush()

    def _run(self, operation: object, *args: object, flush: bool = True) -> object:
        assert callable(operation)
        while True:
            try:
                result = operation(*args)
            except ssl.SSLWantReadError:
                self._flush()
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("closed during TLS") from None
                self.incoming.write(data)
                continue
            if flush:
                self._flush()
            return result

    def _flush(self) -> None:
        pending = self.outgoing.read()
        if pending:
            self.sock.sendall(pending)

    def reply(self) -> bytes:
        while not re.search(rb"(?m)^\d{3} .*\r\n", self.buffer):
            chunk = self._run(self.tls.read, 65536)
            assert isinstance(chunk, bytes)
            self.buffer += chunk
        end = re.search(rb"(?m)^\d{3} .*\r\n", self.buffer)
        assert end is not None
        reply, self.buffer = self.buffer[: end.end()], self.buffer[end.end() :]
        return reply

    def command(self, line: bytes) -> bytes:
        self._run(self.tls.write, line + b"\r\n")
        return self.reply()


def test_smtps_port_reads_the_header_before_tls(relay: RelayProcess, certs: Certs) -> None:
    context = ssl.create_default_context()
    certs.ca.configure_trust(context)
    with socket.create_connection(("127.0.0.1", smtps_port(relay)), timeout=15) as sock:
        client = TLSOverSocket(sock, context, v2(TRUSTED_CLIENT))
        assert client.reply().startswith(b"220 ")
        assert client.command(b"EHLO client.example").startswith(b"250")
        assert client.command(b"MAIL FROM:<app@example.com>").startswith(b"250")
        assert client.command(b"RCPT TO:<b@example.org>").startswith(b"250")
        assert client.command(b"DATA").startswith(b"354")
        reply = client.command(MESSAGE + b".")
        assert reply.startswith(b"250"), reply
        client.command(b"QUIT")
    meta = spool_show(relay, queued_id(reply.strip()))["meta"]
    assert isinstance(meta, dict)
    assert meta["client"] == TRUSTED_CLIENT
    assert meta["tls"] is True


def test_settings_refuse_proxy_protocol_without_trusted_balancers() -> None:
    with pytest.raises(ValueError, match="ESPRELAY_PROXY_TRUSTED"):
        Settings(_env_file=None, proxy_protocol=True)  # type: ignore[call-arg]


def test_proxy_trusted_is_parsed_like_the_trusted_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPRELAY_PROXY_PROTOCOL", "true")
    monkeypatch.setenv("ESPRELAY_PROXY_TRUSTED", "10.0.1.0/24, 2001:db8::/32 192.0.2.7")
    config = proxy_config(Settings(_env_file=None))  # type: ignore[call-arg]
    assert config is not None
    assert [str(n) for n in config.trusted] == ["10.0.1.0/24", "2001:db8::/32", "192.0.2.7/32"]
    monkeypatch.setenv("ESPRELAY_PROXY_TRUSTED", "10.0.1.0/24,balancer.example")
    with pytest.raises(ValueError, match="is not a network"):
        Settings(_env_file=None)  # type: ignore[call-arg]
    monkeypatch.setenv("ESPRELAY_PROXY_PROTOCOL", "false")
    monkeypatch.setenv("ESPRELAY_PROXY_TRUSTED", "10.0.1.0/24")
    assert proxy_config(Settings(_env_file=None)) is None  # type: ignore[call-arg]


def test_smtps_commands_sent_with_the_end_of_the_handshake(
    relay: RelayProcess, certs: Certs
) -> None:
    context = ssl.create_default_context()
    certs.ca.configure_trust(context)
    with socket.create_connection(("127.0.0.1", smtps_port(relay)), timeout=15) as sock:
        client = TLSOverSocket(sock, context, v1(TRUSTED_CLIENT), early=b"EHLO early\r\n")
        assert client.reply().startswith(b"220 ")
        assert client.reply().startswith(b"250-")
        assert client.command(b"MAIL FROM:<app@example.com>").startswith(b"250")
        assert client.command(b"RCPT TO:<b@example.org>").startswith(b"250")


# region a real HAProxy in front (Debian's haproxy; make test installs it)

HAPROXY_CONFIG = """\
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend smtp_v2
    bind 127.0.0.1:{v2}
    default_backend relay_v2

frontend smtp_v1
    bind 127.0.0.1:{v1}
    default_backend relay_v1

frontend smtps
    bind 127.0.0.1:{smtps}
    default_backend relay_smtps

backend relay_v2
    server relay 127.0.0.1:{relay} send-proxy-v2 source 127.0.0.1

backend relay_v1
    server relay 127.0.0.1:{relay} send-proxy source 127.0.0.1

backend relay_smtps
    server relay 127.0.0.1:{relay_smtps} send-proxy-v2 source 127.0.0.1
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, "haproxy exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"haproxy does not listen on {port}")


@pytest.fixture
def haproxy_tool() -> str:
    return require_tool("haproxy")


@pytest.mark.parametrize("engine", ["native", "aiosmtpd"])
def test_behind_a_real_haproxy(
    engine: str,
    haproxy_tool: str,
    relay_factory: type[RelayProcess],
    certs: Certs,
    tmp_path: Path,
) -> None:
    """HAProxy forwards clients on 127.0.0.3 (trusted) and 127.0.0.4 (not) with
    send-proxy-v2 and send-proxy; esprelay sees them, not HAProxy's 127.0.0.1."""
    relay = relay_factory(
        {
            **certs.env(),
            "ESPRELAY_SMTP_ENGINE": engine,
            "ESPRELAY_SMTPS_PORT": "0",
            "ESPRELAY_PROXY_PROTOCOL": "true",
            "ESPRELAY_PROXY_TRUSTED": "127.0.0.1/32",
            "ESPRELAY_TRUSTED_NETWORKS": "127.0.0.3/32",
        }
    ).start()
    ports = {"v2": _free_port(), "v1": _free_port(), "smtps": _free_port()}
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        HAPROXY_CONFIG.format(**ports, relay=relay.port, relay_smtps=smtps_port(relay))
    )
    proc = subprocess.Popen(
        [haproxy_tool, "-db", "-f", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for port in ports.values():
            _wait_listening(port, proc)
        for frontend in ("v2", "v1"):
            with smtplib.SMTP(
                "127.0.0.1", ports[frontend], timeout=15, source_address=("127.0.0.3", 0)
            ) as smtp:
                smtp.ehlo("client.example")
                assert smtp.mail("app@example.com")[0] == 250
                assert smtp.rcpt("b@example.org")[0] == 250
                code, reply = smtp.data(MESSAGE)
                assert code == 250, reply
            meta = spool_show(relay, queued_id(reply))["meta"]
            assert isinstance(meta, dict)
            assert meta["client"] == "127.0.0.3"
            with smtplib.SMTP(
                "127.0.0.1", ports[frontend], timeout=15, source_address=("127.0.0.4", 0)
            ) as smtp:
                smtp.ehlo("client.example")
                assert smtp.mail("app@example.com")[0] == 530
        relay.wait_for_log(r"relay refused: client=127\.0\.0\.4 ", count=2)
        context = ssl.create_default_context()
        certs.ca.configure_trust(context)
        with smtplib.SMTP_SSL(
            "localhost",
            ports["smtps"],
            timeout=15,
            source_address=("127.0.0.3", 0),
            context=context,
        ) as smtp:
            smtp.ehlo("client.example")
            assert smtp.mail("app@example.com")[0] == 250
            assert smtp.rcpt("b@example.org")[0] == 250
        # Without the balancer, the trusted client is a stranger to the listener.
        dialog = Dialog(relay.port, "127.0.0.3")
        try:
            assert dialog.closed()
        finally:
            dialog.close()
        relay.wait_for_log(r"PROXY protocol: refusing client=127\.0\.0\.3")
    finally:
        proc.terminate()
        proc.wait(10)


def test_readme_haproxy_example_is_valid(haproxy_tool: str, tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("HAProxy (`send-proxy-v2`", 1)[1]
    block = section.split("```", 2)[1]
    config = tmp_path / "readme.cfg"
    config.write_text("defaults\n    timeout connect 5s\n" + block)
    result = subprocess.run(
        [haproxy_tool, "-c", "-f", str(config)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# endregion
