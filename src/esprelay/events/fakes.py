"""Fake ESPs that sign events the way each real one does, for tests and benchmarks.

Every key and certificate is made here, at run time, with ``cryptography``:

- :class:`FakeSendgrid`: an ECDSA P-256 key pair; :attr:`FakeSendgrid.public_key` is
  what SendGrid's settings page would show (base64 DER);
- :class:`FakeMailgun`: a signing key, fresh tokens;
- :class:`FakeSns`: an RSA key and a self-signed certificate, served by
  :class:`CertServer`, a loopback HTTPS server (its own self-signed TLS certificate
  for 127.0.0.1) that also counts subscription confirmations.  Point the SES source's
  certificate host check at it with :meth:`CertServer.url_allowed` and fetch with
  :meth:`CertServer.client`;
- :class:`FakePostmark`: Basic credentials.

Each ``request`` method answers ``(body, headers)`` ready to post.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import ipaddress
import secrets
import ssl
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from esprelay.events import sendgrid
from esprelay.events.ses import canonical_text

Headers = dict[str, str]


def _now() -> float:
    return time.time()


def self_signed(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    ip: str | None = None,
    days: int = 30,
) -> x509.Certificate:
    """A self-signed certificate for ``key``, valid from an hour ago for ``days``."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
    )
    if ip is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
            critical=False,
        ).add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return builder.sign(key, hashes.SHA256())


class FakeSendgrid:
    """SendGrid's Signed Event Webhook."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        der = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_key = base64.b64encode(der).decode()

    def event(
        self,
        event: str,
        email: str,
        *,
        esprelay_id: str | None = None,
        message_id: str = "Lry_Mn4iQQ2wvqZkGdaUuw",
        **extra: Any,
    ) -> dict[str, Any]:
        item: dict[str, Any] = {
            "email": email,
            "timestamp": int(_now()),
            "event": event,
            "sg_event_id": base64.urlsafe_b64encode(secrets.token_bytes(16)).decode(),
            "sg_message_id": f"{message_id}.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0",
            "smtp-id": "<14c5d75ce93.dfd.64b469@ismtpd-555>",
            **extra,
        }
        if esprelay_id is not None:
            item[sendgrid.ID_ARG] = esprelay_id
        return item

    def request(
        self, events: list[dict[str, Any]] | bytes, *, timestamp: float | None = None
    ) -> tuple[bytes, Headers]:
        body = events if isinstance(events, bytes) else orjson.dumps(events)
        stamp = str(int(_now() if timestamp is None else timestamp))
        signature = self.key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return body, {
            "Content-Type": "application/json",
            sendgrid.SIGNATURE: base64.b64encode(signature).decode(),
            sendgrid.TIMESTAMP: stamp,
        }


class FakeMailgun:
    """Mailgun's webhooks (one event per request, signed with the webhook signing key)."""

    def __init__(self, signing_key: str | None = None) -> None:
        self.signing_key = signing_key or secrets.token_hex(16)

    def event(
        self,
        event: str,
        recipient: str,
        *,
        esprelay_id: str | None = None,
        message_id: str = "20240101120000.1.ABCDEF@mg.example.com",
        **extra: Any,
    ) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": secrets.token_urlsafe(16),
            "event": event,
            "timestamp": _now(),
            "recipient": recipient,
            "message": {"headers": {"message-id": message_id}},
            "user-variables": {} if esprelay_id is None else {"esprelay_id": esprelay_id},
            **extra,
        }
        return data

    def request(
        self,
        event_data: dict[str, Any],
        *,
        timestamp: float | None = None,
        token: str | None = None,
        key: str | None = None,
    ) -> tuple[bytes, Headers]:
        stamp = str(int(_now() if timestamp is None else timestamp))
        token = token or secrets.token_hex(25)
        signature = hmac.new(
            (key or self.signing_key).encode(), (stamp + token).encode(), hashlib.sha256
        ).hexdigest()
        body = {
            "signature": {"timestamp": stamp, "token": token, "signature": signature},
            "event-data": event_data,
        }
        return orjson.dumps(body), {"Content-Type": "application/json"}


