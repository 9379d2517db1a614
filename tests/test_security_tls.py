"""STARTTLS and SMTPS with trustme certificates: versions, rotation, injection."""

from __future__ import annotations

import re
import smtplib
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.relayproc import RelayProcess
from tests.securitykit import ONLY_LOCALHOST, UNTRUSTED, Certs, Dialog, crlf, plain_auth, spooled

PASSWORD = "tls-only-secret"


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    directory = tmp_path / "certs"
    directory.mkdir()
    return Certs(directory)


def start_tls_relay(
    relay_factory: type[RelayProcess], certs: Certs, **extra: str
) -> tuple[RelayProcess, int]:
    env = {
        **ONLY_LOCALHOST,
        **certs.env(),
        "ESPRELAY_SMTPS_PORT": "0",
        "ESPRELAY_AUTH_USER": "app",
        "ESPRELAY_AUTH_PASSWORD": PASSWORD,
        "ESPRELAY_TLS_RELOAD_INTERVAL": "0",
        **extra,
    }
    relay = relay_factory(env).start()
    relay.wait_for_log(r"smtps listening on")
    match = re.search(r"smtps listening on [^:]+:(\d+)", relay.log)
    assert match is not None
    return relay, int(match.group(1))


@pytest.fixture
def tls_relay(
    relay_factory: type[RelayProcess], certs: Certs
) -> Iterator[tuple[RelayProcess, int]]:
    yield start_tls_relay(relay_factory, certs)


def peer_der(smtp: smtplib.SMTP) -> bytes:
    sock = smtp.sock
    assert isinstance(sock, ssl.SSLSocket)
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_starttls_then_auth_and_send(tls_relay: tuple[RelayProcess, int], certs: Certs) -> None:
    relay, _ = tls_relay
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=15, source_address=(UNTRUSTED, 0)) as smtp:
        smtp.ehlo("device.test")
        assert smtp.starttls(context=certs.client_context())[0] == 220
        assert peer_der(smtp) == certs.leaf_der()
        smtp.ehlo("device.test")
        assert not smtp.has_extn("starttls")
        smtp.login("app", PASSWORD)
        smtp.sendmail("a@example.com", ["b@example.org"], crlf("Subject: tls\n\nx\n"))
    relay.wait_delivered(1)


def test_smtps_implicit_tls(tls_relay: tuple[RelayProcess, int], certs: Certs) -> None:
    relay, smtps_port = tls_relay
    with smtplib.SMTP_SSL(
        "127.0.0.1",
        smtps_port,
        timeout=15,
        source_address=(UNTRUSTED, 0),
        context=certs.client_context(),
    ) as smtp:
        smtp.ehlo("device.test")
        assert smtp.has_extn("auth") and not smtp.has_extn("starttls")
        assert smtp.docmd("MAIL FROM:<a@example.com>")[0] == 530  # still not trusted
        smtp.login("app", PASSWORD)
        smtp.sendmail("a@example.com", ["b@example.org"], crlf("Subject: smtps\n\nx\n"))
    relay.wait_delivered(1)
    assert spooled(relay)[0]["mail_from"] == "a@example.com"


def test_client_pinned_to_tls13(tls_relay: tuple[RelayProcess, int], certs: Certs) -> None:
    relay, smtps_port = tls_relay
    context = certs.client_context()
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_3
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=15) as smtp:
        smtp.ehlo("modern.test")
        smtp.starttls(context=context)
        assert isinstance(smtp.sock, ssl.SSLSocket)
        assert smtp.sock.version() == "TLSv1.3"
    with smtplib.SMTP_SSL("127.0.0.1", smtps_port, timeout=15, context=context) as smtp:
        assert isinstance(smtp.sock, ssl.SSLSocket)
        assert smtp.sock.version() == "TLSv1.3"


def legacy_client_context(certs: Certs, version: ssl.TLSVersion) -> ssl.SSLContext:
    context = certs.client_context()
    # OpenSSL 3 forbids TLS 1.0/1.1 at its default security level: lower it, as the
    # server does when ESPRELAY_TLS_MIN_VERSION allows these versions.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.maximum_version = version
    return context


