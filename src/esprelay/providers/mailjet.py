"""Mailjet: Send API v3.1, ``POST /v3.1/send`` with a JSON body built from the parsed message.

Facts from Mailjet's API documentation (mailjet/api-documentation ``guides/_send-api.md``:
"Send API v3.1", its JSON properties and its error table; the status-code and
rate-limit pages of dev.mailjet.com) and django-anymail's Mailjet backend and notes
(``docs/esps/mailjet.rst``), the public record of Mailjet's quirks:

- Basic auth with the API key and the secret key; the body is ``{"Messages": [...]}``,
  at most 50 messages a call; ``Globals`` holds properties shared by every message
  (anymail's backend sends everything but ``To`` there); ``SandboxMode: true`` at the
  root validates everything and sends nothing, and the answer then has no MessageID.
- A message: ``From`` ``{Email, Name}``; ``To`` (required, not empty), ``Cc``, ``Bcc``
  as lists of ``{Email, Name}``, at most 50 recipients in all (``send-0015``); a
  ``Subject`` of at most 255 characters; ``TextPart`` and/or ``HTMLPart``
  (``send-0003`` without either); ``Attachments`` and ``InlinedAttachments`` as
  ``{ContentType, Filename, Base64Content[, ContentID]}``, "Size of all attachments,
  including inline may not exceed 15 MB total", a Filename required (anymail), no empty
  string anywhere (``mj-0012``); one ``ReplyTo``; ``CustomID``; ``Headers``, a JSON
  object, without the headers Mailjet sets itself or from a property
  (:data:`FORBIDDEN_HEADERS`, ``send-0011``): among them **Date and Message-Id**, which
  cannot be set at all, and From, Sender, To, Cc, Bcc, Subject, Return-Path, Received,
  DKIM-Signature, List-Id, User-Agent and X-Mailer.
- "The recipients listed in To will receive a common message, showing every other
  recipient"; blind recipients that must not see each other need one message each.
- The answer lists one result per message, "in the order of the input", each
  ``Status: success`` with ``To``/``Cc``/``Bcc`` lists of ``{Email, MessageUUID,
  MessageID, MessageHref}``, or ``Status: error`` with ``Errors`` of ``{ErrorIdentifier,
  ErrorCode, StatusCode, ErrorMessage, ErrorRelatedTo}``.  "In case of errors on one or
  several of the messages, the API will not stop the processing of other successful
  messages", and the HTTP status of such an answer is then a 4xx (anymail: "Mailjet
  uses 4xx status codes for partial failure in batch send").  A request that fails as a
  whole answers ``{ErrorIdentifier, ErrorCode, ErrorMessage, StatusCode}``.
- Mailjet's other APIs (events, statistics) know a message by its ``MessageID``, not its
  ``MessageUUID`` (anymail), so MessageID is the provider id kept for the status API.
- ``401``: a wrong or suspended key pair; ``429``: "the maximum number of calls allowed
  per minute"; Mailjet documents no rate-limit headers, so a 429 (and its Retry-After,
  if any) holds every request of the provider for a while.
- The ``Sender`` property needs Mailjet's approval (``send-0006``): the envelope sender
  is not sent, Mailjet handles bounces itself.  UTF-8 mailboxes are taken as they are
  (anymail: "Mailjet fully supports sending from or to Unicode mailboxes").

**Partial results.**  One Mailjet message has one status for all its recipients, so
esprelay sends one message with every recipient when the message has a visible one
(To and Cc from the headers as far as the envelope allows, the other envelope
recipients as Bcc): it succeeds or fails as a whole.  A message with blind recipients
only is sent as one Mailjet message per recipient, addressed To that recipient (Mailjet
needs a To, and a shared one would show them to each other), the content once in
``Globals``.  Each result is then one recipient's: when Mailjet refuses some and sends
the others, :attr:`SendResult.rejected <esprelay.models.SendResult.rejected>` names the
refused ones with their errors (transient or permanent by their ``StatusCode``) and the
message counts as sent for the rest, so no retry can send it to them twice.

The SMTP relay's control headers (``X-Mailjet-Campaign``, ``X-MJ-EventPayload``...) become
the properties of the same meaning (:data:`CONTROLS`); a malformed one is refused at the
end of DATA.  ``CustomID`` is always the spool id, to match Mailjet's events to the
queue, so an ``X-MJ-CustomID`` of the message is not applied (a warning says so).
"""

