"""Microsoft Graph: the request builder offline, then against a fake Graph and a fake
token endpoint on loopback, and esprelay end to end through SMTP.

A fake Microsoft Graph and Microsoft identity platform token endpoint on loopback.

Faithful to what Microsoft documents:

- ``POST /{tenant}/oauth2/v2.0/token`` (client credentials, a secret or a signed JWT
  assertion): ``200 {"token_type": "Bearer", "expires_in", "access_token"}``; a wrong
  secret or assertion ``401 {"error": "invalid_client", "error_description":
  "AADSTS7000215: ..."}`` (https://learn.microsoft.com/en-us/entra/identity-platform/
  v2-oauth2-client-creds-grant-flow).
- ``POST /v1.0/users/{mailbox}/sendMail`` with ``Content-Type: text/plain`` and base64
  MIME: ``202`` and no body; ``401 InvalidAuthenticationToken`` for a token it did not
  issue; ``400 ErrorMimeContentInvalidBase64String`` ("Invalid base64 string for MIME
  content."); ``403 ErrorSendAsDenied`` when the From address is not the mailbox;
  ``413`` above the 4 MB request limit (https://learn.microsoft.com/en-us/graph/api/
  user-sendmail, https://learn.microsoft.com/en-us/graph/errors).
- Messages over 4 MB (https://learn.microsoft.com/en-us/graph/outlook-large-attachments):
  ``POST /v1.0/users/{mailbox}/messages`` with base64 MIME creates a draft, ``201`` and
  the message with its ``id`` (user-post-messages); ``POST .../messages/{id}/attachments``
  with a ``#microsoft.graph.fileAttachment`` under 3 MB, ``201``; ``POST
  .../attachments/createUploadSession`` with an ``AttachmentItem`` (3 to 150 MB),
  ``201`` and an uploadSession whose ``uploadUrl`` (here on the fake's own address)
  takes ``PUT``s without an Authorization header, ``Content-Range: bytes a-b/total``,
  contiguous, each a multiple of 320 KiB but the last and at most 4 MB: ``200`` with
  ``nextExpectedRanges`` (``["{next}"]``), the last ``201`` with a Location; ``POST
  .../messages/{id}/send`` ``202``; ``DELETE .../messages/{id}`` ``204``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.message
import email.policy
import itertools
import logging
import re
import smtplib
import threading
import time
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.utils import getaddresses, parseaddr
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any
from urllib.parse import parse_qs, unquote

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from pydantic import SecretStr

from esprelay.clock import SYSTEM_CLOCK
from esprelay.errors import (
    ConfigError,
    DeliveryError,
    MessageRejected,
    ProviderConfigError,
    ProviderUnavailable,
    RateLimited,
)
from esprelay.models import Envelope, OutboundMessage
from esprelay.providers.graph import MAX_MESSAGE_SIZE, GraphProvider
from esprelay.providers.graphauth import Certificate, TokenSource, graph_scope, token_url
from esprelay.providers.registry import configure, get_kind
from esprelay.testing.fakeesp import FakeESP, Recorded, Reply
from tests.fakeclock import FakeClock
from tests.relayproc import RelayProcess
from tests.test_e2e_smtp import queued_id, send_raw

TENANT = "11111111-2222-3333-4444-555555555555"
CLIENT_ID = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
SECRET = "s3cr3t~value.for-tests-only"
REQUEST_LIMIT = 4 * 1024 * 1024


def graph_error(status: int, code: str, message: str, **headers: str) -> Reply:
    body = {"error": {"code": code, "message": message, "innerError": {"request-id": "r1"}}}
    return Reply(status, body, dict(headers))


@dataclass
class Attached:
    """An attachment added to a draft through Graph (not in its MIME)."""

    name: str
    content_type: str
    is_inline: bool
    content_id: str | None
    data: bytes
    via: str  # "post" or "session"


@dataclass
class Draft:
    mailbox: str
    mime: bytes
    attachments: list[Attached] = field(default_factory=list)


@dataclass
class Session:
    draft_id: str
    item: dict[str, Any]
    received: bytearray = field(default_factory=bytearray)
    puts: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Sent:
    mailbox: str
    mime: bytes
    attachments: list[Attached] = field(default_factory=list)

    def parsed(self) -> email.message.EmailMessage:
        return BytesParser(policy=email.policy.default).parsebytes(self.mime)  # type: ignore[return-value]

    def recipients(self) -> set[str]:
        """Whom Exchange sends to: the To, Cc and Bcc addresses of the MIME."""
        message = BytesParser(policy=email.policy.compat32).parsebytes(self.mime)
        values = [str(v) for name in ("To", "Cc", "Bcc") for v in message.get_all(name, [])]
        return {address.lower() for _, address in getaddresses(values) if address}


@dataclass
class FakeGraph:
    """``with FakeGraph() as graph: graph.url ... graph.sent``"""

    secret: str = SECRET
    public_key: RSAPublicKey | None = None
    thumbprint_x5t: str = ""
    expires_in: int = 3599
    latency: float = 0.0
    sent: list[Sent] = field(default_factory=list)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    issued: set[str] = field(default_factory=set)
    in_flight: dict[str, int] = field(default_factory=dict)
    most_in_flight: dict[str, int] = field(default_factory=dict)
    drafts: dict[str, Draft] = field(default_factory=dict)
    sessions: dict[str, Session] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    #: Answer the PUTs to upload URLs with these numbers (1 = the first PUT) with 500.
    fail_puts: set[int] = field(default_factory=set)
    puts: int = 0
    #: Answer DELETEs of drafts with 503 (the draft stays).
    fail_deletes: bool = False
    #: What the upload URL refused (a test asserts there is nothing).
    problems: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _counter: itertools.count[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.esp = FakeESP(self.respond)

    def __enter__(self) -> FakeGraph:
        self.esp.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.esp.__exit__(*exc)

    @property
    def url(self) -> str:
        return self.esp.url

    @property
    def token_url(self) -> str:
        return f"{self.url}/{TENANT}/oauth2/v2.0/token"

    def respond(self, request: Recorded) -> Reply:
        if request.path == f"/{TENANT}/oauth2/v2.0/token":
            return self.token(request)
        parts = request.path.split("/")
        if len(parts) == 3 and parts[1] == "upload" and request.method == "PUT":
            return self.upload(request, parts[2])
        if len(parts) < 5 or parts[1:3] != ["v1.0", "users"]:
            return graph_error(404, "ResourceNotFound", f"Resource not found for {request.path}")
        mailbox, rest = unquote(parts[3]), [unquote(p) for p in parts[4:]]
        if not self.authorized(request):
            return graph_error(
                401, "InvalidAuthenticationToken", "Access token has expired or is not yet valid."
            )
        if rest == ["sendMail"] and request.method == "POST":
            return self.send_mail(request, mailbox)
        if rest == ["messages"] and request.method == "POST":
            return self.create_draft(request, mailbox)
        if rest[:1] != ["messages"] or len(rest) < 2:
            return graph_error(404, "ResourceNotFound", f"Resource not found for {request.path}")
        with self._lock:
            draft = self.drafts.get(rest[1])
        if draft is None or draft.mailbox.lower() != mailbox.lower():
            return graph_error(404, "ErrorItemNotFound", "The specified object was not found.")
        action = (request.method, *rest[2:])
        if action == ("DELETE",):
            if self.fail_deletes:
                return graph_error(503, "ServiceUnavailable", "Service unavailable.")
            with self._lock:
                self.drafts.pop(rest[1], None)
                self.deleted.append(rest[1])
            return Reply(204)
        if action == ("POST", "attachments"):
            return self.add_attachment(request, draft)
        if action == ("POST", "attachments", "createUploadSession"):
            return self.create_upload_session(request, rest[1], draft)
        if action == ("POST", "send"):
            return self.send_draft(rest[1], draft)
        return graph_error(405, "BadRequest", f"{request.method} {request.path}")

    def authorized(self, request: Recorded) -> bool:
        authorization = request.headers.get("authorization", "")
        with self._lock:
            return authorization.removeprefix("Bearer ") in self.issued

    def token(self, request: Recorded) -> Reply:
        assert request.method == "POST"
        assert request.headers["content-type"] == "application/x-www-form-urlencoded"
        form = {k: v[0] for k, v in parse_qs(request.body.decode()).items()}
        with self._lock:
            self.token_requests.append(form)
        invalid = Reply(
            401,
            {
                "error": "invalid_client",
                "error_description": "AADSTS7000215: Invalid client secret provided.\r\n"
                "Trace ID: 0000",
                "error_codes": [7000215],
            },
        )
        if form.get("grant_type") != "client_credentials" or form.get("client_id") != CLIENT_ID:
            return Reply(400, {"error": "unauthorized_client", "error_description": "AADSTS700016"})
        if form.get("scope") != f"{self.url}/.default":
            return Reply(400, {"error": "invalid_scope", "error_description": "AADSTS70011"})
        if "client_secret" in form:
            if form["client_secret"] != self.secret:
                return invalid
        elif self.public_key is not None:
            assertion = form.get("client_assertion", "")
            assert form["client_assertion_type"] == (
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
            )
            try:
                header = jwt.get_unverified_header(assertion)
                claims = jwt.decode(
                    assertion,
                    self.public_key,
                    algorithms=["RS256"],
                    audience=self.token_url,
                    issuer=CLIENT_ID,
                    options={"require": ["exp", "nbf", "jti", "sub"]},
                )
            except jwt.PyJWTError:
                return invalid
            if header.get("x5t") != self.thumbprint_x5t or claims["sub"] != CLIENT_ID:
                return invalid
        else:
            return invalid
        token = f"eyJ0eXAi.fake-token-{next(self._counter)}"
        with self._lock:
            self.issued.add(token)
        return Reply(
            200, {"token_type": "Bearer", "expires_in": self.expires_in, "access_token": token}
        )

    def mime_of(self, request: Recorded) -> bytes | Reply:
        """The MIME of a sendMail or create-message request, or Graph's error."""
        if len(request.body) > REQUEST_LIMIT:
            return graph_error(413, "RequestEntityTooLarge", "The request is too large.")
        if request.headers.get("content-type") != "text/plain":
            return graph_error(400, "ErrorInvalidRequest", "Unsupported content type")
        try:
            return base64.b64decode(request.body, validate=True)
        except binascii.Error:
            return graph_error(
                400,
                "ErrorMimeContentInvalidBase64String",
                "Invalid base64 string for MIME content.",
            )

    @staticmethod
    def send_as_denied(mime: bytes, mailbox: str) -> Reply | None:
        message = BytesParser(policy=email.policy.compat32).parsebytes(mime)
        sender = parseaddr(str(message.get("From", "")))[1]
        if sender.lower() != mailbox.lower():
            return graph_error(
                403,
                "ErrorSendAsDenied",
                "The user account which was used to submit this request does not have the"
                " right to send mail on behalf of the specified sending account.",
            )
        return None

    def create_draft(self, request: Recorded, mailbox: str) -> Reply:
        mime = self.mime_of(request)
        if isinstance(mime, Reply):
            return mime
        draft_id = f"AAMkAGI2TG93AAA{next(self._counter)}="
        with self._lock:
            self.drafts[draft_id] = Draft(mailbox, mime)
        subject = BytesParser(policy=email.policy.default).parsebytes(mime)["Subject"]
        return Reply(201, {"id": draft_id, "isDraft": True, "subject": str(subject or "")})

    def add_attachment(self, request: Recorded, draft: Draft) -> Reply:
        if len(request.body) > REQUEST_LIMIT:
            return graph_error(413, "RequestEntityTooLarge", "The request is too large.")
        body = request.json()
        if body.get("@odata.type") != "#microsoft.graph.fileAttachment":
            return graph_error(400, "ErrorInvalidRequest", "Invalid attachment type")
        data = base64.b64decode(body["contentBytes"], validate=True)
        if len(data) >= 3 * 1024 * 1024:
            return graph_error(413, "ErrorAttachmentSizeLimitExceeded", "Use an upload session")
        attached = Attached(
            body["name"], body["contentType"], body["isInline"], body.get("contentId"), data, "post"
        )
        with self._lock:
            draft.attachments.append(attached)
        return Reply(201, {"id": f"AAMkAtt{next(self._counter)}=", "name": body["name"]})

    def create_upload_session(self, request: Recorded, draft_id: str, draft: Draft) -> Reply:
        item = request.json().get("AttachmentItem") or {}
        if item.get("attachmentType") != "file" or not item.get("name"):
            return graph_error(400, "ErrorInvalidRequest", "Invalid AttachmentItem")
        if not 0 < int(item.get("size", 0)) <= 150 * 1024 * 1024:
            return graph_error(400, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize", "size")
        key = f"sess{next(self._counter)}"
        with self._lock:
            self.sessions[key] = Session(draft_id, item)
        return Reply(
            201,
            {
                "@odata.context": f"{self.url}/v1.0/$metadata#microsoft.graph.uploadSession",
                "uploadUrl": f"{self.url}/upload/{key}",
                "expirationDateTime": "2030-01-01T00:00:00.0000000Z",
                "nextExpectedRanges": ["0-"],
            },
        )

    def upload(self, request: Recorded, key: str) -> Reply:
        with self._lock:
            self.puts += 1
            number = self.puts
            session = self.sessions.get(key)
        if session is None:
            return graph_error(404, "ErrorItemNotFound", "The upload session was not found.")
        if number in self.fail_puts:
            return graph_error(500, "InternalServerError", "An internal server error occurred.")
        problem = self.upload_problem(request, session)
        if problem:
            with self._lock:
                self.problems.append(problem)
            return graph_error(400, "InvalidRequest", problem)
        found = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", request.headers["content-range"])
        assert found is not None
        start, end, total = (int(g) for g in found.groups())
        last = end + 1 == total
        with self._lock:
            session.received += request.body
            session.puts.append((start, end))
        if not last:
            return Reply(
                200,
                {
                    "expirationDateTime": "2030-01-01T00:00:00.0000000Z",
                    "nextExpectedRanges": [f"{end + 1}"],
                },
            )
        item = session.item
        attached = Attached(
            item["name"],
            item.get("contentType", "application/octet-stream"),
            bool(item.get("isInline")),
            item.get("contentId"),
            bytes(session.received),
            "session",
        )
        with self._lock:
            draft = self.drafts.get(session.draft_id)
            if draft is not None:
                draft.attachments.append(attached)
        location = f"{self.url}/v1.0/Users('x')/Messages('{session.draft_id}')/Attachments('a')"
        return Reply(201, b"", {"Location": location})

    @staticmethod
    def upload_problem(request: Recorded, session: Session) -> str:
        """Why Outlook would refuse this PUT to an upload URL, or ``""``."""
        # The URL is pre-authenticated: a PUT that carries a token is refused.
        if "authorization" in request.headers:
            return "an Authorization header on a PUT to the upload URL"
        found = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", request.headers.get("content-range", ""))
        if found is None:
            return f"Content-Range {request.headers.get('content-range')!r}"
        start, end, total = (int(g) for g in found.groups())
        if total != int(session.item["size"]) or start != len(session.received):
            return f"range {start}-{end}/{total}, expected {len(session.received)}-"
        if end - start + 1 != len(request.body) or len(request.body) > REQUEST_LIMIT:
            return f"range {start}-{end} with {len(request.body)} bytes"
        if end + 1 != total and len(request.body) % 327_680:
            return f"a chunk of {len(request.body)} bytes, not a multiple of 320 KiB"
        return ""

    def send_draft(self, draft_id: str, draft: Draft) -> Reply:
        denied = self.send_as_denied(draft.mime, draft.mailbox)
        if denied is not None:
            return denied
        with self._lock:
            self.drafts.pop(draft_id, None)
            self.sent.append(Sent(draft.mailbox, draft.mime, list(draft.attachments)))
        return Reply(202)

    def send_mail(self, request: Recorded, mailbox: str) -> Reply:
        mime = self.mime_of(request)
        if isinstance(mime, Reply):
            return mime
        denied = self.send_as_denied(mime, mailbox)
        if denied is not None:
            return denied
        key = mailbox.lower()
        with self._lock:
            self.in_flight[key] = self.in_flight.get(key, 0) + 1
            self.most_in_flight[key] = max(self.most_in_flight.get(key, 0), self.in_flight[key])
        try:
            if self.latency:
                time.sleep(self.latency)  # the service's own latency, not synchronisation
        finally:
            with self._lock:
                self.in_flight[key] -= 1
                self.sent.append(Sent(mailbox, mime))
        return Reply(202)


# -- helpers -----------------------------------------------------------------------------

MAILBOX = "app@example.com"
RAW = (
    b"From: App <app@example.com>\r\n"
    b"To: Bea <b@example.org>\r\n"
    b"Cc: c@example.org\r\n"
    b"Bcc: hidden@example.net\r\n"
    b"Subject: report\r\n"
    b"\r\n"
    b"Hello.\r\n"
)


def provider(client: httpx.AsyncClient, url: str, **kw: Any) -> GraphProvider:
    secret = kw.pop("secret", SECRET)
    certificate = kw.pop("certificate", None)
    clock = kw.pop("clock", SYSTEM_CLOCK)
    tokens = TokenSource(
        client,
        url=token_url(url, TENANT),
        client_id=CLIENT_ID,
        scope=graph_scope(url),
        secret=None if certificate else SecretStr(secret),
        certificate=certificate,
        clock=clock,
    )
    return GraphProvider(client, tokens=tokens, api_url=url, clock=clock, **kw)


def outbound(
    raw: bytes = RAW, rcpts: tuple[str, ...] = ("b@example.org",), sender: str = MAILBOX
) -> OutboundMessage:
    return OutboundMessage("m1", Envelope(sender, rcpts), raw)


def sent_mime(request: httpx.Request) -> bytes:
    return base64.b64decode(request.read())


# -- the request, offline ----------------------------------------------------------------


def test_request_is_the_mime_sendmail_of_the_from_mailbox() -> None:
    rcpts = ("b@example.org", "c@example.org", "hidden@example.net", "only@example.net")
    graph = provider(httpx.AsyncClient(), "https://graph.example")
    built = graph.build_request(outbound(rcpts=rcpts))
    request = built.request
    assert request.method == "POST"
    assert str(request.url) == "https://graph.example/v1.0/users/app@example.com/sendMail"
    assert request.headers["content-type"] == "text/plain"
    assert "authorization" not in request.headers  # added when sent
    mime = sent_mime(request)
    head, body = mime.split(b"\r\n\r\n", 1)
    # To and Cc as written (all in the envelope); the hidden ones in one Bcc field that
    # Exchange reads as Bcc recipients and never writes into what it sends.
    assert head.split(b"\r\n") == [
        b"From: App <app@example.com>",
        b"To: Bea <b@example.org>",
        b"Cc: c@example.org",
        b"Subject: report",
        b"Bcc: hidden@example.net,",
        b" only@example.net",
    ]
    assert body == b"Hello.\r\n"
    assert Sent(MAILBOX, mime).recipients() == set(rcpts)
    assert any("Bcc" in w for w in built.warnings)


def test_to_outside_the_envelope_is_not_mailed_and_bcc_only_message() -> None:
    raw = (
        b"From: app@example.com\r\n"
        b'To: "Doe, Jane" <jane@example.org>, someone@elsewhere.example\r\n'
        b"Cc: nobody@elsewhere.example\r\n"
        b"Subject: x\r\n\r\nb\r\n"
    )
    graph = provider(httpx.AsyncClient(), "https://graph.example")
    mime = sent_mime(graph.build_request(outbound(raw, ("jane@example.org",))).request)
    assert mime.split(b"\r\n\r\n")[0].split(b"\r\n") == [
        b"From: app@example.com",
        b'To: "Doe, Jane" <jane@example.org>',
        b"Subject: x",
    ]
    # Bcc only: no To, no Cc; every recipient reached through the Bcc field.
    raw = b"From: app@example.com\r\nSubject: bcc only\r\n\r\nb\r\n"
    rcpts = ("x@example.org", "y@example.org")
    mime = sent_mime(graph.build_request(outbound(raw, rcpts)).request)
    assert Sent(MAILBOX, mime).recipients() == set(rcpts)
    assert b"\r\nBcc: x@example.org,\r\n y@example.org\r\n\r\n" in mime


def test_quoted_printable_goes_as_base64_and_signed_parts_stay() -> None:
    # A soft line break followed by hex digits: what Graph's re-encoding misreads.
    qp_text = b'class=3D"ab=\r\ncd" caf=C3=A9 =\r\n' + b"x" * 70 + b"=\r\nEF end\r\n"
    raw = (
        b"From: app@example.com\r\nTo: b@example.org\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="o"\r\n\r\n'
        b"--o\r\nContent-Type: text/html; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + qp_text + b"--o\r\n"
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature";'
        b' micalg=sha-256; boundary="s"\r\n\r\n'
        b"--s\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n"
        b"\r\nsigned =C3=A9\r\n--s\r\nContent-Type: application/pkcs7-signature\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nAAAA\r\n--s--\r\n--o--\r\n"
    )
    graph = provider(httpx.AsyncClient(), "https://graph.example")
    built = graph.build_request(outbound(raw))
    mime = sent_mime(built.request)
    parsed = BytesParser(policy=email.policy.default).parsebytes(mime)
    html, signed = parsed.iter_parts()
    assert html["Content-Transfer-Encoding"] == "base64"
    # (the line ending before a delimiter belongs to the delimiter, RFC 2046)
    assert html.get_payload(decode=True) == binascii.a2b_qp(qp_text.removesuffix(b"\r\n"))
    # The signed subtree keeps its bytes (its signature covers them).
    assert b"signed =C3=A9\r\n" in mime and signed.get_content_type() == "multipart/signed"
    assert "re-encoded 1 quoted-printable part(s) as base64 for Graph" in built.warnings


def test_sender_modes_and_allowed_senders() -> None:
    client = httpx.AsyncClient()
    message = outbound(sender="bounce@example.com")
    assert provider(client, "http://g").mailbox(message) == MAILBOX
    assert provider(client, "http://g", sender_mode="envelope").mailbox(message) == (
        "bounce@example.com"
    )
    fixed = provider(client, "http://g", sender_mode="fixed", sender="relay@example.com")
    assert fixed.mailbox(message) == "relay@example.com"
    allowed = provider(client, "http://g", allowed_senders=["@example.com"])
    assert allowed.refusal(message) is None
    strict = provider(client, "http://g", allowed_senders=["ops@example.com"])
    assert strict.refusal(message) == (
        "mailbox app@example.com is not in ESPRELAY_GRAPH_ALLOWED_SENDERS"
        " (the app may not send as it)"
    )
    with pytest.raises(MessageRejected, match="not in ESPRELAY_GRAPH_ALLOWED_SENDERS"):
        strict.build_request(message)
    null = provider(client, "http://g", sender_mode="envelope")
    assert "null sender" in (null.refusal(outbound(sender="")) or "")
    assert "no From address" in (
        provider(client, "http://g").refusal(outbound(b"Subject: x\r\n\r\nb\r\n")) or ""
    )


def test_size_limit_after_base64() -> None:
    assert _encoded_size_of(MAX_MESSAGE_SIZE + 2048) <= REQUEST_LIMIT
    raw = b"From: app@example.com\r\nSubject: big\r\n\r\n" + b"x" * (REQUEST_LIMIT * 3 // 4)
    with pytest.raises(MessageRejected, match="over Graph's request limit"):
        provider(httpx.AsyncClient(), "http://g").build_request(outbound(raw))


def _encoded_size_of(size: int) -> int:
    return (size + 2) // 3 * 4


# -- credentials ---------------------------------------------------------------------------


async def test_one_token_for_fifty_concurrent_deliveries() -> None:
    with FakeGraph(latency=0.05) as graph:
        async with httpx.AsyncClient() as client:
            sender = provider(client, graph.url)
            results = await asyncio.gather(*(sender.send(outbound()) for _ in range(50)))
    assert len(graph.token_requests) == 1
    assert graph.token_requests[0] == {
        "client_id": CLIENT_ID,
        "scope": f"{graph.url}/.default",
        "grant_type": "client_credentials",
        "client_secret": SECRET,
    }
    assert len(graph.sent) == 50
    assert all(r.provider_message_id is None for r in results)  # Graph gives no id
    # 4 requests at once for one mailbox, never more.
    assert graph.most_in_flight[MAILBOX] == 4


async def test_token_is_refreshed_before_it_expires() -> None:
    clock = FakeClock()
    with FakeGraph(expires_in=3599) as graph:
        async with httpx.AsyncClient() as client:
            sender = provider(client, graph.url, clock=clock)
            await sender.send(outbound())
            clock.advance(3599 - 301)
            await sender.send(outbound())
            assert len(graph.token_requests) == 1
            clock.advance(2)  # within 5 minutes of expiry: a new token
            await sender.send(outbound())
            assert len(graph.token_requests) == 2


async def test_certificate_credentials() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    thumbprint = "0123456789abcdef0123456789ABCDEF01234567"
    x5t = base64.urlsafe_b64encode(bytes.fromhex(thumbprint)).rstrip(b"=").decode()
    with TemporaryDirectory() as tmp:
        path = Path(tmp) / "app.pem"
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n" + pem)
        certificate = Certificate.load(path, thumbprint)
    with FakeGraph(public_key=key.public_key(), thumbprint_x5t=x5t) as graph:
        async with httpx.AsyncClient() as client:
            await provider(client, graph.url, certificate=certificate).send(outbound())
            other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            wrong = provider(client, graph.url, certificate=Certificate(other, thumbprint))
            with pytest.raises(ProviderConfigError, match="invalid_client: AADSTS7000215"):
                await wrong.send(outbound())
    assert "client_secret" not in graph.token_requests[0]
    assert len(graph.sent) == 1


def test_certificate_file_problems_are_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="THUMBPRINT"):
        Certificate.load(tmp_path / "x.pem", "abc")
    with pytest.raises(ConfigError, match="cannot read"):
        Certificate.load(tmp_path / "x.pem", "0" * 40)
    (tmp_path / "x.pem").write_text("no key here")
    with pytest.raises(ConfigError, match="no PEM private key"):
        Certificate.load(tmp_path / "x.pem", "0" * 40)


async def test_wrong_secret_is_a_configuration_error_never_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with FakeGraph() as graph:
        async with httpx.AsyncClient() as client:
            with pytest.raises(ProviderConfigError) as info:
                await provider(client, graph.url, secret="wrong-secret").send(outbound())
            graph.esp.then(Reply(503, "busy", {"Retry-After": "7"}))
            with pytest.raises(ProviderUnavailable) as busy:
                await provider(client, graph.url).send(outbound())
            await provider(client, graph.url).send(outbound())
    assert "AADSTS7000215" in str(info.value) and "wrong-secret" not in str(info.value)
    assert busy.value.retry_after == 7
    assert "wrong-secret" not in caplog.text and SECRET not in caplog.text
    assert "fake-token" not in caplog.text


async def test_stale_token_is_refreshed_once_then_a_configuration_error() -> None:
    with FakeGraph() as graph:
        async with httpx.AsyncClient() as client:
            sender = provider(client, graph.url)
            await sender.send(outbound())
            graph.issued.clear()  # the tenant revoked every token it gave
            await sender.send(outbound())  # 401, a new token, 202
            assert len(graph.token_requests) == 2
            expired = graph_error(401, "InvalidAuthenticationToken", "Access token is empty.")
            graph.esp.then(expired, Reply(200, {"access_token": "t", "expires_in": 10}), expired)
            with pytest.raises(ProviderConfigError, match="refused a newly fetched token"):
                await sender.send(outbound())
    assert len(graph.sent) == 2


# -- Graph's errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "error", "text"),
    [
        (graph_error(400, "ErrorMimeContentInvalidBase64String",
                     "Invalid base64 string for MIME content."), MessageRejected, "Invalid base64"),
        (graph_error(400, "ErrorMimeContentInvalid", "Invalid MIME content."), MessageRejected,
         "ErrorMimeContentInvalid"),
        (graph_error(403, "ErrorSendAsDenied", "no right to send"), MessageRejected,
         "mailbox app@example.com may not send as"),
        (graph_error(403, "ErrorAccessDenied", "Access is denied."), ProviderConfigError,
         "may not send as mailbox app@example.com"),
        (graph_error(404, "ErrorInvalidUser", "The requested user is invalid."), MessageRejected,
         "no mailbox app@example.com"),
        (graph_error(413, "RequestEntityTooLarge", "too large"), MessageRejected, "413"),
        (graph_error(429, "ApplicationThrottled", "Too many requests", **{"Retry-After": "12"}),
         RateLimited, "ApplicationThrottled"),
        (graph_error(503, "ServiceUnavailable", "busy", **{"Retry-After": "5"}),
         ProviderUnavailable, "ServiceUnavailable"),
        (graph_error(504, "GatewayTimeout", "gateway timeout"), ProviderUnavailable,
         "may have been sent"),
        (Reply(200, "<html>not graph</html>"), ProviderConfigError, "answers 202"),
    ],
)  # fmt: skip
async def test_error_mapping(reply: Reply, error: type[Exception], text: str) -> None:
    with FakeGraph() as graph:
        async with httpx.AsyncClient() as client:
            sender = provider(client, graph.url)
            await sender.send(outbound())  # a token first
            graph.esp.then(reply)
            with pytest.raises(error, match=text) as info:
                await sender.send(outbound())
    retry_after = reply.headers.get("Retry-After")
    if retry_after:
        assert isinstance(info.value, DeliveryError)
        assert info.value.retry_after == float(retry_after)


