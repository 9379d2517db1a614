"""Resend: ``POST /emails`` with a JSON body built from the parsed message.

Facts from Resend's OpenAPI description (resend/resend-openapi ``resend.json``, the
``SendEmailRequest`` schema) and its documentation pages, cited where used:

- Bearer API key; ``from``, ``to`` and ``subject`` are required; ``to`` holds at most 50
  addresses; ``cc``, ``bcc`` and ``reply_to`` are strings or arrays of strings;
  ``headers`` is an object of string values (one per name); ``attachments`` are
  ``{content, filename, content_type, content_id}``; ``tags`` are ``{name, value}`` of
  ASCII letters, digits, ``_`` and ``-``, at most 256 characters each.
- "max 40MB per email, after Base64 encoding of the attachments" (send-email reference).
- ``text``: "If not provided, the HTML will be used to generate a plain text version.
  You can opt out of this behavior by setting value to an empty string." An HTML-only
  message is sent with ``text: ""`` so that it arrives as it was written.
- The ``Idempotency-Key`` request header: "Idempotency keys can be up to 256 characters";
  Resend "checks whether an email with the same idempotency key has already been sent in
  the last 24 hours" and answers with the first response instead of sending again
  (resend.com/docs/dashboard/emails/idempotency-keys).  The same key with another
  payload is ``409 invalid_idempotent_request``; while the first request is still in
  progress, ``409 concurrent_idempotent_requests``.  esprelay sends the spool id, the
  same on every attempt of a message, so a retry after a timeout (the ESP may have sent
  it) cannot send it twice within those 24 hours.
- Resend's SMTP service reads the key from a ``Resend-Idempotency-Key`` header of the
  message (resend.com/docs/send-with-smtp): an application that used that service keeps
  its own key, which then wins over the spool id (and is not sent on as a header).
- Errors are ``{"statusCode", "name", "message"}`` (resend.com/docs/api-reference/errors).
- Rate limit: 2 requests per second per team by default; every answer carries
  ``ratelimit-limit``, ``ratelimit-remaining``, ``ratelimit-reset`` (seconds) and a 429
  ``retry-after`` (resend.com/changelog/api-rate-limit).  The provider keeps the rate
  itself (``ESPRELAY_RESEND_RATE``) and holds every request when Resend says the window
  is spent.
- Attachments Resend does not send: the extensions of its knowledge-base page "What
  attachment types are not supported?" (:data:`BLOCKED_EXTENSIONS`).  Resend gives no
  error for them, so esprelay leaves such an attachment out itself and says so in a
  warning; the rest of the message is delivered.
- Display names (django-anymail's Resend backend, which works around both): Resend
  refuses a quoted display name (one with a comma, for instance) in ``to``/``cc``/
  ``bcc``/``reply_to``, but takes an RFC 2047 encoded word there; in ``from`` an encoded
  word is refused ("security_error", 451) and an unquoted Unicode name is taken, while
  some punctuation still makes ``from`` invalid (422).
"""

from __future__ import annotations

import base64
import math
import mimetypes
import re
from email.charset import QP, Charset
from typing import Any

import httpx
from pydantic import SecretStr

from esprelay.clock import SYSTEM_CLOCK, Clock
from esprelay.errors import (
    DeliveryError,
    MessageRejected,
    ProviderConfigError,
    ProviderUnavailable,
    RateLimited,
)
from esprelay.message.header import raw_value, read_header, unfolded
from esprelay.message.mime import (
    Attachment,
    Mailbox,
    ParsedMessage,
    fallback_filename,
    full_content_type,
    parse,
    summarize,
)
from esprelay.models import OutboundMessage, SendResult
from esprelay.providers.base import (
    Built,
    HttpProvider,
    PostTarget,
    ProviderKind,
    ProviderSettings,
    classify_status,
    excerpt,
    json_body,
    json_object,
    parse_retry_after,
)
from esprelay.ratelimit import Rate, RateLimit

