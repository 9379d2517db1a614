"""The adapter contract, as checks a provider's tests call.

Every built-in provider passes these (``tests/test_provider_conformance.py``), and a
third-party one can do the same from its own tests::

    from esprelay.testing.conformance import Probe, check_adapter

    def test_contract() -> None:
        check_adapter(
            MyProvider(httpx.AsyncClient(), ...),
            Probe(recipients=lambda request: ..., sender=lambda request: ...),
        )

``recipients(request)`` says whom a built request sends to and ``sender(request)`` as
whom, the way the ESP will read them: that is the one part of a request only the
provider's author knows how to read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import httpx

from esprelay.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from esprelay.models import Envelope, OutboundMessage
from esprelay.providers.base import Built, HttpProvider

#: A Bcc recipient: in the envelope, and in a Bcc header that must never be shown.
HIDDEN = "hidden@example.net"

#: Messages every provider must turn into a request (name -> raw, CRLF).
MESSAGES: dict[str, bytes] = {
    "plain": (
        b"From: App <app@example.com>\r\nTo: Bea <b@example.org>\r\nCc: c@example.org\r\n"
        b"Bcc: " + HIDDEN.encode() + b"\r\nSubject: plain\r\n"
        b"Message-ID: <conformance-1@example.com>\r\n\r\nHello.\r\n"
    ),
    "utf-8": (
        "From: =?utf-8?q?Caf=C3=A9?= <app@example.com>\r\nTo: b@example.org\r\n"
        "Subject: =?utf-8?b?R3LDvMOfZQ==?=\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
        "\r\nGrüße aus Köln\r\n"
    ).encode(),
    "raw 8-bit name": (
        b"From: Caf\xc3\xa9 <app@example.com>\r\nTo: b@example.org\r\nSubject: x\r\n\r\nb\r\n"
    ),
    "html and attachment": (
        b"From: app@example.com\r\nTo: b@example.org\r\nSubject: report\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"
        b"--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>Report</p>\r\n"
        b"--b1\r\nContent-Type: application/pdf; name=r.pdf\r\n"
        b"Content-Disposition: attachment; filename=r.pdf\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b1--\r\n"
    ),
    "to outside the envelope": (
        b"From: app@example.com\r\nTo: someone@elsewhere.example\r\nSubject: x\r\n\r\nb\r\n"
    ),
}
ENVELOPE = Envelope("app@example.com", ("b@example.org", "c@example.org", HIDDEN))


@dataclass(frozen=True)
class Probe:
    """How to read a built request of the provider under test."""

    #: Every address the request sends to (To, Cc, Bcc, envelope, personalizations...).
    recipients: Callable[[httpx.Request], set[str]]
    #: The sender address the ESP will use.
    sender: Callable[[httpx.Request], str]
    #: What recipients may see of the message (the raw MIME a raw provider sends, for
    #: one); the request body when not given.
    shown: Callable[[httpx.Request], bytes] | None = None


def check_adapter(provider: HttpProvider, probe: Probe) -> None:
    """Assert the request-building half of the contract on the standard messages."""
    for name, raw in MESSAGES.items():
        message = OutboundMessage(f"conformance-{name}", ENVELOPE, raw)
        built = provider.build_request(message)
        assert isinstance(built, Built), f"{name}: build_request must return Built"
        assert isinstance(built.request, httpx.Request), name
        assert all(isinstance(w, str) for w in built.warnings), f"{name}: warnings are str"
        again = provider.build_request(message)
        assert (again.request.method, again.request.url) == (
            built.request.method,
            built.request.url,
        ), f"{name}: build_request must be pure"
        # The envelope decides who receives, no more, no less (RFC 5321).
        got = {a.lower() for a in probe.recipients(built.request)}
        assert got == {a.lower() for a in ENVELOPE.rcpt_tos}, (name, got)
        assert probe.sender(built.request).lower() == "app@example.com", name
        # A Bcc is delivered but never shown: no Bcc header in what recipients see.
        shown = probe.shown(built.request) if probe.shown else built.request.read()
        head = b"\n" + shown.split(b"\r\n\r\n", 1)[0].lower()
        assert b"\nbcc:" not in head, f"{name}: the Bcc header is shown"


#: HTTP statuses and the half of the error tree each must land in.
STATUSES: dict[int, type[DeliveryError]] = {
    429: TransientDeliveryError,
    500: TransientDeliveryError,
    502: TransientDeliveryError,
    503: TransientDeliveryError,
    400: PermanentDeliveryError,
    413: PermanentDeliveryError,
}


def check_errors(
    provider: HttpProvider, statuses: dict[int, type[DeliveryError]] = STATUSES
) -> None:
    """Assert that error answers map onto the tree: 4xx permanent, 429/5xx transient.

    The body is a generic one; pass ``statuses`` to pin an ESP's own quirks.
    """
    request = httpx.Request("POST", "https://esp.example/send")
    for status, expected in statuses.items():
        response = httpx.Response(
            status, json={"message": "conformance"}, request=request, headers={"Retry-After": "1"}
        )
        error = provider.classify_error(response)
        assert isinstance(error, expected), (status, type(error).__name__)
        assert isinstance(error, DeliveryError), status
