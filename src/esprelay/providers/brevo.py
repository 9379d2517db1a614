"""Brevo: ``POST /v3/smtp/email`` with a JSON body built from the parsed message.

Facts from Brevo's API reference for sendTransacEmail
(https://developers.brevo.com/reference/sendtransacemail) and its guides, and from
django-anymail's Brevo backend and documentation (``docs/esps/brevo.rst``), the public
record of Brevo's quirks:

- the ``api-key`` header; ``sender``, ``to``, ``cc``, ``bcc`` as ``{email, name}``
  objects, ``to`` required (unless ``messageVersions``); ``subject`` and
  ``htmlContent`` required without a template ("HTML body content of the email.
  Required when templateId is not provided"; anymail: "Brevo's API returns an error
  if you attempt to send a message with only a plain-text body"); one ``replyTo``;
  ``tags``; ``attachment`` as ``{content (base64), name}`` where the type comes from
  the name's extension, from a fixed list (:data:`ALLOWED_EXTENSIONS`);
- ``headers``: "Custom email headers (non-standard headers) ... Standard email headers
  are not supported", names Title-Cased by Brevo; non-ASCII values are sent as raw
  8-bit bytes (anymail), so such a header is dropped with a warning;
- no inline images ("Brevo's v3 API doesn't support inline images, at all", anymail,
  confirmed with Brevo support): a ``cid:`` part goes as an ordinary attachment;
- a display name with non-ASCII characters and a special (a comma...) is silently
  dropped in sender/to/cc/bcc, so such a name is sent RFC 2047-encoded; in
  ``replyTo`` non-ASCII names go out as raw 8-bit (anymail), so they are left out;
- size: "The size limit for transactional emails is 20MB, including attachments and
  email content" (https://help.brevo.com/hc/en-us/articles/4402811730962); recipients:
  "99 per version" of ``messageVersions`` and 2000 per request (the API reference),
  the same 99 for a message with an attachment (the help article): 99 is the limit;
- success is ``201 {"messageId": "<...>"}`` (``{"messageIds": [...]}`` with
  ``messageVersions``); errors are ``{"code", "message"}``
  (https://developers.brevo.com/docs/how-it-works);
- rate limit: 1000 requests per second for this endpoint
  (https://developers.brevo.com/docs/api-limits); every response carries
  ``x-sib-ratelimit-limit``, ``-remaining`` and ``-reset`` (seconds until the window
  resets, https://developers.brevo.com/docs/limit-headers); a spent window (remaining
  0) or a ``429`` holds every request of the provider until the reset;
- test mode: ``"headers": {"X-Sib-Sandbox": "drop"}`` in the request body gives a
  ``201`` with a ``messageId``, sends nothing and logs nothing
  (https://developers.brevo.com/docs/using-sandbox-mode), ``ESPRELAY_BREVO_SANDBOX``.

Brevo's SMTP relay control header ``X-Mailin-Tag`` (one tag per header) becomes a
``tags`` entry and leaves the headers; ``X-Mailin-custom`` is passed on as it is: the
API takes it as a header too (its own example) and echoes it in webhooks.  esprelay
does not send its own id there (:mod:`esprelay.providers.stamp`): the header is one
opaque string of the application's, with no key of esprelay's to reserve, and a tag per
message would fill Brevo's tag statistics.  Brevo's events name the message by its
``message-id``, the ``messageId`` the send answered, which is stored.

An attachment whose name (or, without one, the ``attachment-N.ext`` esprelay gives it)
has an extension outside Brevo's list would make Brevo refuse the whole request, so the
message is refused at the end of DATA (:meth:`BrevoProvider.refusal`) instead of
bouncing later.
"""

from __future__ import annotations

import base64
import contextlib
import html
import itertools
import math
import re
from email.charset import Charset
from typing import Any

import httpx
from pydantic import SecretStr

