"""Signed and encrypted messages (S/MIME, PGP/MIME): what each provider does with them.

A JSON adapter (SendGrid, Postmark) rebuilds the message, which breaks the signature:
``mime.signed_reason`` says why a message cannot go that way (for the intake's refusal
with ``ESPRELAY_SIGNED_MESSAGES=refuse``), and with ``warn`` the adapters deliver the
signed content with a warning.  The raw-MIME providers (Mailgun, SES) send the signed
bytes exactly as received.
"""

from __future__ import annotations

import base64
import os
import smtplib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from esprelay.config import load_settings
from esprelay.errors import ConfigError
from esprelay.message.mime import ParsedMessage, parse, signed_reason
from esprelay.models import Envelope, OutboundMessage
from esprelay.providers import postmark, sendgrid
from esprelay.testing.fakeesp import FakeESP, Recorded, Reply
from tests.messages import crlf
from tests.providers import test_mailgun, test_ses
from tests.relayproc import RelayProcess

ENVELOPE = Envelope("s@example.com", ("r@example.org",))
Build = Callable[[ParsedMessage], tuple[dict[str, Any], list[str]]]
BUILDERS: dict[str, Build] = {
    "sendgrid": sendgrid.build_payload,
    "postmark": lambda parsed: postmark.build_payload(parsed),
}
builders = pytest.mark.parametrize("build", BUILDERS.values(), ids=BUILDERS.keys())
SIGNATURE = base64.encodebytes(bytes(range(256))).decode()  # stands for a CMS blob

SIGNED_CONTENT = (
    'Content-Type: multipart/alternative; boundary="ALT"\n\n'
    "--ALT\nContent-Type: text/plain; charset=utf-8\n\nSigned text.\n"
    "--ALT\nContent-Type: text/html; charset=utf-8\n\n<p>Signed text.</p>\n--ALT--\n"
)
SMIME = crlf(
    "From: s@example.com\nTo: r@example.org\nSubject: signed\nMIME-Version: 1.0\n"
    'Content-Type: multipart/signed; protocol="application/pkcs7-signature";\n'
    ' micalg=sha-256; boundary="SIG"\n\n'
    "This is a cryptographically signed message in MIME format.\n\n"
    f"--SIG\n{SIGNED_CONTENT}\n"
    "--SIG\nContent-Type: application/pkcs7-signature; name=smime.p7s\n"
    "Content-Transfer-Encoding: base64\n"
    f"Content-Disposition: attachment; filename=smime.p7s\n\n{SIGNATURE}\n--SIG--\n"
)
PGP = crlf(
    "From: s@example.com\nTo: r@example.org\nSubject: signed\nMIME-Version: 1.0\n"
    'Content-Type: Multipart/Signed; micalg=pgp-sha256;\n protocol="application/pgp-signature";'
    ' boundary="SIG"\n\n'
    "--SIG\nContent-Type: text/plain; charset=utf-8\n\nSigned text.\n"
    "--SIG\nContent-Type: application/pgp-signature; name=signature.asc\n\n"
    "-----BEGIN PGP SIGNATURE-----\nabc\n-----END PGP SIGNATURE-----\n--SIG--\n"
)
PGP_ENCRYPTED = crlf(
    "From: s@example.com\nTo: r@example.org\nSubject: secret\nMIME-Version: 1.0\n"
    'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary="E"\n\n'
    "--E\nContent-Type: application/pgp-encrypted\n\nVersion: 1\n"
    "--E\nContent-Type: application/octet-stream; name=encrypted.asc\n\n"
    "-----BEGIN PGP MESSAGE-----\nabc\n-----END PGP MESSAGE-----\n--E--\n"
)
SMIME_ENVELOPED = crlf(
    "From: s@example.com\nTo: r@example.org\nSubject: secret\nMIME-Version: 1.0\n"
    'Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name="smime.p7m"\n'
    "Content-Transfer-Encoding: base64\n"
    'Content-Disposition: attachment; filename="smime.p7m"\n\n' + SIGNATURE
)
# A mailing list wraps the signed message and adds a footer: still signed inside.
LIST_FOOTER = crlf(
    "From: s@example.com\nTo: r@example.org\nSubject: signed\nMIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="LIST"\n\n'
    "--LIST\n"
    + SMIME.decode().split("MIME-Version: 1.0\r\n", 1)[1].replace("\r\n", "\n")
    + "\n--LIST\nContent-Type: text/plain\n\nList footer\n--LIST--\n"
)
# A signed message forwarded as an attachment is carried whole, signature intact.
FORWARDED = crlf(
    "From: s@example.com\nTo: r@example.org\nSubject: fwd\nMIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="FWD"\n\n'
    "--FWD\nContent-Type: text/plain\n\nSee below.\n"
    "--FWD\nContent-Type: message/rfc822\n\n" + SMIME.decode().replace("\r\n", "\n") + "\n--FWD--\n"
)
# An S/MIME file attached to an ordinary message is just a file.
ATTACHED_P7M = crlf(
    "From: s@example.com\nTo: r@example.org\nSubject: file\nMIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="F"\n\n'
    "--F\nContent-Type: text/plain\n\nThe file, as asked.\n"
    "--F\nContent-Type: application/pkcs7-mime; name=archive.p7m\n"
    "Content-Disposition: attachment; filename=archive.p7m\n\nabc\n--F--\n"
)
PLAIN = crlf(
    "From: s@example.com\nTo: r@example.org\nSubject: signed, sealed, delivered\n\n"
    "Signed, sealed: multipart/signed is only text here.\n"
)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (
            SMIME,
            "S/MIME-signed (multipart/signed; protocol=application/pkcs7-signature)",
        ),
        (PGP, "PGP/MIME-signed (multipart/signed; protocol=application/pgp-signature)"),
        (
            PGP_ENCRYPTED,
            "PGP/MIME-encrypted (multipart/encrypted; protocol=application/pgp-encrypted)",
        ),
        (
            SMIME_ENVELOPED,
            "S/MIME-encrypted (application/pkcs7-mime; smime-type=enveloped-data)",
        ),
        (LIST_FOOTER, "S/MIME-signed (multipart/signed; protocol=application/pkcs7-signature)"),
        (FORWARDED, None),
        (ATTACHED_P7M, None),
        (PLAIN, None),
    ],
    ids=["smime", "pgp", "pgp-encrypted", "smime-enveloped", "list", "fwd", "p7m-file", "plain"],
)
def test_signed_reason(raw: bytes, reason: str | None) -> None:
    assert signed_reason(raw) == reason
    assert parse(raw, ENVELOPE) == parse(raw, ENVELOPE, exact=True)