async def test_throttling_holds_the_mailbox() -> None:
    clock = FakeClock()
    with FakeGraph() as graph:
        async with httpx.AsyncClient() as client:
            sender = provider(client, graph.url, clock=clock)
            await sender.send(outbound())  # a token first
            graph.esp.then(graph_error(429, "MailboxConcurrency", "slow", **{"Retry-After": "30"}))
            with pytest.raises(RateLimited):
                await sender.send(outbound())
            later = asyncio.ensure_future(sender.send(outbound()))
            await clock.waiting(1)
            assert not later.done() and len(graph.sent) == 1
            clock.advance(30)
            await later
            assert len(graph.sent) == 2
            # Another mailbox is not held.
            other = b"From: other@example.com\r\nTo: b@example.org\r\n\r\nb\r\n"
            await sender.send(outbound(other))


# -- end to end: SMTP in, the fake Graph out ----------------------------------------------


def graph_env(graph: FakeGraph, **extra: str) -> dict[str, str]:
    return {
        "ESPRELAY_PROVIDER": "graph",
        "ESPRELAY_GRAPH_TENANT_ID": TENANT,
        "ESPRELAY_GRAPH_CLIENT_ID": CLIENT_ID,
        "ESPRELAY_GRAPH_CLIENT_SECRET": SECRET,
        "ESPRELAY_GRAPH_API_URL": graph.url,
        "ESPRELAY_GRAPH_AUTHORITY_URL": graph.url,
        "ESPRELAY_RETRY_INITIAL": "0.1",
        "ESPRELAY_RETRY_MAX": "0.2",
        **extra,
    }


