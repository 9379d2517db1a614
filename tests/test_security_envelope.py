"""Envelope addresses whose bytes cannot travel: refused at MAIL and RCPT, on both engines.

Decision (RFC 6531): a non-ASCII address without the SMTPUTF8 parameter of MAIL is
answered ``553 5.6.7``; bytes that are not UTF-8 are a malformed address, ``501 5.1.3``,
with or without SMTPUTF8.  Before, such an address was accepted: at MAIL the message
then failed at DATA with ``451``, at RCPT it was spooled and every delivery attempt
failed (``surrogates not allowed``) until the queue lifetime ran out.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.relayproc import RelayProcess
from tests.securitykit import Dialog, spooled

ENGINES = ("native", "aiosmtpd")


@pytest.fixture(scope="module")
def relays(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RelayProcess]]:
    made: dict[str, RelayProcess] = {}
    try:
        for engine in ENGINES:
            workdir = tmp_path_factory.mktemp(f"envelope-{engine}")
            made[engine] = RelayProcess(
                workdir, {"ESPRELAY_SMTP_ENGINE": engine, "ESPRELAY_HTTP_ENABLED": "false"}
            ).start()
        yield made
    finally:
        for relay in made.values():
            relay.kill()


def _session(relay: RelayProcess) -> Dialog:
    dialog = Dialog(relay.port)
    assert dialog.reply().startswith(b"220")
    assert dialog.command(b"EHLO client.test").startswith(b"250")
    return dialog


NOT_UTF8 = b"j\xff@example.com"
UTF8 = "jos\u00e9@example.com".encode()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("address", "params", "expected"),
    [
        pytest.param(NOT_UTF8, b"", b"553 5.6.7 ", id="not-utf8"),
        pytest.param(NOT_UTF8, b" SMTPUTF8", b"501 5.1.3 ", id="not-utf8-smtputf8"),
        pytest.param(UTF8, b"", b"553 5.6.7 ", id="utf8-without-smtputf8"),
        pytest.param(b'"j\xff"@example.com', b" SMTPUTF8", b"501 5.1.3 ", id="quoted"),
        pytest.param(b"j@ex\xffample.com", b"", b"553 5.6.7 ", id="domain"),
    ],
)
def test_mail_from_refused(
    relays: dict[str, RelayProcess], engine: str, address: bytes, params: bytes, expected: bytes
) -> None:
    dialog = _session(relays[engine])
    try:
        reply = dialog.command(b"MAIL FROM:<" + address + b">" + params)
        assert reply.startswith(expected), reply
        # The session goes on: a good transaction after the refusal is accepted.
        assert dialog.command(b"MAIL FROM:<a@example.com>").startswith(b"250")
    finally:
        dialog.close()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("address", "params", "expected"),
    [
        pytest.param(NOT_UTF8, b"", b"553 5.6.7 ", id="not-utf8"),
        pytest.param(NOT_UTF8, b" SMTPUTF8", b"501 5.1.3 ", id="not-utf8-smtputf8"),
        pytest.param(UTF8, b"", b"553 5.6.7 ", id="utf8-without-smtputf8"),
    ],
)
def test_rcpt_to_refused_and_nothing_spooled(
    relays: dict[str, RelayProcess], engine: str, address: bytes, params: bytes, expected: bytes
) -> None:
    relay = relays[engine]
    before = len(spooled(relay))
    dialog = _session(relay)
    try:
        assert dialog.command(b"MAIL FROM:<a@example.com>" + params).startswith(b"250")
        reply = dialog.command(b"RCPT TO:<" + address + b">")
        assert reply.startswith(expected), reply
        assert dialog.command(b"DATA").startswith(b"503")  # no recipient was taken
    finally:
        dialog.close()
    assert len(spooled(relay)) == before


@pytest.mark.parametrize("engine", ENGINES)
def test_utf8_addresses_with_smtputf8_are_accepted(
    relays: dict[str, RelayProcess], engine: str
) -> None:
    relay = relays[engine]
    dialog = _session(relay)
    try:
        assert dialog.command(b"MAIL FROM:<" + UTF8 + b"> SMTPUTF8").startswith(b"250")
        assert dialog.command(b"RCPT TO:<" + "m\u00fcller@example.org".encode() + b">").startswith(
            b"250"
        )
        assert dialog.command(b"DATA").startswith(b"354")
        reply = dialog.command(b"Subject: utf8\r\n\r\nbody\r\n.")
        assert reply.startswith(b"250"), reply
    finally:
        dialog.close()