def test_signed_reason_is_case_blind_and_reads_the_message_not_the_text() -> None:
    assert signed_reason(SMIME.replace(b"multipart/signed", b"MULTIPART/SIGNED")) is not None
    assert signed_reason(SMIME.replace(b"multipart/signed", b"multipart/mixed")) is None


@builders
@pytest.mark.parametrize("raw", [SMIME, PGP], ids=["smime", "pgp"])
def test_json_adapters_deliver_the_signed_content_with_a_warning(build: Build, raw: bytes) -> None:
    payload, warnings = build(parse(raw, ENVELOPE))
    (note,) = [w for w in warnings if "-signed (multipart/signed" in w]
    assert "sent unsigned" in note and "ESPRELAY_SIGNED_MESSAGES" in note
    text = payload.get("TextBody") or payload["content"][0]["value"]
    assert text.strip() == "Signed text."
    # The signature part cannot verify any more: it is not sent as a stray file.
    attachments = payload.get("Attachments") or payload.get("attachments") or []
    assert attachments == []


@builders
def test_json_adapters_send_encrypted_parts_as_attachments_with_a_warning(build: Build) -> None:
    payload, warnings = build(parse(PGP_ENCRYPTED, ENVELOPE))
    assert any("PGP/MIME-encrypted" in w and "as attachments" in w for w in warnings)
    attachments = payload.get("Attachments") or payload.get("attachments")
    assert len(attachments) == 2


def test_mailgun_sends_the_signed_bytes_exactly() -> None:
    for raw in (SMIME, PGP, PGP_ENCRYPTED, SMIME_ENVELOPED):
        message = OutboundMessage("m1", ENVELOPE, raw)
        request = (
            test_mailgun.provider(httpx.AsyncClient(), "https://api.mailgun.net")
            .build_request(message)
            .request
        )
        recorded = Recorded("POST", request.url.path, {}, dict(request.headers), request.read())
        (sent,) = [v for name, _, v in test_mailgun.form_fields(recorded) if name == "message"]
        assert sent == raw


def test_ses_sends_the_signed_bytes_exactly() -> None:
    for raw in (SMIME, PGP, PGP_ENCRYPTED, SMIME_ENVELOPED):
        message = OutboundMessage("m1", ENVELOPE, raw)
        request = test_ses.provider(httpx.AsyncClient()).build_request(message).request
        assert test_ses.raw_data(request) == raw


def test_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for key in list(os.environ):
        if key.startswith("ESPRELAY_"):
            monkeypatch.delenv(key)
    assert load_settings(env_file=None).signed_messages == "refuse"
    monkeypatch.setenv("ESPRELAY_SIGNED_MESSAGES", "warn")
    assert load_settings(env_file=None).signed_messages == "warn"
    monkeypatch.setenv("ESPRELAY_SIGNED_MESSAGES", "strip")
    with pytest.raises(ConfigError, match="ESPRELAY_SIGNED_MESSAGES"):
        load_settings(env_file=None)


# --- end to end: refused at the end of DATA, or sent with a warning ------------------


def _send(relay: RelayProcess, raw: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        assert smtp.mail("s@example.com")[0] == 250
        assert smtp.rcpt("r@example.org")[0] == 250
        return smtp.data(raw)


@pytest.mark.parametrize("mode", ["refuse", "warn"])
def test_a_signed_message_through_a_json_provider(
    mode: str, relay_factory: type[RelayProcess]
) -> None:
    with FakeESP(lambda request: Reply(202, b"", {"X-Message-Id": "sg-1"})) as esp:
        relay = relay_factory(
            {
                "ESPRELAY_PROVIDER": "sendgrid",
                "ESPRELAY_SENDGRID_API_KEY": "SG.key",
                "ESPRELAY_SENDGRID_API_URL": esp.url,
                "ESPRELAY_SIGNED_MESSAGES": mode,
            }
        ).start()
        code, reply = _send(relay, PGP)
        if mode == "refuse":
            assert code == 554 and reply.startswith(b"5.6.3 PGP/MIME-signed"), reply
            assert b"ESPRELAY_SIGNED_MESSAGES" in reply
            assert esp.requests == []
        else:
            assert code == 250, reply
            esp.wait_for(1)
            relay.wait_for_log("PGP/MIME-signed")  # the warning, with the message id
        # An unsigned message goes either way.
        assert _send(relay, crlf("From: s@example.com\nSubject: x\n\nplain\n"))[0] == 250


def test_a_signed_message_through_a_raw_provider_is_not_refused(
    relay_factory: type[RelayProcess],
) -> None:
    relay = relay_factory({"ESPRELAY_SIGNED_MESSAGES": "refuse"}).start()  # the outbox
    code, reply = _send(relay, SMIME)
    assert code == 250, reply
    (message_id,) = relay.wait_delivered(1)
    assert (relay.outbox / f"{message_id}.eml").read_bytes() == SMIME