def test_smtp_to_graph(relay_factory: type[RelayProcess]) -> None:
    with FakeGraph() as graph:
        env = graph_env(graph, ESPRELAY_GRAPH_ALLOWED_SENDERS="app@example.com, @example.net")
        relay = relay_factory(env).start()
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
            smtp.ehlo("client.test")
            # Graph takes 150 MB with upload sessions: the relay's own limit is smaller.
            assert int(smtp.esmtp_features["size"]) == 25 * 1024 * 1024
            # A sender the app may not send as: refused at the end of DATA.
            smtp.mail("someone@elsewhere.example")
            smtp.rcpt("b@example.org")
            code, reply = smtp.data(
                b"From: someone@elsewhere.example\r\nTo: b@example.org\r\n\r\nx\r\n"
            )
            assert code == 550 and b"ESPRELAY_GRAPH_ALLOWED_SENDERS" in reply, reply
        rcpts = ["b@example.org", "c@example.org", "hidden@example.net"]
        first = queued_id(send_raw(relay, MAILBOX, rcpts, RAW))
        bcc_only = b"From: app@example.com\r\nSubject: bcc only\r\n\r\nnobody listed\r\n"
        second = queued_id(send_raw(relay, MAILBOX, ["x@example.org", "y@example.org"], bcc_only))
        for message_id in (first, second):
            relay.wait_for_log(
                rf"delivered id={message_id} provider=graph attempt=1 .*provider_id=None"
            )
        # A 504 after the request went: retried, and said to be a possible duplicate.
        graph.esp.then(graph_error(504, "GatewayTimeout", "The gateway did not receive a response"))
        retried = RAW.replace(b"Subject: report", b"Subject: retried")
        third = queued_id(send_raw(relay, MAILBOX, ["b@example.org"], retried))
        relay.wait_for_log(rf"delivered id={third} provider=graph attempt=2")
    by_subject = {s.parsed()["Subject"]: s for s in graph.sent}
    assert by_subject["report"].recipients() == set(rcpts)
    assert by_subject["report"].mailbox == MAILBOX
    assert by_subject["bcc only"].recipients() == {"x@example.org", "y@example.org"}
    assert by_subject["bcc only"].parsed()["To"] is None
    # Cc c@example.org is not in this one's envelope: not mailed.
    assert by_subject["retried"].recipients() == {"b@example.org"}
    assert len(graph.token_requests) == 1
    assert re.search(rf"id={third} provider=graph: Graph timed out \(504\).*may have been sent",
                     relay.log)  # fmt: skip
    assert re.search(
        rf"deferred id={third} .*HTTP 504 GatewayTimeout.*may have been sent", relay.log
    )
    assert SECRET not in relay.log and "fake-token" not in relay.log


