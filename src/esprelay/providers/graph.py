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
- **Size**: a Graph request is at most 4 MB.  With ``ESPRELAY_GRAPH_UPLOAD_SESSIONS``
  (the default) a message whose request would be larger, up to Exchange Online's
  150 MB, goes as a draft without its largest attachments, the attachments (an upload
  session from 3 MB) and a send (:mod:`esprelay.providers.graphupload`; the app needs
  Mail.ReadWrite as well as Mail.Send); a failure after the draft exists deletes the
  draft (best effort) and the message is retried or bounced as for sendMail.  Without
  upload sessions the raw message may be 3/4 of 4 MB minus room for the rewrites, and
  EHLO SIZE says so.
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
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
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
    json_body,
    parse_retry_after,
)
from esprelay.providers.graphauth import Certificate, TokenSource, graph_scope, token_url
from esprelay.providers.graphmime import envelope_recipients, qp_to_base64
from esprelay.providers.graphupload import (
    SMALL_ATTACHMENT,
    UPLOAD_LIMIT,
    Attachment,
    Split,
    chunks,
    split_attachments,
)
from esprelay.ratelimit import RateLimit

log = logging.getLogger("esprelay.providers.graph")

#: Graph's request size limit: "4 MB" (sendMail with MIME; larger messages need an
#: upload session, https://learn.microsoft.com/en-us/graph/outlook-large-attachments).
REQUEST_LIMIT = 4 * 1024 * 1024
#: Raw message size advertised: the request is base64 (4/3), and the rewrites may add
#: a Bcc field or grow a quoted-printable part (checked exactly when the request is built).
MAX_MESSAGE_SIZE = REQUEST_LIMIT * 3 // 4 - 64 * 1024
#: Raw message size advertised with upload sessions: Exchange Online's 150 MB.
UPLOAD_MAX_MESSAGE_SIZE = UPLOAD_LIMIT
#: How long deleting an unsent draft may take (it is best effort).
DISCARD_TIMEOUT = 60.0
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