class FakeSns:
    """An SNS topic that posts SES events, signed with its own certificate."""

    def __init__(self, topic_arn: str = "arn:aws:sns:eu-west-1:123456789012:ses-events") -> None:
        self.topic_arn = topic_arn
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.certificate = self_signed(self.key, "sns.amazonaws.com")
        self.certificate_pem = self.certificate.public_bytes(serialization.Encoding.PEM)

    def sign(self, message: dict[str, Any], version: str = "2") -> dict[str, Any]:
        algorithm: hashes.HashAlgorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
        signature = self.key.sign(canonical_text(message), padding.PKCS1v15(), algorithm)
        return {
            **message,
            "SignatureVersion": version,
            "Signature": base64.b64encode(signature).decode(),
        }

    def notification(
        self,
        ses_event: dict[str, Any] | str,
        *,
        cert_url: str,
        version: str = "2",
        topic_arn: str | None = None,
        message_id: str | None = None,
    ) -> tuple[bytes, Headers]:
        message = {
            "Type": "Notification",
            "MessageId": message_id or str(uuid.uuid4()),
            "TopicArn": topic_arn or self.topic_arn,
            "Message": ses_event
            if isinstance(ses_event, str)
            else orjson.dumps(ses_event).decode(),
            "Timestamp": _iso(_now()),
            "SigningCertURL": cert_url,
            "UnsubscribeURL": "https://sns.eu-west-1.amazonaws.com/?Action=Unsubscribe",
        }
        return self._request(self.sign(message, version), "Notification")

    def subscription_confirmation(
        self, *, subscribe_url: str, cert_url: str, topic_arn: str | None = None
    ) -> tuple[bytes, Headers]:
        message = {
            "Type": "SubscriptionConfirmation",
            "MessageId": str(uuid.uuid4()),
            "Token": secrets.token_hex(32),
            "TopicArn": topic_arn or self.topic_arn,
            "Message": "You have chosen to subscribe to the topic. To confirm, visit the URL.",
            "SubscribeURL": subscribe_url,
            "Timestamp": _iso(_now()),
            "SigningCertURL": cert_url,
        }
        return self._request(self.sign(message), "SubscriptionConfirmation")

    @staticmethod
    def _request(message: dict[str, Any], kind: str) -> tuple[bytes, Headers]:
        return orjson.dumps(message), {
            "Content-Type": "text/plain; charset=UTF-8",
            "x-amz-sns-message-type": kind,
        }

    @staticmethod
    def bounce(
        recipient: str,
        *,
        esprelay_id: str | None = None,
        message_id: str = "0102018c-ses-message-id-000000",
        permanent: bool = True,
    ) -> dict[str, Any]:
        """An SES ``Bounce`` event (configuration-set event publishing)."""
        tags = {"ses:configuration-set": ["esprelay"]}
        if esprelay_id is not None:
            tags["esprelay_id"] = [esprelay_id]
        return {
            "eventType": "Bounce",
            "bounce": {
                "bounceType": "Permanent" if permanent else "Transient",
                "bounceSubType": "General" if permanent else "MailboxFull",
                "bouncedRecipients": [
                    {
                        "emailAddress": recipient,
                        "action": "failed",
                        "status": "5.1.1" if permanent else "4.2.2",
                        "diagnosticCode": "smtp; 550 5.1.1 user unknown"
                        if permanent
                        else "smtp; 452 4.2.2 mailbox full",
                    }
                ],
                "timestamp": _iso(_now()),
                "feedbackId": "0102018c-feedback",
                "reportingMTA": "dsn; a1-2.smtp-out.eu-west-1.amazonses.com",
                "remoteMtaIp": "192.0.2.25",
            },
            "mail": {
                "timestamp": _iso(_now() - 5),
                "source": "sender@example.com",
                "messageId": message_id,
                "destination": [recipient],
                "tags": tags,
            },
        }