REQUEST_LIMIT = 40_000_000  # bytes: "max 40MB per email, after Base64 encoding"
TO_LIMIT = 50  # SendEmailRequest.to: maxItems 50
KEY_LIMIT = 256  # Idempotency-Key: maxLength 256
TAG_LIMIT = 256  # Tag name and value: "no more than 256 characters"
#: The tag that carries the spool id, for matching Resend's webhook events to the queue.
ID_TAG = "esprelay_id"
#: The longest esprelay holds every request after Resend says its window is spent;
#: a longer wait (a daily quota) is left to the spool's retry schedule instead of
#: keeping delivery workers waiting.
MAX_HOLD = 60.0
#: Resend's SMTP service takes the idempotency key from this header (lower case).
KEY_HEADER = b"resend-idempotency-key"
#: Trace headers that describe the hops so far; Resend writes its own (and signs).
DROPPED_HEADERS = frozenset({"received", "return-path", "dkim-signature"})
#: "You can send any file attachment types except for those in the following list."
#: (resend.com/docs/knowledge-base/what-attachment-types-are-not-supported)
_BLOCKED = """
    adp app asp bas bat cer chm cmd com cpl crt csh der exe fxp gadget hlp hta inf ins
    isp its js jse ksh lib lnk mad maf mag mam maq mar mas mat mau mav maw mda mdb mde
    mdt mdw mdz msc msh msh1 msh2 mshxml msh1xml msh2xml msi msp mst ops pcd pif plg prf
    prg reg scf scr sct shb shs sys ps1 ps1xml ps2 ps2xml psc1 psc2 tmp url vb vbe vbs
    vps vsmacros vss vst vsw vxd ws wsc wsf wsh xnk
"""
BLOCKED_EXTENSIONS = frozenset(_BLOCKED.split())
#: Errors that say the key, the account or the domain is wrong: an operator must act.
CONFIG_ERRORS = frozenset(
    {
        "missing_api_key",
        "restricted_api_key",
        "invalid_api_key",
        "invalid_api_Key",  # spelled so in resend-node's table of error names
        "invalid_from_address",
        "invalid_to_address",  # "You can only send testing emails to your own address"
        "not_found",
        "method_not_allowed",
    }
)
QUOTA_ERRORS = frozenset({"daily_quota_exceeded", "monthly_quota_exceeded"})
_TAG_TEXT = re.compile(r"[A-Za-z0-9_-]{1,256}")
_KEY_TEXT = re.compile(r"[ -~]{1,256}")  # printable ASCII: a valid HTTP header value
#: Characters that would need quoting in a display name (RFC 5322 specials).
_SPECIALS = set('()<>[]:;@\\,."')
#: Those that make Resend's ``from`` invalid when unquoted (and quoting is refused).
_FROM_UNSAFE = re.compile(r'[",;:<>@\\]+')
_WORDS = Charset("utf-8")
_WORDS.header_encoding = QP


class ControlHeaderError(ValueError):
    """A Resend-Idempotency-Key header Resend would not take; the text says why."""


def read_idempotency_key(raw: bytes) -> tuple[str | None, tuple[str, ...]]:
    """The message's ``Resend-Idempotency-Key`` (the first one) and warnings; None
    without one.  Raises :class:`ControlHeaderError` for a key Resend would refuse."""
    # The header section only (it ends at the first empty line), read as SES's control
    # headers are: the obsolete "Name :" form included.
    fields = read_header(raw, obsolete=True).all(KEY_HEADER)
    if not fields:
        return None, ()
    warnings: tuple[str, ...] = ()
    if len(fields) > 1:
        warnings = (f"Resend-Idempotency-Key given {len(fields)} times: the first is used",)
    key = unfolded(raw_value(raw, fields[0]))
    if not _KEY_TEXT.fullmatch(key):
        shown = ascii(key) if len(key) <= 60 else ascii(key[:56]) + "..."
        raise ControlHeaderError(
            f"Resend-Idempotency-Key {shown} is not 1 to {KEY_LIMIT} printable ASCII characters"
        )
    return key, warnings


# -- the payload, pure -----------------------------------------------------------------


def format_from(box: Mailbox, warnings: list[str]) -> str:
    """``Name <addr>`` with the name unquoted and unencoded, as Resend's ``from`` needs."""
    name = box.name.strip()
    if not name or name == box.addr:
        return box.addr
    safe = " ".join(_FROM_UNSAFE.sub(" ", name).split())
    if safe != name:
        warnings.append(
            f"From display name {name!r} sent as {safe!r} (Resend refuses a quoted or"
            " encoded name in from)"
        )
    return f"{safe} <{box.addr}>" if safe else box.addr