@dataclass(frozen=True, slots=True)
class Upload:
    """A message too large for one request: the draft's request and its attachments."""

    draft: httpx.Request
    attachments: tuple[Attachment, ...]
    warnings: tuple[str, ...]


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
        upload_sessions: bool = True,
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
        self.upload_sessions = upload_sessions
        if upload_sessions:
            self.max_message_size = UPLOAD_MAX_MESSAGE_SIZE

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
        if (
            fixed.changed
            and not self.upload_sessions
            and _encoded_size(len(fixed.raw)) > REQUEST_LIMIT >= _encoded_size(len(routed.raw))
        ):
            # Better a quoted-printable part Exchange may damage than no message.
            return routed.raw, (
                *routed.warnings,
                "quoted-printable parts sent as they are: as base64 the message would"
                " exceed Graph's 4 MB request limit",
            )
        return fixed.raw, routed.warnings + fixed.warnings

    def build_request(self, message: OutboundMessage) -> Built:
        """The sendMail request (a message that fits in one request)."""
        built = self.plan(message)
        if isinstance(built, Upload):
            raise MessageRejected(
                "message is over Graph's request limit: it needs an upload session",
                provider=self.name,
            )
        return built

    def plan(self, message: OutboundMessage) -> Built | Upload:
        """sendMail for a message that fits in one request; otherwise, with upload
        sessions, the draft to create and the attachments to add to it.  Pure."""
        try:
            mailbox = self.mailbox(message)
        except NoMailbox as exc:  # spooled before the check at the end of DATA
            raise MessageRejected(str(exc), provider=self.name) from None
        raw, warnings = self.prepare(message)
        size = _encoded_size(len(raw))
        if size > REQUEST_LIMIT and self.upload_sessions:
            return self._upload_plan(mailbox, raw, warnings)
        if size > REQUEST_LIMIT:
            raise MessageRejected(
                f"message is {size} bytes after base64, over Graph's request limit of"
                f" {REQUEST_LIMIT} (ESPRELAY_GRAPH_UPLOAD_SESSIONS is off)",
                provider=self.name,
            )
        request = httpx.Request(
            "POST",
            f"{self._user_url(mailbox)}/sendMail",
            content=base64.b64encode(raw),
            headers={"Content-Type": "text/plain"},
        )
        return Built(request, warnings)

    def _upload_plan(self, mailbox: str, raw: bytes, warnings: tuple[str, ...]) -> Upload:
        split = split_attachments(raw, lambda size: _encoded_size(size) <= REQUEST_LIMIT)
        if split is None:
            raise MessageRejected(
                f"message is {_encoded_size(len(raw))} bytes after base64, over Graph's"
                f" request limit of {REQUEST_LIMIT} even without its attachments (only"
                " attachment parts outside signed or encrypted parts can be uploaded"
                " separately)",
                provider=self.name,
            )
        too_big = [a for a in split.attachments if a.size > UPLOAD_LIMIT]
        if too_big:
            raise MessageRejected(
                f"attachment {too_big[0].name!r} is {too_big[0].size} bytes, over"
                f" Exchange Online's limit of {UPLOAD_LIMIT}",
                provider=self.name,
            )
        draft = httpx.Request(
            "POST",
            f"{self._user_url(mailbox)}/messages",
            content=base64.b64encode(split.raw),
            headers={"Content-Type": "text/plain"},
        )
        return Upload(draft, split.attachments, (*warnings, _upload_warning(split)))

    def _user_url(self, mailbox: str) -> str:
        return f"{self.api_url}/v1.0/users/{quote(mailbox, safe='@')}"

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
            built = self.plan(message)
            response = await self._deliver(mailbox, built, message)
        else:
            async with self.large_messages.hold(len(message.raw)):
                built = await asyncio.to_thread(self.plan, message)
                response = await self._deliver(mailbox, built, message)
        warnings = built.warnings
        del built
        result = self.parse_response(response, message)
        return SendResult(result.provider_message_id, warnings=warnings + result.warnings)

    async def _deliver(
        self, mailbox: str, built: Built | Upload, message: OutboundMessage
    ) -> httpx.Response:
        """The answer of sendMail, or of the draft's send; DeliveryError if it failed."""
        async with self._slot(mailbox) as box:
            if isinstance(built, Upload):
                return await self._upload(box, built, message)
            return self._checked(await self._call(box, built.request), message)

    def _checked(self, response: httpx.Response, message: OutboundMessage) -> httpx.Response:
        """The answer of a send, or its DeliveryError raised (a 504 said to be a risk)."""
        if response.is_success:
            return response
        error = self.classify_error(response)
        if error.status_code == 504:
            log.warning(
                "id=%s provider=%s: Graph timed out (504) after the request was sent;"
                " the message may have been sent, and the retry may deliver it twice",
                message.id,
                self.name,
            )
        raise error

    @contextlib.asynccontextmanager
    async def _slot(self, mailbox: str) -> AsyncIterator[_Mailbox]:
        """One of the mailbox's concurrent requests (or request sequences)."""
        box = self._mailbox_state(mailbox)
        box.users += 1
        try:
            async with box.slots:
                yield box
        finally:
            box.users -= 1
            if not box.users and len(self._mailboxes) > 1024:
                self._mailboxes.pop(mailbox.lower(), None)

    async def _call(self, box: _Mailbox, request: httpx.Request) -> httpx.Response:
        """One Graph request with the app's token: the mailbox's rate is kept, and a
        401 fetches a new token and tries once more."""
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
        if response.status_code in (429, 503):
            hint = parse_retry_after(response.headers.get("retry-after"))
            if hint:
                box.rate.hold_until(hint)
        return response

    # -- messages over 4 MB: a draft, its attachments, send ----------------------------

    async def _upload(
        self, box: _Mailbox, upload: Upload, message: OutboundMessage
    ) -> httpx.Response:
        response = await self._call(box, upload.draft)
        if not response.is_success:
            raise self.classify_error(response)
        draft_id = _draft_id(response)
        if draft_id is None:
            raise ProviderConfigError(
                f"HTTP {response.status_code} without the draft's id where Graph answers"
                f" 201 and the message; is ESPRELAY_GRAPH_API_URL Microsoft Graph?"
                f" {excerpt(response, 120)}",
                provider=self.name,
                status_code=response.status_code,
            )
        draft_url = f"{str(upload.draft.url).rsplit('?', 1)[0]}/{quote(draft_id, safe='')}"
        try:
            for attachment in upload.attachments:
                await self._attach(box, draft_url, attachment)
            send = httpx.Request("POST", f"{draft_url}/send", headers={"Content-Length": "0"})
            return self._checked(await self._call(box, send), message)
        except BaseException:
            await self._discard(box, draft_url, message)
            raise

    async def _attach(self, box: _Mailbox, draft_url: str, attachment: Attachment) -> None:
        headers = {"Content-Type": "application/json"}
        if attachment.size < SMALL_ATTACHMENT:
            body = json_body(attachment.file_attachment())
            request = httpx.Request(
                "POST", f"{draft_url}/attachments", content=body, headers=headers
            )
            response = await self._call(box, request)
            if not response.is_success:
                raise self.classify_error(response)
            return
        body = json_body(attachment.upload_session())
        request = httpx.Request(
            "POST", f"{draft_url}/attachments/createUploadSession", content=body, headers=headers
        )
        response = await self._call(box, request)
        if not response.is_success:
            raise self.classify_error(response)
        upload_url = _upload_url(response)
        if upload_url is None:
            raise ProviderUnavailable(
                f"HTTP {response.status_code}: createUploadSession answered without an"
                f" http(s) uploadUrl: {excerpt(response, 120)}",
                provider=self.name,
                status_code=response.status_code,
            )
        total = attachment.size
        for start, end in chunks(total):
            # The upload URL carries its own token: no Authorization header.
            put = httpx.Request(
                "PUT",
                upload_url,
                content=attachment.data[start:end],
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"bytes {start}-{end - 1}/{total}",
                },
            )
            response = await self._exchange(put)
            if not response.is_success:
                raise self._upload_error(response, attachment)

    def _upload_error(self, response: httpx.Response, attachment: Attachment) -> DeliveryError:
        """A PUT to the upload URL failed: the session may have expired (401, 403, 404)
        or the service is busy; all transient but a refused size or range."""
        status = response.status_code
        code, text = error_details(response)
        detail = (
            f"uploading attachment {attachment.name!r} ({attachment.size} bytes): HTTP"
            f" {status} {code or 'error'}: {text}"
        )
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if status == 429:
            return RateLimited(
                detail, retry_after=retry_after, provider=self.name, status_code=status
            )
        if status in (400, 413, 416):
            return MessageRejected(detail, provider=self.name, status_code=status)
        return ProviderUnavailable(
            detail, retry_after=retry_after, provider=self.name, status_code=status
        )

    async def _discard(self, box: _Mailbox, draft_url: str, message: OutboundMessage) -> None:
        """Delete the draft after a failure (best effort: it may stay in Drafts)."""
        try:
            # Not for longer than a minute: a mailbox held by a long Retry-After would
            # hold this delivery too.
            async with asyncio.timeout(DISCARD_TIMEOUT):
                response = await self._call(box, httpx.Request("DELETE", draft_url))
        except DeliveryError as exc:
            failed = f"{type(exc).__name__}: {exc}"
        except TimeoutError:
            failed = f"no answer within {DISCARD_TIMEOUT:.0f}s"
        else:
            if response.is_success:
                return
            failed = f"HTTP {response.status_code}"
        log.warning(
            "id=%s provider=%s: could not delete the unsent draft (%s); it stays in the"
            " mailbox's Drafts",
            message.id,
            self.name,
            failed,
        )

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
                f"HTTP {response.status_code} where sendMail (or a draft's send) answers 202; is"
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
            permission = "Mail.Send"
            if not _is_send_mail(response):  # a draft: messages over 4 MB
                permission = "Mail.Send and Mail.ReadWrite"
            return ProviderConfigError(
                f"{detail}; the app may not send as mailbox {mailbox}: check the"
                f" {permission} application permission, admin consent and the Exchange"
                " application access policy",
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
    """The mailbox of the Graph URL the response answers ("?" if not one)."""
    try:
        parts = response.request.url.path.split("/")
    except RuntimeError:  # a response built without its request
        return "?"
    if len(parts) >= 5 and parts[1:3] == ["v1.0", "users"]:
        return unquote(parts[3])
    return "?"


def _is_send_mail(response: httpx.Response) -> bool:
    try:
        return response.request.url.path.endswith("/sendMail")
    except RuntimeError:
        return True


def _draft_id(response: httpx.Response) -> str | None:
    """The ``id`` of the message resource Graph created (``201 Created``)."""
    try:
        body = response.json()
    except ValueError:
        return None
    value = body.get("id") if isinstance(body, dict) else None
    return value if isinstance(value, str) and value else None


def _upload_url(response: httpx.Response) -> str | None:
    """The ``uploadUrl`` of an uploadSession resource, if it is an http(s) URL."""
    try:
        body = response.json()
    except ValueError:
        return None
    value = body.get("uploadUrl") if isinstance(body, dict) else None
    if isinstance(value, str) and value.startswith(("https://", "http://")):
        return value
    return None


def _upload_warning(split: Split) -> str:
    sizes = ", ".join(f"{a.name!r} ({a.size} bytes)" for a in split.attachments)
    return (
        f"over Graph's 4 MB request limit: sent as a draft with {len(split.attachments)}"
        f" attachment(s) added separately: {sizes}; other header fields of those parts"
        " are not carried"
    )


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


def _encoded_size(size: int) -> int:
    return (size + 2) // 3 * 4


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
            upload_sessions=settings.upload_sessions,
        )
    except ValueError as exc:
        raise ConfigError(f"ESPRELAY_GRAPH_*: {exc}") from None


KIND = ProviderKind("graph", GraphSettings, build, "Microsoft 365 via Microsoft Graph sendMail")