from __future__ import annotations

import base64
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.charset import QP, Charset
from typing import Any

import httpx
from pydantic import SecretStr

from esprelay.errors import (
    DeliveryError,
    MessageRejected,
    PermanentDeliveryError,
    ProviderConfigError,
    ProviderUnavailable,
    RateLimited,
)
from esprelay.message.header import decoded_text, may_have, read_header
from esprelay.message.mime import (
    Attachment,
    Mailbox,
    ParsedMessage,
    attachment_text,
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
from esprelay.ratelimit import RateLimit

#: The raw message, as received over SMTP: "Size of all attachments, including inline
#: may not exceed 15 MB total"; a raw message of 15 MB holds less than that.
MAX_MESSAGE_SIZE = 15_000_000
#: The decoded attachments of one message, inline parts included.
ATTACHMENT_LIMIT = 15_000_000
#: Recipients of one message (To, Cc and Bcc together): "MAX RECIPIENTS: 50".
MAX_RECIPIENTS = 50
#: "Subject: Maximum length is 255 chars" (mj-0006 beyond).
SUBJECT_LIMIT = 255
#: Mailjet documents no rate for the Send API ("a high rate limit"): the bucket only
#: holds every request after a 429, it never slows a normal flow.
SEND_RATE = 1000.0
#: How long a 429 without Retry-After holds every request, and the longest hold.
DEFAULT_HOLD = 10.0
MAX_HOLD = 60.0
#: Where build_request leaves the envelope recipients of each Mailjet message, in order.
GROUPS = "esprelay.mailjet.groups"
#: "List of forbidden headers" (send-0011): Mailjet writes them, or takes them only from
#: a property of the message.
FORBIDDEN_HEADERS = frozenset(
    {
        "from",
        "sender",
        "subject",
        "to",
        "cc",
        "bcc",
        "return-path",
        "delivered-to",
        "dkim-signature",
        "domainkey-status",
        "received-spf",
        "authentication-results",
        "received",
        "x-mailjet-prio",
        "x-mailjet-debug",
        "user-agent",
        "x-mailer",
        "x-mj-customid",
        "x-mj-eventpayload",
        "x-mj-vars",
        "x-mj-templateerrordeliver",
        "x-mj-templateerrorreporting",
        "x-mj-templatelanguage",
        "x-mailjet-trackopen",
        "x-mailjet-trackclick",
        "x-mj-templateid",
        "x-mj-workflowid",
        "x-feedback-id",
        "x-mailjet-segmentation",
        "list-id",
        "x-mj-mid",
        "x-mj-errormessage",
        "date",
        "x-csa-complaints",
        "message-id",
        "x-mailjet-campaign",
        "x-mj-statisticscontactslistid",
    }
)
#: The headers Mailjet's API can never carry and that name the message itself.
IDENTITY_HEADERS = ("date", "message-id")
#: SMTP relay control headers and the message property each one becomes.
CONTROLS = {
    "x-mailjet-campaign": "CustomCampaign",
    "x-mailjet-deduplicatecampaign": "DeduplicateCampaign",
    "x-mj-eventpayload": "EventPayload",
    "x-mailjet-trackopen": "TrackOpens",
    "x-mailjet-trackclick": "TrackClicks",
    "x-mailjet-prio": "Priority",
    "x-mj-monitoringcategory": "MonitoringCategory",
}
#: Control headers of the SMTP relay that esprelay does not apply: CustomID carries the
#: spool id, and a template would replace the message's own content.
NOT_APPLIED = frozenset(
    {
        "x-mj-customid",
        "x-mj-templateid",
        "x-mj-templatelanguage",
        "x-mj-vars",
        "x-mj-templateerrorreporting",
        "x-mj-templateerrordeliver",
    }
)
_TRUE = frozenset({"true", "yes", "y", "1"})
_FALSE = frozenset({"false", "no", "n", "0"})
_TRACKING = {"0": "disabled", "1": "enabled"}
_ASCII_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})
_WORDS = Charset("utf-8")
_WORDS.header_encoding = QP