# Python deprecates naming TLS 1.0/1.1; these tests must name them.
legacy = pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")


@legacy
def test_tls10_refused_by_default(tls_relay: tuple[RelayProcess, int], certs: Certs) -> None:
    relay, smtps_port = tls_relay
    context = legacy_client_context(certs, ssl.TLSVersion.TLSv1)
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        smtplib.SMTP_SSL("127.0.0.1", smtps_port, timeout=15, context=context)
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=15) as smtp:
        smtp.ehlo("old.test")
        with pytest.raises((ssl.SSLError, ConnectionResetError, smtplib.SMTPException)):
            smtp.starttls(context=context)


@legacy
@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_legacy_tls_allowed_when_configured(
    relay_factory: type[RelayProcess], certs: Certs, version: str
) -> None:
    wanted = {"1.0": ssl.TLSVersion.TLSv1, "1.1": ssl.TLSVersion.TLSv1_1}[version]
    name = {"1.0": "TLSv1", "1.1": "TLSv1.1"}[version]  # what SSLSocket.version() says
    relay, smtps_port = start_tls_relay(relay_factory, certs, ESPRELAY_TLS_MIN_VERSION=version)
    assert f"TLS {version} allowed (ESPRELAY_TLS_MIN_VERSION)" in relay.log
    context = legacy_client_context(certs, wanted)
    try:
        smtp = smtplib.SMTP_SSL("127.0.0.1", smtps_port, timeout=15, context=context)
    except ssl.SSLError as exc:  # pragma: no cover - depends on the platform's OpenSSL
        pytest.skip(f"this platform's OpenSSL cannot speak TLS {version} at all: {exc}")
    with smtp:
        assert isinstance(smtp.sock, ssl.SSLSocket)
        assert smtp.sock.version() == name
        smtp.login("app", PASSWORD)
        smtp.sendmail("a@example.com", ["b@example.org"], crlf("Subject: old\n\nx\n"))
    # The same device over STARTTLS on the main port.
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=15) as smtp:
        smtp.ehlo("old.test")
        smtp.starttls(context=context)
        assert isinstance(smtp.sock, ssl.SSLSocket)
        assert smtp.sock.version() == name
    relay.wait_delivered(1)


def test_certificate_rotation_without_restart(
    tls_relay: tuple[RelayProcess, int], certs: Certs
) -> None:
    relay, smtps_port = tls_relay
    first = certs.leaf_der()
    with smtplib.SMTP_SSL(
        "127.0.0.1", smtps_port, timeout=15, context=certs.client_context()
    ) as smtp:
        assert peer_der(smtp) == first
    time.sleep(0.02)  # a distinct mtime even on coarse file systems
    certs.issue()
    second = certs.leaf_der()
    assert second != first
    with smtplib.SMTP_SSL(
        "127.0.0.1", smtps_port, timeout=15, context=certs.client_context()
    ) as smtp:
        assert peer_der(smtp) == second
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=15) as smtp:
        smtp.ehlo("x.test")
        smtp.starttls(context=certs.client_context())
        assert peer_der(smtp) == second
    relay.wait_for_log("TLS certificate reloaded")
    assert relay.proc is not None and relay.proc.poll() is None  # the same process


def test_broken_rotation_keeps_serving_the_old_certificate(
    tls_relay: tuple[RelayProcess, int], certs: Certs
) -> None:
    relay, smtps_port = tls_relay
    first = certs.leaf_der()
    certs.key_file.write_text("not a key\n")  # a half-finished rotation
    with smtplib.SMTP_SSL(
        "127.0.0.1", smtps_port, timeout=15, context=certs.client_context()
    ) as smtp:
        assert peer_der(smtp) == first
    relay.wait_for_log("TLS certificate changed but does not load")