def test_settings_name_what_is_missing(tmp_path: Path) -> None:
    kind = get_kind("graph")
    base = {"tenant_id": TENANT, "client_id": CLIENT_ID}
    with pytest.raises(ConfigError, match="set ESPRELAY_GRAPH_CLIENT_SECRET, or"):
        configure(kind, base)
    with pytest.raises(ConfigError, match="not both"):
        configure(kind, {**base, "client_secret": "x", "certificate_thumbprint": "0" * 40})
    with pytest.raises(ConfigError, match="SENDER_MODE=fixed needs ESPRELAY_GRAPH_SENDER"):
        configure(kind, {**base, "client_secret": "x", "sender_mode": "fixed"})
    with pytest.raises(ConfigError, match="ESPRELAY_GRAPH_MAILBOX_CONCURRENCY"):
        configure(kind, {**base, "client_secret": "x", "mailbox_concurrency": "5"})
    config = configure(
        kind,
        {**base, "client_secret": "hush-42", "allowed_senders": "a@example.com, @example.net",
         "api_url": "http://127.0.0.1:1/", "authority_url": "http://127.0.0.1:2"},
    )  # fmt: skip
    built = config.build(httpx.AsyncClient(), "m365")
    assert isinstance(built, GraphProvider) and built.name == "m365"
    assert built.allowed == {"a@example.com", "@example.net"}
    assert config.settings.api_urls() == ("http://127.0.0.1:1", "http://127.0.0.1:2")
    assert "hush-42" not in repr(config.settings)