class ControlHeaderError(ValueError):
    """A Mailjet control header Mailjet would not take; the text says why."""


# --- the SMTP relay's control headers -------------------------------------------------


@dataclass(frozen=True)
class Controls:
    """The properties the control headers of a message set, and what was not applied."""

    properties: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


def read_controls(raw: bytes) -> Controls:
    """The Mailjet control headers of ``raw`` as message properties; raises
    :class:`ControlHeaderError` for one Mailjet would refuse.  Cheap for the common
    message, which has none."""
    if not may_have(raw, b"x-m"):
        return Controls()
    header = read_header(raw, obsolete=True)
    found: list[tuple[str, str]] = []
    for item in header.fields:
        name = item.name.decode("ascii")
        if name in CONTROLS or name in NOT_APPLIED:
            try:
                found.append((name, decoded_text(raw, item)))
            except UnicodeError:
                raise ControlHeaderError(f"{_title(name)} is not UTF-8 text") from None
    return controls_from(found)


def controls_from(fields: Iterable[tuple[str, str]]) -> Controls:
    """The properties for ``(lower-case name, value)`` control fields, in message order."""
    properties: dict[str, Any] = {}
    warnings: list[str] = []
    seen: set[str] = set()
    ignored: list[str] = []
    for name, value in fields:
        if name in NOT_APPLIED:
            ignored.append(_title(name))
            continue
        if name in seen:
            warnings.append(f"{_title(name)} given more than once: the first is used")
            continue
        seen.add(name)
        prop = CONTROLS[name]
        properties[prop] = _control_value(name, value)
    if properties.get("DeduplicateCampaign") and "CustomCampaign" not in properties:
        raise ControlHeaderError(
            "X-Mailjet-DeduplicateCampaign needs an X-Mailjet-Campaign (Mailjet send-0012)"
        )
    if ignored:
        warnings.append(
            f"Mailjet control headers not applied: {summarize(ignored)} (CustomID carries"
            " the spool id; templates would replace the message's content)"
        )
    return Controls(properties, tuple(warnings))


def _control_value(name: str, value: str) -> Any:
    shown = ascii(value) if len(value) <= 60 else ascii(value[:56]) + "..."
    if not value:
        raise ControlHeaderError(f"{_title(name)} is empty")
    if name == "x-mailjet-campaign" and len(value) > SUBJECT_LIMIT:
        raise ControlHeaderError(f"X-Mailjet-Campaign is over {SUBJECT_LIMIT} characters")
    if name == "x-mailjet-deduplicatecampaign":
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise ControlHeaderError(f"X-Mailjet-DeduplicateCampaign {shown} is not true or false")
    if name in ("x-mailjet-trackopen", "x-mailjet-trackclick"):
        if value not in _TRACKING:
            raise ControlHeaderError(f"{_title(name)} {shown} is not 0 or 1")
        return _TRACKING[value]
    if name == "x-mailjet-prio":
        if not (value.isascii() and value.isdigit()):
            raise ControlHeaderError(f"X-Mailjet-Prio {shown} is not a priority number")
        return int(value)
    return value


def _title(name: str) -> str:
    """``x-mj-customid`` as Mailjet writes it: ``X-MJ-CustomID``."""
    return {
        "x-mj-customid": "X-MJ-CustomID",
        "x-mj-eventpayload": "X-MJ-EventPayload",
        "x-mj-templateid": "X-MJ-TemplateID",
        "x-mj-templatelanguage": "X-MJ-TemplateLanguage",
        "x-mj-vars": "X-MJ-Vars",
        "x-mj-templateerrorreporting": "X-MJ-TemplateErrorReporting",
        "x-mj-templateerrordeliver": "X-MJ-TemplateErrorDeliver",
        "x-mj-monitoringcategory": "X-MJ-MonitoringCategory",
        "x-mailjet-campaign": "X-Mailjet-Campaign",
        "x-mailjet-deduplicatecampaign": "X-Mailjet-DeduplicateCampaign",
        "x-mailjet-trackopen": "X-Mailjet-TrackOpen",
        "x-mailjet-trackclick": "X-Mailjet-TrackClick",
        "x-mailjet-prio": "X-Mailjet-Prio",
    }.get(name, name)