def test_commands_pipelined_before_starttls_are_discarded(
    tls_relay: tuple[RelayProcess, int], certs: Certs
) -> None:
    """CVE-2011-0411 / CVE-2024-34083: plaintext sent after STARTTLS must not run inside TLS."""
    relay, _ = tls_relay
    dialog = Dialog(relay.port, source=UNTRUSTED)
    assert dialog.reply().startswith(b"220")
    assert dialog.command(b"EHLO x.test").startswith(b"250")
    auth = b"AUTH PLAIN " + plain_auth("app", PASSWORD)
    dialog.send(b"STARTTLS\r\n" + auth + b"\r\nMAIL FROM:<injected@evil.example>\r\n")
    assert dialog.line().startswith(b"220")
    tls_sock = certs.client_context().wrap_socket(dialog.sock, server_hostname="localhost")
    secure = Dialog(0, sock=tls_sock)
    # The first reply inside TLS answers our EHLO, not the injected commands.
    reply = secure.command(b"EHLO x.test")
    assert reply.startswith(b"250-"), reply
    # Not authenticated by the injected AUTH, and no MAIL transaction open:
    assert secure.command(b"MAIL FROM:<a@example.com>").startswith(b"530")
    assert secure.command(auth).startswith(b"235")
    assert secure.command(b"MAIL FROM:<a@example.com>").startswith(b"250")  # not "nested MAIL"
    secure.close()


@pytest.mark.parametrize("engine", ["native", "aiosmtpd"])
def test_failed_starttls_handshake_runs_no_plaintext_and_frees_the_slot(
    relay_factory: type[RelayProcess], certs: Certs, engine: str
) -> None:
    """Found by the fuzzer: after a STARTTLS whose handshake never happened, aiosmtpd went
    on with the plaintext pipelined behind it, as if inside TLS (AUTH allowed), and the
    connection slot was never freed."""
    relay, _ = start_tls_relay(
        relay_factory,
        certs,
        ESPRELAY_SMTP_TIMEOUT="1s",
        ESPRELAY_MAX_CONNECTIONS_PER_CLIENT="1",
        ESPRELAY_SMTP_ENGINE=engine,
    )
    dialog = Dialog(relay.port, source=UNTRUSTED)
    assert dialog.reply().startswith(b"220")
    assert dialog.command(b"EHLO x.test").startswith(b"250")
    dialog.send(
        b"STARTTLS\r\nAUTH PLAIN " + plain_auth("app", PASSWORD) + b"\r\n"
        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
        b"Subject: plaintext after STARTTLS\r\n\r\nx\r\n.\r\nQUIT\r\n"
    )
    assert dialog.line().startswith(b"220")
    dialog.sock.settimeout(10)
    rest = dialog.stream.read()  # no handshake: the server gives up after the timeout
    dialog.close()
    assert b"235" not in rest and b"250" not in rest, rest
    time.sleep(0.5)
    assert spooled(relay) == []
    again = Dialog(relay.port, source=UNTRUSTED)
    assert again.reply().startswith(b"220")  # the one slot for this client is free again
    again.close()
    assert "TLS handshake not completed" in relay.log


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("engine", ["native", "aiosmtpd"])
def test_garbage_instead_of_a_handshake_frees_the_slot(
    relay_factory: type[RelayProcess], certs: Certs, engine: str, loop: str
) -> None:
    """The client answers 220 to STARTTLS with bytes that are not TLS, then goes away:
    the handshake fails at once (not by timeout) and the client's one slot is free."""
    relay, _ = start_tls_relay(
        relay_factory,
        certs,
        ESPRELAY_MAX_CONNECTIONS_PER_CLIENT="1",
        ESPRELAY_SMTP_ENGINE=engine,
        ESPRELAY_EVENT_LOOP=loop,
    )
    dialog = Dialog(relay.port, source=UNTRUSTED)
    assert dialog.reply().startswith(b"220")
    assert dialog.command(b"EHLO x.test").startswith(b"250")
    assert dialog.command(b"STARTTLS").startswith(b"220")
    dialog.send(b"\x16\x03\x01\x00\x05garbage-that-is-no-client-hello\r\n" * 4)
    dialog.sock.settimeout(10)
    assert dialog.closed()
    dialog.close()
    deadline = time.monotonic() + 5
    while True:
        again = Dialog(relay.port, source=UNTRUSTED)
        greeting = again.reply()
        again.close()
        if greeting.startswith(b"220") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert greeting.startswith(b"220"), greeting
