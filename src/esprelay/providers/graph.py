"""Microsoft 365 through Microsoft Graph: ``sendMail`` with the message as MIME.

``POST {api}/v1.0/users/{mailbox}/sendMail`` with ``Content-Type: text/plain`` and the
whole message, base64-encoded, as the body; ``202 Accepted`` and no body on success, so
Graph gives no message id (the delivery is recorded with an unknown id)
(https://learn.microsoft.com/en-us/graph/api/user-sendmail).  The token comes from the
client credentials grant (:mod:`esprelay.providers.graphauth`).

- **The mailbox** that sends is the From header's address (``from``, the default),
  the envelope sender (``envelope``) or one fixed mailbox (``fixed``);
  ``ESPRELAY_GRAPH_ALLOWED_SENDERS`` refuses at the end of DATA (550 5.6.0) what the
  app may not send as, instead of collecting Exchange's 403s later.
- **The recipients** Graph sees are exactly the envelope's
  (:func:`esprelay.providers.graphmime.envelope_recipients`), and quoted-printable
  parts go as base64 (:func:`esprelay.providers.graphmime.qp_to_base64`).
- **Sent Items**: the MIME form of sendMail always saves the message in the mailbox's
  Sent Items ("When using MIME format: ... This method saves the message in the Sent
  Items folder"); ``saveToSentItems`` is a parameter of the JSON form only.
  ``ESPRELAY_GRAPH_SAVE_TO_SENT_ITEMS=false`` therefore cannot be honoured by sendMail
  and is reported at start (logged); ``true`` is what happens.
- **Size**: a Graph request is at most 4 MB, so the raw message may be 3/4 of that
  minus room for the rewrites; EHLO SIZE says so.  The upload session for larger
  messages (draft plus attachment upload, Mail.ReadWrite) is not implemented yet:
  ``ESPRELAY_GRAPH_UPLOAD_SESSIONS`` is accepted and has no effect.
- **Errors** (Graph's body: ``{"error": {"code", "message"}}``): 400 (invalid MIME,
  ``ErrorMimeContentInvalidBase64String`` and friends) and 413 are permanent;
  403 ``ErrorSendAsDenied`` is permanent and names the mailbox; any other 403 is the
  app's permission or access policy (a configuration error); a 401 fetches a new token
  and tries once more, then is a configuration error; 429 and 503 honour Retry-After
  and hold that mailbox's requests; a 504 is retried, and logged as "may have been
  sent": Graph may have accepted the message, so the retry may deliver it twice.
- **Throttling**: Graph allows 4 concurrent requests per mailbox and 10,000 per 10
  minutes (https://learn.microsoft.com/en-us/graph/throttling-limits#outlook-service-limits);
  each mailbox has its own concurrency limit and token bucket, so esprelay does not
  cause its own 429s.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.utils import getaddresses
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote

import httpx
from pydantic import Field, SecretStr, field_validator, model_validator

from esprelay.clock import SYSTEM_CLOCK, Clock
from esprelay.errors import (
    ConfigError,
    DeliveryError,
    MessageRejected,
    ProviderConfigError,
    ProviderUnavailable,
    RateLimited,
)
from esprelay.message.header import raw_value, read_header, unfolded
from esprelay.models import OutboundMessage, SendResult
from esprelay.providers.base import (
    INLINE_BUILD_LIMIT,
    Built,
    HttpProvider,
    ProviderKind,
    ProviderSettings,
    classify_status,
    excerpt,
    parse_retry_after,
)
from esprelay.providers.graphauth import Certificate, TokenSource, graph_scope, token_url
from esprelay.providers.graphmime import envelope_recipients, qp_to_base64
from esprelay.ratelimit import RateLimit

log = logging.getLogger("esprelay.providers.graph")

#: Graph's request size limit: "4 MB" (sendMail with MIME; larger messages need an
#: upload session, https://learn.microsoft.com/en-us/graph/outlook-large-attachments).
REQUEST_LIMIT = 4 * 1024 * 1024
#: Raw message size advertised: the request is base64 (4/3), and the rewrites may add
#: a Bcc field or grow a quoted-printable part (checked exactly when the request is built).
MAX_MESSAGE_SIZE = REQUEST_LIMIT * 3 // 4 - 64 * 1024
#: Exchange Online's default recipient limit per message.
MAX_RECIPIENTS = 500
#: Outlook service limits per app and mailbox.
MAILBOX_CONCURRENCY = 4
WINDOW_REQUESTS = 10_000
WINDOW_SECONDS = 600.0
#: The default rate per mailbox: 16 a second and bursts of 400, never more than
#: 10,000 requests in any 10 minutes.
MAILBOX_RATE = 16.0

SenderMode = Literal["from", "envelope", "fixed"]

#: 400s about the message itself (invalid MIME, recipients, size): permanent.
#: 403s other than these are the app's permissions or access policy.
SEND_AS_DENIED = "ErrorSendAsDenied"
#: The mailbox does not exist or cannot be used with Graph.
NO_MAILBOX = frozenset(
    {"ErrorInvalidUser", "ResourceNotFound", "MailboxNotEnabledForRESTAPI", "ErrorItemNotFound"}
)
#: The account may not send now (quota, a sender blocked for spam): an operator must act.
ACCOUNT_BLOCKED = frozenset(
    {"ErrorQuotaExceeded", "ErrorMessageSubmissionBlocked", "ErrorAccountDisabled"}
)


class NoMailbox(ValueError):
    """No mailbox may send this message; the text says why."""


@dataclass
class _Mailbox:
    """What is kept per sending mailbox: its concurrent requests and its rate."""

    slots: asyncio.Semaphore
    rate: RateLimit
    users: int = field(default=0)


class GraphProvider(HttpProvider):
    kind = "graph"
    smtputf8 = False  # Exchange's UTF-8 address support is partial: Punycode domains only
    max_message_size = MAX_MESSAGE_SIZE
    max_recipients = MAX_RECIPIENTS

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        tokens: TokenSource,
        api_url: str = "https://graph.microsoft.com",
        sender_mode: SenderMode = "from",
        sender: str | None = None,
        allowed_senders: Iterable[str] = (),
        mailbox_concurrency: int = MAILBOX_CONCURRENCY,
        mailbox_rate: float = MAILBOX_RATE,
        name: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__(client, name)
        if sender_mode == "fixed" and not sender:
            raise ValueError("sender_mode 'fixed' needs a sender")
        self._tokens = tokens
        self.api_url = api_url.rstrip("/")
        self.sender_mode = sender_mode
        self.sender = sender
        self.allowed = frozenset(a.strip().lower() for a in allowed_senders if a.strip())
        self.mailbox_concurrency = mailbox_concurrency
        self.mailbox_rate = mailbox_rate
        # A bucket that never lets more than WINDOW_REQUESTS through in WINDOW_SECONDS.
        self.mailbox_burst = max(1, int(WINDOW_REQUESTS - mailbox_rate * WINDOW_SECONDS))
        self._clock = clock
        self._mailboxes: dict[str, _Mailbox] = {}

    # -- which mailbox sends ---------------------------------------------------------

    def mailbox(self, message: OutboundMessage) -> str:
        """The mailbox that sends ``message``; NoMailbox (with the reason) if none may."""
        if self.sender_mode == "fixed":
            assert self.sender is not None
            address = self.sender
        elif self.sender_mode == "envelope":
            address = message.envelope.mail_from
            if not address:
                raise NoMailbox(
                    "the null sender (MAIL FROM:<>) names no mailbox to send from"
                    " (ESPRELAY_GRAPH_SENDER_MODE=envelope)"
                )
        else:
            address = from_address(message.raw)
            if not address:
                raise NoMailbox("no From address to choose the Microsoft 365 mailbox by")
        if self.allowed and not _allowed(address, self.allowed):
            raise NoMailbox(
                f"mailbox {address} is not in ESPRELAY_GRAPH_ALLOWED_SENDERS"
                " (the app may not send as it)"
            )
        return address

    def refusal(self, message: OutboundMessage) -> str | None:
        try:
            self.mailbox(message)
        except NoMailbox as exc:
            return str(exc)
        return None

    # -- the request, pure -----------------------------------------------------------

    def prepare(self, message: OutboundMessage) -> tuple[bytes, tuple[str, ...]]:
        """The MIME Graph gets and what was changed in it."""
        routed = envelope_recipients(message.raw, message.envelope.rcpt_tos)
        fixed = qp_to_base64(routed.raw)
        if fixed.changed and _encoded_size(fixed.raw) > REQUEST_LIMIT >= _encoded_size(routed.raw):
            # Better a quoted-printable part Exchange may damage than no message.
            return routed.raw, (
                *routed.warnings,
                "quoted-printable parts sent as they are: as base64 the message would"
                " exceed Graph's 4 MB request limit",
            )
        return fixed.raw, routed.warnings + fixed.warnings

    def build_request(self, message: OutboundMessage) -> Built:
        try:
            mailbox = self.mailbox(message)
        except NoMailbox as exc:  # spooled before the check at the end of DATA
            raise MessageRejected(str(exc), provider=self.name) from None
        raw, warnings = self.prepare(message)
        data = base64.b64encode(raw)
        if len(data) > REQUEST_LIMIT:
            raise MessageRejected(
                f"message is {len(data)} bytes after base64, over Graph's request limit of"
                f" {REQUEST_LIMIT}",
                provider=self.name,
            )
        request = httpx.Request(
            "POST",
            f"{self.api_url}/v1.0/users/{quote(mailbox, safe='@')}/sendMail",
            content=data,
            headers={"Content-Type": "text/plain"},
        )
        return Built(request, warnings)

    # -- sending ---------------------------------------------------------------------

    async def authorize(self, request: httpx.Request) -> None:
        token = await self._tokens.token()
        request.headers["Authorization"] = f"Bearer {token}"

    async def send(self, message: OutboundMessage) -> SendResult:
        # Not HttpProvider's one-request template: a 401 is answered with a new token
        # and one more try, and each mailbox's concurrency and rate are kept.
        self._tokens.provider = self.name
        try:
            mailbox = self.mailbox(message)
        except NoMailbox as exc:
            raise MessageRejected(str(exc), provider=self.name) from None
        if len(message.raw) <= INLINE_BUILD_LIMIT:
            built = self.build_request(message)
            response = await self._deliver(mailbox, built.request)
        else:
            async with self.large_messages.hold(len(message.raw)):
                built = await asyncio.to_thread(self.build_request, message)
                response = await self._deliver(mailbox, built.request)
        warnings = built.warnings
        del built
        if not response.is_success:
            error = self.classify_error(response)
            if error.status_code == 504:
                log.warning(
                    "id=%s provider=%s: Graph timed out (504) after the request was sent;"
                    " the message may have been sent, and the retry may deliver it twice",
                    message.id,
                    self.name,
                )
            raise error
        result = self.parse_response(response, message)
        return SendResult(result.provider_message_id, warnings=warnings + result.warnings)

    async def _deliver(self, mailbox: str, request: httpx.Request) -> httpx.Response:
        box = self._mailbox_state(mailbox)
        box.users += 1
        try:
            async with box.slots:
                for attempt in (1, 2):
                    await box.rate.acquire()
                    token = await self._tokens.token()
                    request.headers["Authorization"] = f"Bearer {token}"
                    response = await self._exchange(request)
                    if response.status_code == 401 and attempt == 1:
                        log.warning(
                            "provider=%s: Graph refused the access token (401); fetching a new one",
                            self.name,
                        )
                        self._tokens.invalidate(token)
                        continue
                    break
        finally:
            box.users -= 1
            if not box.users and len(self._mailboxes) > 1024:
                self._mailboxes.pop(mailbox.lower(), None)
        if response.status_code in (429, 503):
            hint = parse_retry_after(response.headers.get("retry-after"))
            if hint:
                box.rate.hold_until(hint)
        return response

    def _mailbox_state(self, mailbox: str) -> _Mailbox:
        key = mailbox.lower()
        box = self._mailboxes.get(key)
        if box is None:
            box = _Mailbox(
                asyncio.Semaphore(self.mailbox_concurrency),
                RateLimit(self.mailbox_rate, self.mailbox_burst, clock=self._clock),
            )
            self._mailboxes[key] = box
        return box

    def parse_response(self, response: httpx.Response, message: OutboundMessage) -> SendResult:
        if response.status_code != 202:
            raise ProviderConfigError(
                f"HTTP {response.status_code} where sendMail answers 202; is"
                f" ESPRELAY_GRAPH_API_URL Microsoft Graph? {excerpt(response, 120)}",
                provider=self.name,
                status_code=response.status_code,
            )
        # 202 Accepted has no body: Graph gives no id for the message.
        return SendResult(provider_message_id=None)

    def classify_error(self, response: httpx.Response) -> DeliveryError:
        status = response.status_code
        code, text = error_details(response)
        mailbox = _mailbox_of(response)
        detail = f"HTTP {status} {code or 'error'}: {text}"
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        common: dict[str, Any] = {"provider": self.name, "status_code": status}
        if status == 429:
            return RateLimited(detail, retry_after=retry_after, **common)
        if status == 401:
            return ProviderConfigError(
                f"{detail}; Graph refused a newly fetched token too: check the app's"
                " Mail.Send application permission and admin consent",
                **common,
            )
        if code == SEND_AS_DENIED:
            return MessageRejected(
                f"{detail}; mailbox {mailbox} may not send as the message's From address"
                " (grant Send As, or set ESPRELAY_GRAPH_SENDER_MODE=from)",
                **common,
            )
        if status == 403 or code in ACCOUNT_BLOCKED:
            return ProviderConfigError(
                f"{detail}; the app may not send as mailbox {mailbox}: check the Mail.Send"
                " application permission, admin consent and the Exchange application"
                " access policy",
                **common,
            )
        if status == 404 or code in NO_MAILBOX:
            explain = f"{detail}; no mailbox {mailbox} in the tenant that Graph can send from"
            if self.sender_mode == "fixed":
                return ProviderConfigError(f"{explain} (ESPRELAY_GRAPH_SENDER)", **common)
            return MessageRejected(explain, **common)
        if status == 504:
            return ProviderUnavailable(
                f"{detail}; the message may have been sent: a retry may deliver it twice",
                retry_after=retry_after,
                **common,
            )
        if status >= 500:
            return ProviderUnavailable(detail, retry_after=retry_after, **common)
        if status in (400, 413):
            return MessageRejected(detail, **common)
        return classify_status(response, provider=self.name)


def error_details(response: httpx.Response) -> tuple[str, str]:
    """Graph's error code and message: ``{"error": {"code": ..., "message": ...}}``."""
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code") or "")
        message = " ".join(str(error.get("message") or "").split())[:300]
        return code, message or excerpt(response)
    return "", excerpt(response)