# --- the request, pure ----------------------------------------------------------------


def mailbox(box: Mailbox) -> dict[str, str]:
    """``{"Email", "Name"}``; names go as they are (Send API v3.1 takes commas and
    non-ASCII in names, anymail)."""
    out = {"Email": box.addr}
    if box.name.strip() and box.name.strip() != box.addr:
        out["Name"] = box.name.strip()
    return out


#: The envelope recipients of each Mailjet message of a request, in order.
Groups = tuple[tuple[str, ...], ...]


def build_payload(
    parsed: ParsedMessage,
    spool_id: str,
    *,
    sandbox: bool = False,
    controls: Controls | None = None,
    provider: str = "mailjet",
) -> tuple[dict[str, Any], Groups, list[str]]:
    """The /v3.1/send JSON for ``parsed``, the envelope recipients of each of its
    messages (to read Mailjet's answer by), and what had to change to fit; pure."""
    warnings = list(parsed.warnings)
    if parsed.from_ is None:
        raise MessageRejected("no usable From address and no envelope sender", provider=provider)
    r = parsed.recipients
    if not r.all():
        raise MessageRejected("no recipients", provider=provider)
    if len(r.all()) > MAX_RECIPIENTS:
        raise MessageRejected(
            f"{len(r.all())} recipients; Mailjet takes at most {MAX_RECIPIENTS} per message",
            provider=provider,
        )
    shared: dict[str, Any] = {"From": mailbox(parsed.from_)}
    if parsed.subject:
        subject = parsed.subject
        if len(subject) > SUBJECT_LIMIT:
            subject = subject[: SUBJECT_LIMIT - 3] + "..."
            warnings.append(
                f"Subject of {len(parsed.subject)} characters cut to {SUBJECT_LIMIT}"
                " (Mailjet's limit)"
            )
        shared["Subject"] = subject
    if parsed.text:
        shared["TextPart"] = parsed.text
    if parsed.html:
        shared["HTMLPart"] = parsed.html
    if not parsed.text and not parsed.html:
        shared["TextPart"] = " "
        warnings.append("no text or HTML body: sent a blank text body (Mailjet requires one)")
    attachments, inlined = _attachments(parsed, warnings, provider)
    if attachments:
        shared["Attachments"] = attachments
    if inlined:
        shared["InlinedAttachments"] = inlined
    if parsed.reply_to:
        first = parsed.reply_to[0]
        if len(parsed.reply_to) > 1:
            warnings.append(
                f"{len(parsed.reply_to)} Reply-To addresses; Mailjet takes one: {first.addr}"
            )
        shared["ReplyTo"] = mailbox(first)
    headers = _headers(parsed, warnings)
    if headers:
        shared["Headers"] = headers
    if controls is not None:
        properties = dict(controls.properties)
        for prop in ("TrackOpens", "TrackClicks"):
            if prop in properties and not parsed.html:
                del properties[prop]
                warnings.append(f"{prop} not applied: Mailjet tracks only an HTML part")
        shared.update(properties)
        warnings.extend(controls.warnings)
    if spool_id:
        shared["CustomID"] = spool_id

    to, cc, bcc = r.to, r.cc, r.bcc
    if not to and cc:
        warnings.append("no To recipient: the Cc recipients are sent as To (Mailjet needs a To)")
        to, cc = cc, ()
    payload: dict[str, Any]
    if to:
        message = dict(shared)
        message["To"] = [mailbox(b) for b in to]
        if cc:
            message["Cc"] = [mailbox(b) for b in cc]
        if bcc:
            message["Bcc"] = [mailbox(b) for b in bcc]
        payload = {"Messages": [message]}
        groups: Groups = (tuple(b.addr for b in (*to, *cc, *bcc)),)
    elif len(bcc) == 1:
        warnings.append(
            "no visible recipient: the Bcc recipient is sent as To (Mailjet needs a To)"
        )
        payload = {"Messages": [{**shared, "To": [mailbox(bcc[0])]}]}
        groups = ((bcc[0].addr,),)
    else:
        warnings.append(
            f"no visible recipient: each of the {len(bcc)} Bcc recipients gets a copy"
            " addressed to itself (Mailjet needs a To)"
        )
        payload = {"Globals": shared, "Messages": [{"To": [mailbox(b)]} for b in bcc]}
        groups = tuple((b.addr,) for b in bcc)
    if sandbox:
        payload["SandboxMode"] = True
    return payload, groups, warnings