def format_address(box: Mailbox) -> str:
    """``addr``, ``Name <addr>``, or ``=?utf-8?q?...?= <addr>`` for a name that is not
    plain ASCII or would need quoting (Resend refuses quoted names)."""
    name = box.name.strip()
    if not name:
        return box.addr
    if name.isascii() and name.isprintable() and not any(c in _SPECIALS for c in name):
        return f"{name} <{box.addr}>"
    return f"{_WORDS.header_encode(name)} <{box.addr}>"


#: A request body: one email (``POST /emails``) or a batch of them (``POST /emails/batch``).
Payload = dict[str, Any] | list[dict[str, Any]]


def build_payload(
    parsed: ParsedMessage, spool_id: str = "", *, provider: str = "resend"
) -> tuple[Payload, list[str]]:
    """The JSON for ``parsed``, and what had to change to fit; pure.

    An object for ``POST /emails``; a list for ``POST /emails/batch`` when every
    recipient is blind (Resend needs a To, and one To shared by several blind recipients
    would show them to each other): then each gets its own copy, addressed to itself.
    """
    warnings = list(parsed.warnings)
    if parsed.from_ is None:
        raise MessageRejected("no usable From address and no envelope sender", provider=provider)
    r = parsed.recipients
    to, cc, bcc = r.to, r.cc, r.bcc
    copies: tuple[Mailbox, ...] = ()
    if not to and cc:
        warnings.append("no To recipient: the Cc recipients are sent as To (Resend needs a To)")
        to, cc = cc, ()
    if not to and len(bcc) == 1:
        warnings.append("no visible recipient: the Bcc recipient is sent as To (Resend needs a To)")
        to, bcc = bcc, ()
    elif not to and bcc:
        warnings.append(
            f"no visible recipient: each of the {len(bcc)} Bcc recipients gets a copy"
            " addressed to itself (Resend needs a To; sent as one batch)"
        )
        copies, bcc = bcc, ()
    elif not to:
        raise MessageRejected("no recipients", provider=provider)
    for field, boxes in (("To", to), ("Cc", cc), ("Bcc", bcc), ("Bcc", copies)):
        if len(boxes) > TO_LIMIT:
            raise MessageRejected(
                f"{len(boxes)} {field} recipients; Resend takes at most {TO_LIMIT}",
                provider=provider,
            )
    payload: dict[str, Any] = {
        "from": format_from(parsed.from_, warnings),
        "to": [format_address(b) for b in to],
    }
    if parsed.subject:
        payload["subject"] = parsed.subject
    else:
        payload["subject"] = "(no subject)"
        warnings.append("no Subject: sent as '(no subject)' (Resend requires one)")
    if cc:
        payload["cc"] = [format_address(b) for b in cc]
    if bcc:
        payload["bcc"] = [format_address(b) for b in bcc]
    if parsed.reply_to:
        payload["reply_to"] = [format_address(b) for b in parsed.reply_to]

    if parsed.html:
        payload["html"] = parsed.html
        # Without a text body Resend writes one from the HTML; "" opts out.
        payload["text"] = parsed.text or ""
    elif parsed.text:
        payload["text"] = parsed.text
    else:
        payload["text"] = " "
        warnings.append("no text or HTML body: sent a blank text body (Resend requires one)")

    headers = _headers(parsed, warnings)
    if headers:
        payload["headers"] = headers
    attachments = _attachments(parsed, warnings)
    if attachments:
        payload["attachments"] = attachments
    if _TAG_TEXT.fullmatch(spool_id):
        payload["tags"] = [{"name": ID_TAG, "value": spool_id}]
    if not copies:
        return payload, warnings
    if attachments:
        # "Batch does not support attachments" (django-anymail's Resend notes; the
        # send-email skill of resend/resend-skills).
        raise MessageRejected(
            f"{len(copies)} blind recipients and no To or Cc, and attachments: Resend"
            " sends separate copies only as a batch, which takes no attachments",
            provider=provider,
        )
    return [{**payload, "to": [format_address(b)]} for b in copies], warnings