def _iso(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class CertServer:
    """A loopback HTTPS server in the role of SNS's hosts: ``/cert.pem`` serves the
    signing certificate, ``/confirm`` counts subscription confirmations."""

    def __init__(self, certificate_pem: bytes) -> None:
        self.certificate_pem = certificate_pem
        self.certificate_fetches = 0
        self.confirmations = 0
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._tls_key = ec.generate_private_key(ec.SECP256R1())
        self._tls_cert = self_signed(self._tls_key, "127.0.0.1", ip="127.0.0.1")
        self._directory = tempfile.TemporaryDirectory()

    @property
    def origin(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def cert_url(self) -> str:
        return f"{self.origin}/cert.pem"

    @property
    def subscribe_url(self) -> str:
        return f"{self.origin}/confirm?Action=ConfirmSubscription&Token=abc"

    def url_allowed(self, url: str, region: str) -> bool:
        """The certificate host check, pointed at this server (any region)."""
        del region
        parts = urlsplit(url)
        return parts.scheme == "https" and parts.netloc == f"127.0.0.1:{self.port}"

    def client(self) -> httpx.AsyncClient:
        """An HTTP client that trusts this server's certificate (and nothing else)."""
        pem = self._tls_cert.public_bytes(serialization.Encoding.PEM).decode()
        context = ssl.create_default_context(cadata=pem)
        return httpx.AsyncClient(verify=context, timeout=10.0)

    async def start(self) -> CertServer:
        directory = Path(self._directory.name)
        (directory / "key.pem").write_bytes(
            self._tls_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (directory / "cert.pem").write_bytes(
            self._tls_cert.public_bytes(serialization.Encoding.PEM)
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
        app = web.Application()
        app.router.add_get("/cert.pem", self._certificate)
        app.router.add_get("/confirm", self._confirm)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
        self._runner = runner
        self.port = runner.addresses[0][1]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._directory.cleanup()

    async def _certificate(self, request: web.Request) -> web.Response:
        self.certificate_fetches += 1
        return web.Response(body=self.certificate_pem, content_type="application/x-pem-file")

    async def _confirm(self, request: web.Request) -> web.Response:
        self.confirmations += 1
        return web.Response(text="<ConfirmSubscriptionResponse/>", content_type="text/xml")


class FakePostmark:
    """Postmark's webhooks: Basic credentials, nothing signed."""

    def __init__(self, user: str = "postmark", password: str | None = None) -> None:
        self.user = user
        self.password = password or secrets.token_urlsafe(24)

    @staticmethod
    def bounce(
        email: str,
        *,
        esprelay_id: str | None = None,
        message_id: str = "883953f4-6105-42a2-a16a-77a8eac79483",
        bounce_type: str = "HardBounce",
    ) -> dict[str, Any]:
        return {
            "RecordType": "Bounce",
            "ID": secrets.randbelow(10**10),
            "Type": bounce_type,
            "TypeCode": 1,
            "Name": "Hard bounce",
            "Tag": "",
            "MessageID": message_id,
            "ServerID": 23,
            "MessageStream": "outbound",
            "Description": "The server was unable to deliver your message (ex: unknown user).",
            "Details": "smtp;550 5.1.1 The email account that you tried to reach does not exist.",
            "Email": email,
            "From": "sender@example.com",
            "BouncedAt": _iso(_now()).replace("Z", "0000Z"),
            "Inactive": True,
            "CanActivate": True,
            "Subject": "Test subject",
            "Metadata": {} if esprelay_id is None else {"esprelay_id": esprelay_id},
        }

    def request(
        self, record: dict[str, Any], *, user: str | None = None, password: str | None = None
    ) -> tuple[bytes, Headers]:
        credentials = f"{user or self.user}:{password or self.password}".encode()
        return orjson.dumps(record), {
            "Content-Type": "application/json",
            "Authorization": "Basic " + base64.b64encode(credentials).decode(),
        }