def _mailbox_of(response: httpx.Response) -> str:
    """The mailbox of the sendMail URL the response answers ("?" if not one)."""
    try:
        parts = response.request.url.path.split("/")
    except RuntimeError:  # a response built without its request
        return "?"
    if len(parts) >= 5 and parts[-3] == "users" and parts[-1] == "sendMail":
        return unquote(parts[-2])
    return "?"


def from_address(raw: bytes) -> str:
    """The first address of the top-level From field, or ``""``."""
    header = read_header(raw, obsolete=True)
    item = header.first(b"from")
    if item is None:
        return ""
    value = unfolded(raw_value(raw, item))
    for _, address in getaddresses([value]):
        if address and "@" in address:
            return address.encode("ascii", "surrogateescape").decode("utf-8", "replace")
    return ""


def _allowed(address: str, allowed: frozenset[str]) -> bool:
    address = address.lower()
    return address in allowed or "@" + address.rpartition("@")[2] in allowed


def _encoded_size(raw: bytes) -> int:
    return (len(raw) + 2) // 3 * 4


def _parse_list(value: object) -> object:
    if isinstance(value, str):
        return tuple(item for item in value.replace(",", " ").split() if item)
    return value


class GraphSettings(ProviderSettings):
    """``ESPRELAY_GRAPH_*``: the app registration and how mailboxes are chosen."""

    tenant_id: str
    client_id: str
    client_secret: SecretStr | None = None
    certificate_file: Path | None = None
    certificate_thumbprint: str | None = None
    sender_mode: SenderMode = "from"
    sender: str | None = None
    allowed_senders: tuple[str, ...] = ()
    save_to_sent_items: bool = False
    upload_sessions: bool = True
    api_url: str = "https://graph.microsoft.com"
    authority_url: str = "https://login.microsoftonline.com"
    #: Requests in flight per mailbox (Graph allows 4).
    mailbox_concurrency: int = Field(default=MAILBOX_CONCURRENCY, ge=1, le=MAILBOX_CONCURRENCY)
    #: Requests per second per mailbox (Graph allows 10,000 per 10 minutes).
    mailbox_rate: float = Field(default=MAILBOX_RATE, gt=0)

    _split = field_validator("allowed_senders", mode="before")(_parse_list)

    @field_validator("api_url", "authority_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("expected an http(s) URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _consistent(self) -> GraphSettings:
        certificate = self.certificate_file is not None or self.certificate_thumbprint
        if self.client_secret is None and not certificate:
            raise ValueError(
                "set ESPRELAY_GRAPH_CLIENT_SECRET, or ESPRELAY_GRAPH_CERTIFICATE_FILE with"
                " ESPRELAY_GRAPH_CERTIFICATE_THUMBPRINT"
            )
        if self.client_secret is not None and certificate:
            raise ValueError("set a client secret or a certificate, not both")
        if certificate and (self.certificate_file is None or not self.certificate_thumbprint):
            raise ValueError(
                "ESPRELAY_GRAPH_CERTIFICATE_FILE and ESPRELAY_GRAPH_CERTIFICATE_THUMBPRINT"
                " go together"
            )
        if self.sender_mode == "fixed" and not self.sender:
            raise ValueError("ESPRELAY_GRAPH_SENDER_MODE=fixed needs ESPRELAY_GRAPH_SENDER")
        return self

    def api_urls(self) -> tuple[str, ...]:
        return (self.api_url, self.authority_url)


def build(settings: GraphSettings, client: httpx.AsyncClient) -> GraphProvider:
    certificate = None
    if settings.certificate_file is not None:
        assert settings.certificate_thumbprint is not None
        certificate = Certificate.load(settings.certificate_file, settings.certificate_thumbprint)
    if not settings.save_to_sent_items:
        log.info(
            "ESPRELAY_GRAPH_SAVE_TO_SENT_ITEMS=false cannot be honoured: Graph's MIME"
            " sendMail always saves the message in the mailbox's Sent Items"
        )
    if settings.upload_sessions:
        log.info(
            "ESPRELAY_GRAPH_UPLOAD_SESSIONS: upload sessions are not available yet;"
            " messages above %d bytes are refused (552)",
            MAX_MESSAGE_SIZE,
        )
    tokens = TokenSource(
        client,
        url=token_url(settings.authority_url, settings.tenant_id),
        client_id=settings.client_id,
        scope=graph_scope(settings.api_url),
        secret=settings.client_secret,
        certificate=certificate,
    )
    try:
        return GraphProvider(
            client,
            tokens=tokens,
            api_url=settings.api_url,
            sender_mode=settings.sender_mode,
            sender=settings.sender,
            allowed_senders=settings.allowed_senders,
            mailbox_concurrency=settings.mailbox_concurrency,
            mailbox_rate=settings.mailbox_rate,
        )
    except ValueError as exc:
        raise ConfigError(f"ESPRELAY_GRAPH_*: {exc}") from None


KIND = ProviderKind("graph", GraphSettings, build, "Microsoft 365 via Microsoft Graph sendMail")