from esprelay.errors import (
    DeliveryError,
    MessageRejected,
    ProviderConfigError,
    RateLimited,
)
from esprelay.message.mime import (
    Attachment,
    Mailbox,
    ParsedMessage,
    fallback_filename,
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

#: "The size limit for transactional emails is 20MB, including attachments and email
#: content" (help.brevo.com, article 4402811730962); the raw message is that email.
MAX_MESSAGE_SIZE = 20_000_000
#: Recipients per message version (To, Cc and Bcc together).
MAX_RECIPIENTS = 99
#: Requests per second Brevo allows on POST /v3/smtp/email (its "General" tier).
SEND_RATE = 1000.0
#: The longest hold a rate-limit header can impose (Brevo's longest window is an hour):
#: a nonsense value must not stop the provider for days.
MAX_HOLD = 3600.0
#: "Supported file extensions" of the attachment field (API reference, sendTransacEmail).
ALLOWED_EXTENSIONS = frozenset(
    {
        "xlsx",
        "xls",
        "ods",
        "docx",
        "docm",
        "doc",
        "csv",
        "pdf",
        "txt",
        "gif",
        "jpg",
        "jpeg",
        "png",
        "tif",
        "tiff",
        "rtf",
        "bmp",
        "cgm",
        "css",
        "shtml",
        "html",
        "htm",
        "zip",
        "xml",
        "ppt",
        "pptx",
        "tar",
        "ez",
        "ics",
        "mobi",
        "msg",
        "pub",
        "eps",
        "odt",
        "mp3",
        "m4a",
        "m4v",
        "wma",
        "ogg",
        "flac",
        "wav",
        "aif",
        "aifc",
        "aiff",
        "mp4",
        "mov",
        "avi",
        "mkv",
        "mpeg",
        "mpg",
        "wmv",
        "pkpass",
        "xlsm",
    }
)
#: Standard header fields (RFC 5322 section 3.6, trace and signature fields) that
#: Brevo's ``headers`` does not take ("Standard email headers are not supported").
STANDARD_HEADERS = frozenset(
    {
        "date",
        "message-id",
        "in-reply-to",
        "references",
        "sender",
        "comments",
        "keywords",
        "received",
        "return-path",
        "dkim-signature",
        "mime-version",
    }
)
#: Brevo's SMTP relay tag header; each one is a ``tags`` entry.
TAG_HEADER = "x-mailin-tag"
#: Error codes that say the account or key cannot send, whatever the message: an
#: operator must act (https://developers.brevo.com/docs/how-it-works, error codes).
CONFIG_CODES = frozenset(
    {
        "unauthorized",
        "permission_denied",
        "reseller_permission_denied",
        "account_under_validation",
        "not_enough_credits",
    }
)
_SPECIALS = set('()<>[]:;@\\,."')
_TEXTUAL = ("text", "message")
_UTF8 = Charset("utf-8")


# --- attachments: Brevo's extension list ------------------------------------------


def extension_allowed(name: str) -> bool:
    """Does Brevo take an attachment called ``name`` (by its extension)?"""
    stem, dot, ext = name.rpartition(".")
    return bool(dot and stem) and ext.lower() in ALLOWED_EXTENSIONS


def attachment_name(attachment: Attachment, index: int) -> str:
    """The name an attachment is sent under: its own, else ``attachment-N.ext``; a
    text part without a name whose type has no extension on Brevo's list (the
    ``message/delivery-status`` and ``message/rfc822`` parts of a bounce, a forwarded
    message) is ``attachment-N.txt``, which Brevo sends as text/plain."""
    if attachment.filename:
        return attachment.filename
    name = fallback_filename(attachment, index)
    if not extension_allowed(name) and attachment.content_type.split("/")[0] in _TEXTUAL:
        name = f"attachment-{index}.txt"
    return name


def attachment_refusal(parsed: ParsedMessage) -> str | None:
    """Why Brevo would refuse the attachments of ``parsed``, or None."""
    refused = [
        f"{index} ({attachment_name(att, index)!r})"
        for index, att in enumerate(parsed.attachments, 1)
        if att.content and not extension_allowed(attachment_name(att, index))
    ]
    if not refused:
        return None
    return (
        f"attachment {', '.join(refused)}: Brevo takes only attachments whose names end in"
        " an extension of its list (pdf, jpg, png, docx, xlsx, zip, ics, txt...)"
    )


# A cheap look at the raw bytes that finds every message Brevo might refuse for an
# attachment, so that only those are parsed at the end of DATA (a 10 MB message takes
# most of a second to parse).  It may find too much (a "; name=" in a text body), never too
# little: every attachment has a Content-Type line (or is text/plain, or message/rfc822
# in a multipart/digest: named .txt) and any name it has is a name= or filename=
# parameter.
_TOKEN = rb"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+"
# "Content-Type:" in any case without re.IGNORECASE, which would make the search ten
# times slower; a field starts a line (or the message).
_FIELD = rb"[Cc][Oo][Nn][Tt][Ee][Nn][Tt]-[Tt][Yy][Pp][Ee][ \t]*:[ \t]*(?:\r?\n[ \t]+)?"
_TYPE = _FIELD + rb"(" + _TOKEN + rb"/" + _TOKEN + rb")"
_CONTENT_TYPE = re.compile(rb"\n" + _TYPE)
_FIRST_CONTENT_TYPE = re.compile(_TYPE)
_NAME = re.compile(rb'(?i);\s*(?:file)?name(\*?[0-9]*\*?)\s*=\s*("[^"\r\n]*"?|[^\s;]*)')


def _may_be_refused(raw: bytes) -> bool:
    found = [m[1] for m in _CONTENT_TYPE.finditer(raw)]
    first = _FIRST_CONTENT_TYPE.match(raw)
    if first is not None:
        found.append(first[1])
    for value in found:
        ctype = value.decode("ascii").lower()
        if ctype.startswith("multipart/"):
            continue
        placeholder = Attachment(b"", ctype, None, None, False)
        if not extension_allowed(attachment_name(placeholder, 1)):
            return True
    for match in _NAME.finditer(raw):
        value = match[2].strip(b'"')
        if match[1] or not value.isascii() or b"=?" in value or b"\\" in value:
            return True  # RFC 2231 or 2047: the parser decides
        if not extension_allowed(value.decode("ascii")):
            return True
    return False


# --- the request ----------------------------------------------------------------------


def _mailbox(box: Mailbox) -> dict[str, str]:
    out = {"email": box.addr}
    name = box.name
    if name:
        if not name.isascii() and any(c in _SPECIALS for c in name):
            # Brevo drops such a name silently; encoded words it sends as they are
            # (each at most 75 characters, RFC 2047, on one line, space-separated).
            words = _UTF8.header_encode_lines(name, itertools.repeat(75))
            name = " ".join(w for w in words if w)
        out["name"] = name
    return out


def build_payload(
    parsed: ParsedMessage, *, sandbox: bool = False
) -> tuple[dict[str, Any], list[str]]:
    """The /v3/smtp/email JSON for ``parsed``, and what had to change to fit; pure."""
    warnings = list(parsed.warnings)
    if parsed.from_ is None:
        raise MessageRejected("no usable From address and no envelope sender", provider="brevo")
    r = parsed.recipients
    if not r.all():
        raise MessageRejected("no recipients", provider="brevo")
    if len(r.all()) > MAX_RECIPIENTS:
        raise MessageRejected(
            f"{len(r.all())} recipients; Brevo takes at most {MAX_RECIPIENTS} per message",
            provider="brevo",
        )
    refusal = attachment_refusal(parsed)
    if refusal is not None:  # spooled before the intake refused such messages
        raise MessageRejected(refusal, provider="brevo")

    payload: dict[str, Any] = {"sender": _mailbox(parsed.from_)}
    to, cc = r.to, r.cc
    if not to and cc:
        warnings.append("no To recipient: the Cc recipients are sent as To (Brevo needs a To)")
        to, cc = cc, ()
    if to:
        payload["to"] = [_mailbox(b) for b in to]
        if cc:
            payload["cc"] = [_mailbox(b) for b in cc]
        if r.bcc:
            payload["bcc"] = [_mailbox(b) for b in r.bcc]
    else:
        # Every recipient is blind: one version each, so nobody sees another.
        warnings.append(
            "no visible recipient: each Bcc recipient gets a copy addressed to itself"
            " (Brevo needs a To)"
        )
        payload["messageVersions"] = [{"to": [_mailbox(b)]} for b in r.bcc]

    if parsed.subject:
        payload["subject"] = parsed.subject
    else:
        payload["subject"] = "(no subject)"
        warnings.append("no Subject: sent as '(no subject)' (Brevo requires one)")
    if parsed.reply_to:
        first = parsed.reply_to[0]
        if len(parsed.reply_to) > 1:
            warnings.append(
                f"{len(parsed.reply_to)} Reply-To addresses; Brevo takes one: {first.addr}"
            )
        reply_to = {"email": first.addr}
        if first.name and first.name.isascii():
            reply_to["name"] = first.name
        elif first.name:
            warnings.append(
                "the Reply-To name is not ASCII and was left out (Brevo sends it 8-bit)"
            )
        payload["replyTo"] = reply_to

    if parsed.html:
        payload["htmlContent"] = parsed.html
    elif parsed.text:
        payload["htmlContent"] = (
            '<pre style="white-space:pre-wrap">' + html.escape(parsed.text) + "</pre>"
        )
        warnings.append("no HTML body: the text body is also sent as HTML (Brevo requires one)")
    else:
        payload["htmlContent"] = "<p></p>"
        warnings.append("no text or HTML body: sent an empty HTML body (Brevo requires one)")
    if parsed.text:
        payload["textContent"] = parsed.text

    attachments = _attachments(parsed, warnings)
    if attachments:
        payload["attachment"] = attachments
    headers, tags = _headers(parsed, warnings)
    if tags:
        payload["tags"] = tags
    if sandbox:
        headers["X-Sib-Sandbox"] = "drop"
    if headers:
        payload["headers"] = headers
    return payload, warnings


def _attachments(parsed: ParsedMessage, warnings: list[str]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for index, att in enumerate(parsed.attachments, 1):
        if not att.content:
            warnings.append(f"attachment {index} is empty and was dropped (Brevo needs content)")
            continue
        name = attachment_name(att, index)
        if not att.filename:
            warnings.append(f"attachment {index} ({att.content_type}) had no filename: {name}")
        elif not name.isascii():
            warnings.append(f"attachment {index}'s name {name!r} is not ASCII; Brevo may garble it")
        if att.inline:
            warnings.append(
                f"inline part {index} ({name}) is sent as an ordinary attachment:"
                " Brevo has no inline images"
            )
        lost = [f"{k}={v}" for k, v in att.params if _meaningful(k, v)]
        if lost:
            # A calendar invitation's method=REQUEST, a text file's charset...
            warnings.append(
                f"attachment {index} ({att.content_type}) lost its parameters"
                f" {'; '.join(lost)} (Brevo types attachments by their extension)"
            )
        out.append({"content": base64.b64encode(att.content).decode("ascii"), "name": name})
    return out


def _meaningful(key: str, value: str) -> bool:
    """A Content-Type parameter that changes how an attachment is read (not Apple Mail's
    x-unix-mode and the like, nor an ASCII or UTF-8 charset)."""
    if key.startswith("x-"):
        return False
    return key != "charset" or value.lower() not in ("us-ascii", "utf-8", "ascii", "utf8")


def _headers(parsed: ParsedMessage, warnings: list[str]) -> tuple[dict[str, str], list[str]]:
    out: dict[str, str] = {}
    tags: list[str] = []
    seen: set[str] = set()
    standard: list[str] = []
    eight_bit: list[str] = []
    repeated: list[str] = []
    for name, value in parsed.headers:
        lname = name.lower()
        if lname == TAG_HEADER:
            if value not in tags:
                tags.append(value)
        elif lname in STANDARD_HEADERS or lname.startswith("resent-"):
            standard.append(name)
        elif not value.isascii():
            eight_bit.append(name)
        elif lname in seen:
            repeated.append(name)  # a JSON object holds one value per name
        else:
            seen.add(lname)
            out[name] = value
    if standard:
        warnings.append(f"standard headers Brevo does not take were dropped: {summarize(standard)}")
    if eight_bit:
        warnings.append(
            f"headers with non-ASCII values were dropped (Brevo would send them as raw"
            f" 8-bit): {summarize(eight_bit)}"
        )
    if repeated:
        warnings.append(f"repeated headers were dropped (Brevo takes one): {summarize(repeated)}")
    return out, tags


# --- the provider ---------------------------------------------------------------------


class BrevoProvider(HttpProvider):
    kind = "brevo"
    rebuilds_message = True
    smtputf8 = False  # UTF-8 mailboxes half work: a Cc with one loses the whole Cc (anymail)
    max_message_size = MAX_MESSAGE_SIZE
    max_recipients = MAX_RECIPIENTS

    def __init__(
        self,
        client: httpx.AsyncClient,
        api_key: SecretStr,
        api_url: str = "https://api.brevo.com",
        *,
        sandbox: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(client, name)
        #: Test mode: Brevo answers as for a real send and sends nothing.
        self.sandbox = sandbox
        self.endpoint = api_url.rstrip("/") + "/v3/smtp/email"
        self._target = PostTarget(
            self.endpoint,
            {
                "api-key": api_key.get_secret_value(),
                "Accept": "application/json",
                "Content-Type": "application/json",
            },
        )
        self.rate_limit = RateLimit(SEND_RATE, burst=int(SEND_RATE))

    refusal_reads_body = True  # attachments' names and types

    def refusal(self, message: OutboundMessage) -> str | None:
        if not _may_be_refused(message.raw):
            return None
        return attachment_refusal(parse(message.raw, message.envelope))

    def build_request(self, message: OutboundMessage) -> Built:
        parsed = parse(message.raw, message.envelope)
        payload, warnings = build_payload(parsed, sandbox=self.sandbox)
        return Built(self._target.request(json_body(payload)), tuple(warnings))

    def parse_response(self, response: httpx.Response, message: OutboundMessage) -> SendResult:
        self._keep_window(response)
        answer = json_object(response)
        ids: list[str] = []
        if answer is not None:
            if isinstance(answer.get("messageId"), str):
                ids = [answer["messageId"]]
            elif isinstance(answer.get("messageIds"), list):
                ids = [i for i in answer["messageIds"] if isinstance(i, str)]
        if not ids:
            raise ProviderConfigError(
                f"HTTP {response.status_code} without a messageId; is ESPRELAY_BREVO_API_URL"
                f" Brevo's API (https://api.brevo.com)? {excerpt(response, 120)}",
                provider=self.name,
                status_code=response.status_code,
            )
        return SendResult(provider_message_id=" ".join(ids))

    def classify_error(self, response: httpx.Response) -> DeliveryError:
        hold = self._keep_window(response)
        status = response.status_code
        answer = json_object(response) or {}
        code = answer.get("code")
        if isinstance(code, str):
            said = " ".join(str(answer.get("message", "")).split())  # one line
            detail = f"HTTP {status} {code}: {said[:300]}"
        else:
            detail = f"HTTP {status}: {excerpt(response)}"
        if status == 429:
            return RateLimited(detail, provider=self.name, status_code=status, retry_after=hold)
        if code in CONFIG_CODES or status in (401, 403):
            return ProviderConfigError(detail, provider=self.name, status_code=status)
        if status in (404, 405):
            return ProviderConfigError(
                f"{detail} (check ESPRELAY_BREVO_API_URL)", provider=self.name, status_code=status
            )
        if status == 400:
            return MessageRejected(detail, provider=self.name, status_code=status)
        return classify_status(response, provider=self.name)

    def _keep_window(self, response: httpx.Response) -> float | None:
        """Hold every request while Brevo's window is spent (``x-sib-ratelimit-remaining``
        0, or a 429); return the seconds until it resets, if said."""
        hold = window_reset(response)
        remaining = _number(response.headers.get("x-sib-ratelimit-remaining"))
        spent = response.status_code == 429 or remaining == 0
        if spent and hold is not None and self.rate_limit is not None:
            self.rate_limit.hold_until(hold)
        return hold


def window_reset(response: httpx.Response) -> float | None:
    """Seconds until Brevo's window resets: ``x-sib-ratelimit-reset`` (seconds from now)
    and, on a 429, ``Retry-After``, whichever is later; at most :data:`MAX_HOLD`."""
    found: list[float] = []
    reset = _number(response.headers.get("x-sib-ratelimit-reset"))
    if reset is not None:
        found.append(max(0.0, reset))
    if response.status_code == 429:
        after = parse_retry_after(response.headers.get("retry-after"))
        if after is not None:
            found.append(after)
    return min(max(found), MAX_HOLD) if found else None


def _number(value: str | None) -> float | None:
    if value:
        with contextlib.suppress(ValueError):
            number = float(value)
            if math.isfinite(number):
                return number
    return None


class BrevoSettings(ProviderSettings):
    """``ESPRELAY_BREVO_*``: a v3 API key (not an SMTP key) and a verified sender or
    domain; ``sandbox`` turns on Brevo's test mode (nothing is sent)."""

    api_key: SecretStr
    api_url: str = "https://api.brevo.com"
    sandbox: bool = False

    def api_urls(self) -> tuple[str, ...]:
        return (self.api_url,)


def build(settings: BrevoSettings, client: httpx.AsyncClient) -> BrevoProvider:
    return BrevoProvider(client, settings.api_key, settings.api_url, sandbox=settings.sandbox)


KIND = ProviderKind("brevo", BrevoSettings, build, "Brevo /v3/smtp/email (JSON)")