def _headers(parsed: ParsedMessage, warnings: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    seen: set[str] = set()
    identity: list[str] = []
    forbidden: list[str] = []
    repeated: list[str] = []
    for name, value in parsed.headers:
        lname = name.lower()
        if lname in CONTROLS or lname in NOT_APPLIED:
            continue  # read by read_controls
        if lname in IDENTITY_HEADERS:
            identity.append(name)
        elif lname in FORBIDDEN_HEADERS:
            forbidden.append(name)
        elif lname in seen:
            repeated.append(name)  # a JSON object holds one value per name
        else:
            seen.add(lname)
            out[name] = value if value.isascii() else _encoded(value)
    if identity:
        warnings.append(
            f"{' and '.join(identity)} cannot be set through Mailjet's API: Mailjet writes"
            " its own (its MessageID is kept as the provider id)"
        )
    if forbidden:
        warnings.append(f"headers Mailjet does not take were dropped: {summarize(forbidden)}")
    if repeated:
        warnings.append(f"repeated headers were dropped (Mailjet takes one): {summarize(repeated)}")
    return out


def _encoded(value: str) -> str:
    """A non-ASCII value as RFC 2047 encoded words (at most 75 characters each), so
    that the header Mailjet writes is 7-bit whatever it does with 8-bit values."""
    words = _WORDS.header_encode_lines(value, itertools.repeat(75))
    return " ".join(w for w in words if w)


def _attachments(
    parsed: ParsedMessage, warnings: list[str], provider: str
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    attachments: list[dict[str, str]] = []
    inlined: list[dict[str, str]] = []
    total = 0
    for index, att in enumerate(parsed.attachments, 1):
        if not att.content:
            warnings.append(f"attachment {index} is empty and was left out (Mailjet refuses it)")
            continue
        filename = att.filename or fallback_filename(att, index)
        if not att.filename:
            warnings.append(f"attachment {index} ({att.content_type}) had no filename: {filename}")
        content = _content(att, warnings)
        total += len(content)
        item = {
            # Mailjet adds charset=utf-8 to a text type itself (anymail): text goes as UTF-8.
            "ContentType": full_content_type(att, keep=lambda key: key != "charset"),
            "Filename": filename,
            "Base64Content": base64.b64encode(content).decode("ascii"),
        }
        if att.inline and att.content_id:
            item["ContentID"] = att.content_id
            inlined.append(item)
        else:
            if att.inline:
                warnings.append(f"inline part {index} has no Content-ID: sent as an attachment")
            attachments.append(item)
    if total > ATTACHMENT_LIMIT:
        raise MessageRejected(
            f"attachments of {total} bytes; Mailjet takes at most 15 MB per message",
            provider=provider,
        )
    return attachments, inlined


def _content(att: Attachment, warnings: list[str]) -> bytes:
    """A text attachment in another charset than UTF-8 is sent as UTF-8."""
    charset = dict(att.params).get("charset", "").lower()
    if not att.content_type.startswith("text/") or not charset or charset in _ASCII_CHARSETS:
        return att.content
    return attachment_text(att, warnings).encode("utf-8")


# --- Mailjet's answer -----------------------------------------------------------------


def _groups(response: httpx.Response, message: OutboundMessage) -> Groups:
    """The recipients of each Mailjet message of the request ``response`` answers."""
    try:
        groups = response.request.extensions.get(GROUPS)
    except RuntimeError:  # a response made without its request
        groups = None
    if isinstance(groups, tuple):
        return groups
    return build_payload(parse(message.raw, message.envelope), message.id)[1]


def message_error(result: dict[str, Any], response: httpx.Response, provider: str) -> DeliveryError:
    """The error of one Mailjet message that failed, by its errors' ``StatusCode``: one
    permanent refusal dooms the message; then the account (401/403), the rate (429) and
    Mailjet's own trouble (5xx) are retried."""
    errors = [e for e in result.get("Errors") or [] if isinstance(e, dict)]
    said = []
    codes: list[int] = []
    for error in errors:
        code = error.get("StatusCode")
        status = code if isinstance(code, int) else response.status_code
        codes.append(status)
        related = error.get("ErrorRelatedTo")
        where = (
            f" [{', '.join(map(str, related))}]" if isinstance(related, list) and related else ""
        )
        text = " ".join(str(error.get("ErrorMessage", "")).split())[:200]
        said.append(f"{status} {error.get('ErrorCode', '?')}: {text}{where}")
    detail = "; ".join(said) or f"HTTP {response.status_code}: {excerpt(response)}"
    if not codes:
        codes = [response.status_code]
    permanent = [c for c in codes if 400 <= c < 500 and c not in (401, 403, 408, 429)]
    if permanent:
        return MessageRejected(detail, provider=provider, status_code=permanent[0])
    if 401 in codes or 403 in codes:
        return ProviderConfigError(
            f"{detail} (check the keys and the sender's validation at Mailjet)",
            provider=provider,
            status_code=401 if 401 in codes else 403,
        )
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    if 429 in codes:
        return RateLimited(detail, provider=provider, status_code=429, retry_after=retry_after)
    if any(c == 408 or c >= 500 for c in codes):
        status = next(c for c in codes if c == 408 or c >= 500)
        return ProviderUnavailable(
            detail, provider=provider, status_code=status, retry_after=retry_after
        )
    return PermanentDeliveryError(detail, provider=provider, status_code=codes[0])


def whole_failure(errors: Sequence[DeliveryError]) -> DeliveryError:
    """Every message of a request failed: a retryable error if any is, so that no
    recipient who could still get it is bounced (the others fail again, alone, later)."""
    for error in errors:
        if not error.permanent:
            return error
    return errors[0]


# --- the provider ---------------------------------------------------------------------


class MailjetProvider(HttpProvider):
    kind = "mailjet"
    rebuilds_message = True
    smtputf8 = True  # "Mailjet fully supports sending from or to Unicode mailboxes" (anymail)
    max_message_size = MAX_MESSAGE_SIZE
    max_recipients = MAX_RECIPIENTS

    def __init__(
        self,
        client: httpx.AsyncClient,
        api_key: SecretStr,
        secret_key: SecretStr,
        api_url: str = "https://api.mailjet.com",
        *,
        sandbox: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(client, name)
        #: Test mode: Mailjet validates each request and sends nothing.
        self.sandbox = sandbox
        self.endpoint = api_url.rstrip("/") + "/v3.1/send"
        pair = f"{api_key.get_secret_value()}:{secret_key.get_secret_value()}".encode()
        self._target = PostTarget(
            self.endpoint,
            {
                "Authorization": "Basic " + base64.b64encode(pair).decode("ascii"),
                "Accept": "application/json",
                "Content-Type": "application/json",
            },
        )
        self.rate_limit = RateLimit(SEND_RATE, burst=int(SEND_RATE))

    def refusal(self, message: OutboundMessage) -> str | None:
        """A malformed Mailjet control header, refused at the end of DATA."""
        try:
            read_controls(message.raw)
        except ControlHeaderError as exc:
            return str(exc)
        return None

    def build_request(self, message: OutboundMessage) -> Built:
        try:
            controls = read_controls(message.raw)
        except ControlHeaderError as exc:  # spooled before the check at DATA existed
            raise MessageRejected(str(exc), provider=self.name) from None
        payload, groups, warnings = build_payload(
            parse(message.raw, message.envelope),
            message.id,
            sandbox=self.sandbox,
            controls=controls,
            provider=self.name,
        )
        request = self._target.request(json_body(payload), {GROUPS: groups})
        return Built(request, tuple(warnings))

    def answered(self, response: httpx.Response) -> bool:
        """Mailjet answers a request some of whose messages failed with a 4xx that still
        lists every message's result: read it like a success."""
        if response.is_success:
            return True
        if not 400 <= response.status_code < 500 or response.status_code in (401, 429):
            return False
        answer = json_object(response)
        return answer is not None and isinstance(answer.get("Messages"), list)

    def parse_response(self, response: httpx.Response, message: OutboundMessage) -> SendResult:
        answer = json_object(response) or {}
        results = answer.get("Messages")
        groups = _groups(response, message)
        if (
            not isinstance(results, list)
            or len(results) != len(groups)
            or not all(isinstance(r, dict) for r in results)
        ):
            raise ProviderConfigError(
                f"HTTP {response.status_code} without a result for each message; is"
                f" ESPRELAY_MAILJET_API_URL Mailjet's API (https://api.mailjet.com)?"
                f" {excerpt(response, 120)}",
                provider=self.name,
                status_code=response.status_code,
            )
        ids: list[str] = []
        failed: list[tuple[tuple[str, ...], DeliveryError]] = []
        for group, result in zip(groups, results, strict=True):
            if result.get("Status") == "success":
                ids.extend(_message_ids(result))
            else:
                failed.append((group, message_error(result, response, self.name)))
        if failed and len(failed) == len(groups):
            error = whole_failure([e for _, e in failed])
            if isinstance(error, RateLimited):
                self._hold(error.retry_after)
            raise error
        rejected = tuple((addr, error) for group, error in failed for addr in group)
        return SendResult(provider_message_id=" ".join(ids) or None, rejected=rejected)

    def classify_error(self, response: httpx.Response) -> DeliveryError:
        status = response.status_code
        answer = json_object(response) or {}
        code = answer.get("ErrorCode")
        if isinstance(code, str):
            said = " ".join(str(answer.get("ErrorMessage", "")).split())[:300]
            detail = f"HTTP {status} {code}: {said}"
        else:
            detail = f"HTTP {status}: {excerpt(response)}"
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if status == 429:
            self._hold(retry_after)
            return RateLimited(
                detail, provider=self.name, status_code=status, retry_after=retry_after
            )
        if status in (401, 403):
            return ProviderConfigError(
                f"{detail} (check ESPRELAY_MAILJET_API_KEY and ESPRELAY_MAILJET_SECRET_KEY)",
                provider=self.name,
                status_code=status,
            )
        if status in (404, 405):
            return ProviderConfigError(
                f"{detail} (check ESPRELAY_MAILJET_API_URL)", provider=self.name, status_code=status
            )
        if status == 400:
            return MessageRejected(detail, provider=self.name, status_code=status)
        return classify_status(response, provider=self.name)

    def _hold(self, retry_after: float | None) -> None:
        """A 429: every request of the provider waits (Mailjet counts calls per minute)."""
        if self.rate_limit is not None:
            hold = retry_after if retry_after is not None else DEFAULT_HOLD
            self.rate_limit.hold_until(min(hold, MAX_HOLD))


def _message_ids(result: dict[str, Any]) -> list[str]:
    """The MessageID of each recipient of a successful message (none in sandbox mode)."""
    ids: list[str] = []
    for kind in ("To", "Cc", "Bcc"):
        for item in result.get(kind) or []:
            value = item.get("MessageID") if isinstance(item, dict) else None
            if isinstance(value, bool) or value in (None, 0, ""):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue
            ids.append(str(value))
    return ids


class MailjetSettings(ProviderSettings):
    """``ESPRELAY_MAILJET_*``: the API key and its secret key (Basic auth); ``sandbox``
    turns on Mailjet's SandboxMode (validated, nothing sent)."""

    api_key: SecretStr
    secret_key: SecretStr
    api_url: str = "https://api.mailjet.com"
    sandbox: bool = False

    def api_urls(self) -> tuple[str, ...]:
        return (self.api_url,)


def build(settings: MailjetSettings, client: httpx.AsyncClient) -> MailjetProvider:
    return MailjetProvider(
        client, settings.api_key, settings.secret_key, settings.api_url, sandbox=settings.sandbox
    )


KIND = ProviderKind("mailjet", MailjetSettings, build, "Mailjet Send API v3.1 (JSON)")