def _headers(parsed: ParsedMessage, warnings: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    seen: set[str] = set()
    dropped: list[str] = []
    for name, value in parsed.headers:
        lname = name.lower()
        if lname == "resend-idempotency-key":
            continue  # Resend's SMTP control header: sent as the request's key
        if lname in DROPPED_HEADERS:
            dropped.append(name)
        elif lname in seen:
            dropped.append(f"{name} (repeated)")  # a JSON object holds one value per name
        else:
            seen.add(lname)
            out[name] = value
    if dropped:
        warnings.append(f"headers Resend does not take were dropped: {summarize(dropped)}")
    return out


def extension(filename: str) -> str:
    """The lower-cased extension of ``filename`` without the dot ("" without one)."""
    base = filename.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[1].lower().strip() if "." in base else ""


def _attachments(parsed: ParsedMessage, warnings: list[str]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for index, att in enumerate(parsed.attachments, 1):
        filename = att.filename or _fallback(att, index)
        if not att.filename:
            warnings.append(f"attachment {index} ({att.content_type}) had no filename: {filename}")
        ext = extension(filename)
        if ext in BLOCKED_EXTENSIONS:
            warnings.append(
                f"attachment {index} {filename!r} left out: Resend does not send .{ext} files"
            )
            continue
        if not att.content:
            warnings.append(f"attachment {index} is empty and was left out (Resend refuses it)")
            continue
        guessed = mimetypes.guess_type(filename, strict=False)[0]
        if (
            guessed
            and guessed != att.content_type
            and att.content_type != "application/octet-stream"
        ):
            warnings.append(
                f"attachment {index} {filename!r} is {att.content_type}, its extension says"
                f" {guessed}: Resend may not deliver a message whose attachment names and"
                " types disagree"
            )
        item = {
            "content": base64.b64encode(att.content).decode("ascii"),
            "filename": filename,
            # With its parameters: an invitation keeps its method, a text its charset.
            "content_type": full_content_type(att),
        }
        if att.inline and att.content_id:
            item["content_id"] = att.content_id
        elif att.inline:
            warnings.append(f"inline part {index} has no Content-ID: sent as an attachment")
        out.append(item)
    return out


def _fallback(att: Attachment, index: int) -> str:
    name = fallback_filename(att, index)
    if extension(name) in BLOCKED_EXTENSIONS:
        return f"attachment-{index}.dat"  # never invent a name Resend leaves out
    return name


# -- the provider ----------------------------------------------------------------------


class ResendProvider(HttpProvider):
    kind = "resend"
    rebuilds_message = True
    smtputf8 = False  # "Resend does not support sending from or to Unicode mailboxes" (anymail)
    #: Raw bytes that still fit 40 MB after base64 (4/3) with room for the JSON around.
    max_message_size = REQUEST_LIMIT * 3 // 4 - 100_000
    #: ``to`` takes at most 50; with every envelope recipient in one field at worst.
    max_recipients = TO_LIMIT

    def __init__(
        self,
        client: httpx.AsyncClient,
        api_key: SecretStr,
        api_url: str,
        *,
        rate: float = 2.0,
        clock: Clock = SYSTEM_CLOCK,
        name: str | None = None,
    ) -> None:
        super().__init__(client, name)
        self._api_key = api_key
        self.endpoint = api_url.rstrip("/") + "/emails"
        headers = {
            "Authorization": f"Bearer {api_key.get_secret_value()}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        self._target = PostTarget(self.endpoint, headers)
        self._batch = PostTarget(self.endpoint + "/batch", headers)
        self.rate_limit = RateLimit(rate, burst=max(1, math.ceil(rate)), clock=clock)

    def refusal(self, message: OutboundMessage) -> str | None:
        """A malformed Resend-Idempotency-Key, refused at the end of DATA."""
        try:
            read_idempotency_key(message.raw)
        except ControlHeaderError as exc:
            return str(exc)
        return None

    def build_request(self, message: OutboundMessage) -> Built:
        try:
            key, key_warnings = read_idempotency_key(message.raw)
        except ControlHeaderError as exc:  # spooled before the check at DATA existed
            raise MessageRejected(str(exc), provider=self.name) from None
        # With the application's own key, the request must not vary with the spool id: the
        # same message submitted again (same bytes, new spool id) is then the same request,
        # which Resend answers from its first answer instead of a 409.
        payload, warnings = build_payload(
            parse(message.raw, message.envelope), "" if key else message.id, provider=self.name
        )
        warnings.extend(key_warnings)
        body = json_body(payload)
        if len(body) > REQUEST_LIMIT:
            raise MessageRejected(
                f"request of {len(body)} bytes exceeds Resend's 40 MB limit", provider=self.name
            )
        target = self._batch if isinstance(payload, list) else self._target
        request = target.request(body)
        key = key or message.id
        if _KEY_TEXT.fullmatch(key):
            request.headers["Idempotency-Key"] = key
        return Built(request, tuple(warnings))

    def parse_response(self, response: httpx.Response, message: OutboundMessage) -> SendResult:
        self._note_window(response)
        answer = json_object(response) or {}
        ids = [answer.get("id")]  # /emails: {"id"}; /emails/batch: {"data": [{"id"}...]}
        if isinstance(answer.get("data"), list):
            ids = [item.get("id") if isinstance(item, dict) else None for item in answer["data"]]
        if not ids or not all(isinstance(i, str) and i for i in ids):
            # Safe to retry: the same Idempotency-Key cannot send it twice.
            raise ProviderConfigError(
                f"HTTP {response.status_code} without an email id (not Resend's answer; check"
                f" ESPRELAY_RESEND_API_URL): {excerpt(response)}",
                provider=self.name,
                status_code=response.status_code,
            )
        return SendResult(provider_message_id=",".join(str(i) for i in ids))

    def classify_error(self, response: httpx.Response) -> DeliveryError:
        status = response.status_code
        answer = json_object(response) or {}
        name = answer.get("name") if isinstance(answer.get("name"), str) else ""
        detail = f"HTTP {status}: {excerpt(response)}"
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if status == 429 or name == "rate_limit_exceeded" or name in QUOTA_ERRORS:
            if retry_after is None:
                retry_after = _seconds(response, "ratelimit-reset")
            if name not in QUOTA_ERRORS and self.rate_limit is not None:
                # Every request of this provider waits, not only this message's retry.
                hold = retry_after if retry_after is not None else 1.0
                self.rate_limit.hold_until(min(hold, MAX_HOLD))
            return RateLimited(
                detail, provider=self.name, status_code=status, retry_after=retry_after
            )
        self._note_window(response)
        if name in CONFIG_ERRORS or status in (401, 403, 404, 405):
            # validation_error is also 403 for an unverified domain or a test sender.
            return ProviderConfigError(
                f"{detail} (check ESPRELAY_RESEND_API_KEY, ESPRELAY_RESEND_API_URL and the"
                " sending domain)",
                provider=self.name,
                status_code=status,
            )
        if name == "concurrent_idempotent_requests":
            # An earlier attempt of this message is still being processed: ask again later.
            return ProviderUnavailable(
                detail, provider=self.name, status_code=status, retry_after=retry_after
            )
        if name == "invalid_idempotent_request":
            return MessageRejected(
                f"{detail} (Resend took another request with this Idempotency-Key in the"
                " last 24 hours and sends nothing for this one)",
                provider=self.name,
                status_code=status,
            )
        # validation_error/missing_required_field/invalid_attachment (400, 422) and
        # security_error (451) fail the message; application_error and 5xx are retried.
        return classify_status(response, provider=self.name)

    def _note_window(self, response: httpx.Response) -> None:
        """``ratelimit-remaining: 0``: hold every request until ``ratelimit-reset``."""
        if (
            self.rate_limit is None
            or response.headers.get("ratelimit-remaining", "").strip() != "0"
        ):
            return
        reset = _seconds(response, "ratelimit-reset")
        self.rate_limit.hold_until(min(reset if reset is not None else 1.0, MAX_HOLD))


def _seconds(response: httpx.Response, header: str) -> float | None:
    try:
        value = float(response.headers.get(header, ""))
    except ValueError:
        return None
    return max(0.0, value) if math.isfinite(value) else None


class ResendSettings(ProviderSettings):
    """``ESPRELAY_RESEND_*``: an API key (sending access is enough), and the request rate
    to keep (Resend's default limit is 2 requests per second per team)."""

    api_key: SecretStr
    api_url: str = "https://api.resend.com"
    rate: Rate = 2.0  # also N/min (esprelay.ratelimit)

    def api_urls(self) -> tuple[str, ...]:
        return (self.api_url,)


def build(settings: ResendSettings, client: httpx.AsyncClient) -> ResendProvider:
    return ResendProvider(client, settings.api_key, settings.api_url, rate=settings.rate)


KIND = ProviderKind("resend", ResendSettings, build, "Resend /emails (JSON)")
