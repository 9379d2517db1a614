"""Postmark: ``POST /email`` with a JSON body built from the parsed message.

Facts from Postmark's server API (``postmark_send_swagger.yaml``, the email API
reference and support articles): the ``X-Postmark-Server-Token`` header; From, To,
Cc, Bcc as comma-separated address strings; one HtmlBody and one TextBody (5 MB
each, at least one of them); ``Headers`` as Name/Value pairs; ``Attachments`` with
Name, base64 Content, ContentType (parameters included, so a calendar invitation
keeps ``method=REQUEST``) and ``ContentID: "cid:..."`` for inline images;
an optional ``MessageStream``; at most 10 MB per request.  Postmark counts at most
50 recipients per message across To, Cc and Bcc together, so that is the recipient
limit enforced at RCPT time (the API reference says "Max 50" per field; the support
article on ErrorCode 300 says the 50 include every field).

Success is ``200`` with ``ErrorCode: 0`` and a ``MessageID``.  A ``200`` with another
ErrorCode is an error; a ``422`` carries the ErrorCode that decides permanent
(300 invalid request, 406 inactive recipient, ...) versus an operator problem
(10 bad token, 400/401 sender signature missing or unconfirmed, 405/412/413 account
may not send, 1235 unknown message stream).  An unknown stream the message chose
itself (``X-PM-Message-Stream``) is the message's fault, not the operator's: rejected.

Postmark's SMTP control headers (``X-PM-Tag``, ``X-PM-Metadata-*``,
``X-PM-Message-Stream``, ``X-PM-TrackOpens``, ``X-PM-TrackLinks``) become the /email
fields they stand for and leave ``Headers``, as Postmark's SMTP service applies and
removes them (see :func:`read_controls`); a malformed one is refused at the end of DATA
(:meth:`PostmarkProvider.refusal`).

Sandbox (``ESPRELAY_POSTMARK_SANDBOX``): every message is sent with the test token
``POSTMARK_API_TEST`` instead of the server token; Postmark answers as for a send and
delivers nothing.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import SecretStr

from esprelay.errors import (
    DeliveryError,
    MessageRejected,
    ProviderConfigError,
    ProviderUnavailable,
    RateLimited,
)
from esprelay.message.header import Field, decoded_text, may_have, read_header
from esprelay.message.mime import (
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
from esprelay.providers.stamp import ID_KEY, left_out_warning, without_ours

REQUEST_LIMIT = 10_000_000  # bytes, the whole JSON request
BODY_LIMIT = 5_000_000  # bytes, each of TextBody and HtmlBody
FIELD_LIMIT = 50  # addresses in each of To, Cc, Bcc (and in all of them together)
#: Trace headers that describe the hops so far; Postmark writes its own.
DROPPED_HEADERS = frozenset({"received", "return-path", "dkim-signature"})
UNKNOWN_STREAM = 1235
#: Postmark's test server token: a request is checked and answered as a send, and
#: nothing is sent (``ESPRELAY_POSTMARK_SANDBOX``; Postmark's API overview).
TEST_TOKEN = "POSTMARK_API_TEST"
CONFIG_CODES = frozenset({10, 400, 401, 405, 412, 413, UNKNOWN_STREAM})
_SPECIALS = set('()<>[]:;@\\,."')


def format_address(box: Mailbox) -> str:
    """``Name <addr>``, quoting the name when it holds specials; Unicode stays as is."""
    if not box.name:
        return box.addr
    name = box.name
    if any(c in _SPECIALS for c in name):
        name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{name} <{box.addr}>"


def build_payload(
    parsed: ParsedMessage,
    message_stream: str | None = None,
    controls: Controls | None = None,
    esprelay_id: str = "",
) -> tuple[dict[str, Any], list[str]]:
    """The /email JSON for ``parsed``, and what had to change to fit; pure.

    ``controls`` are the message's control headers (:func:`read_controls`): their fields
    are set (``MessageStream`` over ``message_stream``) and the headers leave ``Headers``.
    ``esprelay_id`` goes in ``Metadata`` (:func:`stamp`).
    """
    warnings = list(parsed.warnings)
    if parsed.from_ is None:
        raise MessageRejected("no usable From address and no envelope sender", provider="postmark")
    r = parsed.recipients
    if not r.all():
        raise MessageRejected("no recipients", provider="postmark")
    if len(r.all()) > FIELD_LIMIT:
        raise MessageRejected(
            f"{len(r.all())} recipients; Postmark takes at most {FIELD_LIMIT} per message",
            provider="postmark",
        )
    payload: dict[str, Any] = {"From": format_address(parsed.from_)}
    for field, boxes in (("To", r.to), ("Cc", r.cc), ("Bcc", r.bcc)):
        if boxes:
            payload[field] = ", ".join(format_address(b) for b in boxes)
    if parsed.subject:
        payload["Subject"] = parsed.subject
    if parsed.reply_to:
        payload["ReplyTo"] = ", ".join(format_address(b) for b in parsed.reply_to)

    for field, body in (("TextBody", parsed.text), ("HtmlBody", parsed.html)):
        if not body:
            continue
        if len(body.encode("utf-8")) > BODY_LIMIT:
            raise MessageRejected(
                f"{field} exceeds Postmark's 5 MB limit per body", provider="postmark"
            )
        payload[field] = body
    if "TextBody" not in payload and "HtmlBody" not in payload:
        payload["TextBody"] = " "
        warnings.append("no text or HTML body: sent a blank text body (Postmark requires one)")

    headers = _headers(parsed, warnings, controls is not None)
    if headers:
        payload["Headers"] = headers
    attachments = _attachments(parsed, warnings)
    if attachments:
        payload["Attachments"] = attachments
    if message_stream:
        payload["MessageStream"] = message_stream
    if controls is not None:
        payload.update(controls.fields)
    if esprelay_id:
        metadata, stamped = stamp(payload.get("Metadata", {}), esprelay_id)
        warnings.extend(stamped)
        if metadata:
            payload["Metadata"] = metadata
        else:
            payload.pop("Metadata", None)
    return payload, warnings


def stamp(metadata: dict[str, str], esprelay_id: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """``metadata`` with esprelay's id under ``esprelay_id``
    (:mod:`esprelay.providers.stamp`), which Postmark echoes as the ``Metadata`` of its
    webhooks, and the warnings.

    An ``X-PM-Metadata-esprelay_id`` is dropped, in any case (Postmark refuses "the same
    key with case differences"); if the id would be an eleventh field or longer than a
    value may be, the message's own fields are kept and the id left out.
    """
    kept, warnings = without_ours(metadata, "X-PM-Metadata-esprelay_id", fold_case=True)
    if len(kept) >= MAX_METADATA_FIELDS:
        why = f"the message has {len(kept)} metadata fields, Postmark's most"
        return kept, (*warnings, left_out_warning(why))
    if len(esprelay_id) > MAX_METADATA_VALUE:
        why = f"longer than a metadata value may be, {MAX_METADATA_VALUE}"
        return kept, (*warnings, left_out_warning(why))
    return {**kept, ID_KEY: esprelay_id}, warnings


def _headers(
    parsed: ParsedMessage, warnings: list[str], controls: bool = False
) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    dropped: list[str] = []
    for name, value in parsed.headers:
        lname = name.lower()
        if lname in DROPPED_HEADERS:
            dropped.append(name)
        elif not (controls and _translated(lname)):
            out.append({"Name": name, "Value": value})
    if dropped:
        warnings.append(f"trace headers dropped (Postmark writes its own): {summarize(dropped)}")
    return out


def _attachments(parsed: ParsedMessage, warnings: list[str]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for index, att in enumerate(parsed.attachments, 1):
        name = att.filename
        if not name:
            name = fallback_filename(att, index)
            warnings.append(f"attachment {index} ({att.content_type}) had no filename: {name}")
        item = {
            "Name": name,
            "Content": base64.b64encode(att.content).decode("ascii"),
            # With its parameters: a calendar invitation needs its method
            # ("text/calendar; charset=utf-8; method=REQUEST", Postmark's support
            # article 1101), a text file its charset.
            "ContentType": full_content_type(att),
        }
        if att.inline and att.content_id:
            item["ContentID"] = f"cid:{att.content_id}"
        elif att.inline:
            warnings.append(f"inline part {index} has no Content-ID: sent as an attachment")
        out.append(item)
    return out


# -- Postmark's SMTP control headers ------------------------------------------------
#
# Postmark's SMTP service reads these headers into the fields of the message it builds
# (the same fields as /email) and removes them.  Each is checked here as Postmark
# documents the field, so that what Postmark would refuse is refused at the end of DATA:
#
# - X-PM-Tag -> Tag: "Only one tag may be used per message" (Tags FAQ,
#   https://postmarkapp.com/support/article/1284-tags-faq); at most 1,000 characters
#   ("Sending email with SMTP", https://postmarkapp.com/developer/user-guide/
#   send-email-with-smtp, which lists the X-PM-* headers).
# - X-PM-Metadata-<key> -> Metadata {key: value}: "If you add an SMTP header that contains
#   the prefix X-PM-Metadata-, it will be registered as a metadata field" (Custom metadata
#   FAQ, https://postmarkapp.com/support/article/1125-custom-metadata-faq), whose
#   limitations are: at most 10 fields, a key of at most 20 characters, a value of at most
#   80, values are strings; over the API "duplicate keys, including the same key with case
#   differences, are not allowed".  Over SMTP Postmark renames a repeated key with a
#   number whose form it does not document: a repeated key is refused here rather than
#   renamed differently or dropped.
# - X-PM-Message-Stream -> MessageStream (over ESPRELAY_POSTMARK_MESSAGE_STREAM): the
#   stream's id.  Only Postmark knows which streams exist (ErrorCode 1235 for one that
#   does not): its answer rejects the message, unless the stream it named is the
#   configured one (then the operator must act; see _error_for_code).
# - X-PM-TrackOpens -> TrackOpens, a boolean: "add the header X-PM-TrackOpens to your email
#   and set it to true. If the header is not present or set to false Postmark will not
#   add open tracking" (https://postmarkapp.com/developer/user-guide/tracking-opens/
#   tracking-opens-per-email).
# - X-PM-TrackLinks -> TrackLinks, one of None, HtmlAndText, HtmlOnly, TextOnly (the enum
#   of TrackLinks in Postmark's server API definition, ../shared/specs/postmark;
#   https://postmarkapp.com/developer/user-guide/tracking-links).
#
# Other X-PM-* headers stay in Headers as they are.  X-PM-KeepID ("true": keep the
# message's own Message-ID, which Postmark's SMTP service otherwise replaces; same SMTP
# page) is read there by the API too: Postmark's own Swift Mailer transport
# (wildbit/swiftmailer-postmark, which posts to /email) adds X-PM-KeepID: true to Headers
# next to a Message-ID.

CONTROL_PREFIX = b"x-pm-"
TAG_HEADER = "x-pm-tag"
METADATA_PREFIX = "x-pm-metadata-"
STREAM_HEADER = "x-pm-message-stream"
TRACK_OPENS_HEADER = "x-pm-trackopens"
TRACK_LINKS_HEADER = "x-pm-tracklinks"
_SINGLE = {
    TAG_HEADER: "X-PM-Tag",
    STREAM_HEADER: "X-PM-Message-Stream",
    TRACK_OPENS_HEADER: "X-PM-TrackOpens",
    TRACK_LINKS_HEADER: "X-PM-TrackLinks",
}
MAX_TAG_LENGTH = 1000
MAX_METADATA_FIELDS = 10
MAX_METADATA_KEY = 20
MAX_METADATA_VALUE = 80
TRACK_LINKS = ("None", "HtmlAndText", "HtmlOnly", "TextOnly")
_TRACK_LINKS = {value.lower(): value for value in TRACK_LINKS}
_BOOLEANS = {"true": True, "false": False}
#: The stream Postmark uses when a request names none.
DEFAULT_STREAM = "outbound"
#: The request extension naming the stream a message chose (X-PM-Message-Stream) when it
#: is not the configured one.
CHOSEN_STREAM = "esprelay.postmark.chosen_stream"


class MalformedControl(ValueError):
    """A Postmark control header Postmark would not apply; the text says why."""


@dataclass(frozen=True, slots=True)
class Controls:
    """What a message's Postmark control headers ask for."""

    #: The /email fields they make (Tag, Metadata, MessageStream, TrackOpens, TrackLinks).
    fields: dict[str, Any]

    @property
    def stream(self) -> str | None:
        stream = self.fields.get("MessageStream")
        return stream if isinstance(stream, str) else None


def _translated(lname: str) -> bool:
    """Whether the header named ``lname`` (lower case) is a control header translated
    into a field (and so left out of Headers)."""
    return lname in _SINGLE or (lname.startswith(METADATA_PREFIX) and lname != METADATA_PREFIX)


def read_controls(raw: bytes) -> Controls | None:
    """The Postmark control headers of ``raw``'s top-level header as /email fields; None
    without any.  Raises :class:`MalformedControl` for one Postmark would not apply.

    The header is read as :func:`~esprelay.message.mime.parse` reads it, so the fields
    translated are exactly the ones left out of Headers.
    """
    if not may_have(raw, CONTROL_PREFIX):
        return None
    texts: dict[str, list[str]] = {}
    metadata: dict[str, str] = {}
    seen: dict[str, str] = {}
    for item in read_header(raw).fields:
        lname = item.name.decode("ascii")
        if lname in _SINGLE:
            texts.setdefault(lname, []).append(_text(raw, item))
        elif lname.startswith(METADATA_PREFIX):
            key = _written_name(raw, item)[len(METADATA_PREFIX) :]
            value = _text(raw, item)
            _check_metadata(key, value, seen)
            metadata[key] = value
    if not texts and not metadata:
        return None
    fields: dict[str, Any] = {}
    for lname, values in texts.items():
        if len(values) > 1:
            raise MalformedControl(f"{len(values)} {_SINGLE[lname]} headers; Postmark takes one")
    if TAG_HEADER in texts:
        tag = texts[TAG_HEADER][0]
        if not tag:
            raise MalformedControl("X-PM-Tag is empty")
        if len(tag) > MAX_TAG_LENGTH:
            raise MalformedControl(f"X-PM-Tag is longer than {MAX_TAG_LENGTH} characters")
        fields["Tag"] = tag
    if metadata:
        if len(metadata) > MAX_METADATA_FIELDS:
            raise MalformedControl(
                f"{len(metadata)} X-PM-Metadata-* headers; Postmark takes at most"
                f" {MAX_METADATA_FIELDS}"
            )
        fields["Metadata"] = metadata
    if STREAM_HEADER in texts:
        stream = texts[STREAM_HEADER][0]
        if not stream:
            raise MalformedControl("X-PM-Message-Stream is empty")
        fields["MessageStream"] = stream
    if TRACK_OPENS_HEADER in texts:
        text = texts[TRACK_OPENS_HEADER][0]
        if text.lower() not in _BOOLEANS:
            raise MalformedControl(f"X-PM-TrackOpens {_shown(text)} is not true or false")
        fields["TrackOpens"] = _BOOLEANS[text.lower()]
    if TRACK_LINKS_HEADER in texts:
        text = texts[TRACK_LINKS_HEADER][0]
        if text.lower() not in _TRACK_LINKS:
            raise MalformedControl(
                f"X-PM-TrackLinks {_shown(text)} is not one of {', '.join(TRACK_LINKS)}"
            )
        fields["TrackLinks"] = _TRACK_LINKS[text.lower()]
    return Controls(fields)


def _check_metadata(key: str, value: str, seen: dict[str, str]) -> None:
    if not key:
        raise MalformedControl("an X-PM-Metadata- header without a key")
    header = f"X-PM-Metadata-{key}"
    if len(key) > MAX_METADATA_KEY:
        raise MalformedControl(
            f"{_shown(header)}: a metadata key longer than {MAX_METADATA_KEY} characters"
        )
    if key.lower() in seen:
        raise MalformedControl(
            f"metadata key {_shown(key)} given twice (as {_shown(seen[key.lower()])} too)"
        )
    seen[key.lower()] = key
    if not value:
        raise MalformedControl(f"{_shown(header)} is empty")
    if len(value) > MAX_METADATA_VALUE:
        raise MalformedControl(
            f"{_shown(header)}: a metadata value longer than {MAX_METADATA_VALUE} characters"
        )


def _written_name(raw: bytes, item: Field) -> str:
    """A field's name as written (the key of X-PM-Metadata-<key> keeps its case)."""
    return raw[item.start : item.end].split(b":", 1)[0].decode("ascii")


def _text(raw: bytes, item: Field) -> str:
    """A control header's value on one line (message.header.decoded_text)."""
    try:
        return decoded_text(raw, item).strip()
    except UnicodeError:
        raise MalformedControl(f"{_written_name(raw, item)}: not UTF-8") from None


def _shown(text: str, limit: int = 60) -> str:
    """A value quoted for a reply or a log line: ASCII, one line, bounded."""
    shown = ascii(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


class PostmarkProvider(HttpProvider):
    kind = "postmark"
    rebuilds_message = True
    smtputf8 = False  # refuses them: "Illegal email mailbox" (error 300); IDN as Punycode
    #: Raw bytes that still fit 10 MB after base64 (4/3) with room for the JSON around.
    max_message_size = REQUEST_LIMIT * 3 // 4 - 100_000
    max_recipients = FIELD_LIMIT

    def __init__(
        self,
        client: httpx.AsyncClient,
        server_token: SecretStr,
        api_url: str,
        message_stream: str | None = None,
        name: str | None = None,
        *,
        sandbox: bool = False,
    ) -> None:
        super().__init__(client, name)
        #: Sends with Postmark's test token: answered as a send, nothing is sent.
        self.sandbox = sandbox
        self._token = server_token
        self.endpoint = api_url.rstrip("/") + "/email"
        token = TEST_TOKEN if sandbox else server_token.get_secret_value()
        self._target = PostTarget(
            self.endpoint,
            {
                "X-Postmark-Server-Token": token,
                "Accept": "application/json",
                "Content-Type": "application/json",
            },
        )
        self.message_stream = message_stream

    def refusal(self, message: OutboundMessage) -> str | None:
        """A malformed Postmark control header (X-PM-*), refused at the end of DATA."""
        try:
            read_controls(message.raw)
        except MalformedControl as exc:
            return str(exc)
        return None

    def build_request(self, message: OutboundMessage) -> Built:
        try:
            controls = read_controls(message.raw)
        except MalformedControl as exc:  # spooled before the intake refused these
            raise MessageRejected(str(exc), provider=self.name) from None
        parsed = parse(message.raw, message.envelope)
        payload, warnings = build_payload(parsed, self.message_stream, controls, message.id)
        body = json_body(payload)
        if len(body) > REQUEST_LIMIT:
            raise MessageRejected(
                f"request of {len(body)} bytes exceeds Postmark's 10 MB limit", provider=self.name
            )
        # A stream of the message's own choosing, for _error_for_code to tell apart.
        chosen = controls.stream if controls is not None else None
        own = chosen is not None and chosen != (self.message_stream or DEFAULT_STREAM)
        extensions = {CHOSEN_STREAM: chosen} if own else None
        return Built(self._target.request(body, extensions), tuple(warnings))

    def parse_response(self, response: httpx.Response, message: OutboundMessage) -> SendResult:
        warnings: tuple[str, ...] = ()
        answer = json_object(response)
        if answer is None or "ErrorCode" not in answer:
            raise ProviderConfigError(
                f"HTTP {response.status_code} is not a Postmark answer (check"
                f" ESPRELAY_POSTMARK_API_URL): {excerpt(response)}",
                provider=self.name,
                status_code=response.status_code,
            )
        if answer.get("ErrorCode") != 0:
            raise self._error_for_code(response, answer)
        note = answer.get("Message")
        if isinstance(note, str) and note.strip() and note.strip().upper() != "OK":
            warnings += (f"Postmark: {note.strip()[:300]}",)  # e.g. inactive recipients skipped
        provider_id = answer.get("MessageID")
        return SendResult(
            provider_message_id=str(provider_id) if provider_id else None, warnings=warnings
        )

    def classify_error(self, response: httpx.Response) -> DeliveryError:
        status = response.status_code
        answer = json_object(response)
        if status in (400, 422) and answer is not None and isinstance(answer.get("ErrorCode"), int):
            return self._error_for_code(response, answer)
        if status in (404, 405):
            return ProviderConfigError(
                f"HTTP {status} (check ESPRELAY_POSTMARK_API_URL): {excerpt(response)}",
                provider=self.name,
                status_code=status,
            )
        return classify_status(response, provider=self.name)

    def _error_for_code(self, response: httpx.Response, answer: dict[str, Any]) -> DeliveryError:
        code = answer.get("ErrorCode")
        status = response.status_code
        detail = f"HTTP {status} ErrorCode {code}: {str(answer.get('Message', ''))[:300]}"
        if code == UNKNOWN_STREAM:
            chosen = _chosen_stream(response)
            if chosen is not None:  # the message's own X-PM-Message-Stream: its fault
                return MessageRejected(
                    f"{detail} (X-PM-Message-Stream: {_shown(chosen)})",
                    provider=self.name,
                    status_code=status,
                )
        if code in CONFIG_CODES:
            return ProviderConfigError(detail, provider=self.name, status_code=status)
        if code == 429:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            return RateLimited(
                detail, provider=self.name, status_code=status, retry_after=retry_after
            )
        if code == 100:  # maintenance
            return ProviderUnavailable(detail, provider=self.name, status_code=status)
        return MessageRejected(detail, provider=self.name, status_code=status)


def _chosen_stream(response: httpx.Response) -> str | None:
    """The stream the message chose itself (X-PM-Message-Stream) for this request."""
    try:
        request = response.request
    except RuntimeError:  # a response made without its request
        return None
    chosen = request.extensions.get(CHOSEN_STREAM)
    return chosen if isinstance(chosen, str) else None


class PostmarkSettings(ProviderSettings):
    """``ESPRELAY_POSTMARK_*``: a server token, and the message stream (Postmark's
    default, ``outbound``, when unset); ``sandbox`` sends with Postmark's test token
    (nothing is sent; the server token is still what ``esprelay doctor`` checks)."""

    server_token: SecretStr
    api_url: str = "https://api.postmarkapp.com"
    message_stream: str | None = None
    sandbox: bool = False

    def api_urls(self) -> tuple[str, ...]:
        return (self.api_url,)


def build(settings: PostmarkSettings, client: httpx.AsyncClient) -> PostmarkProvider:
    return PostmarkProvider(
        client,
        settings.server_token,
        settings.api_url,
        settings.message_stream or None,
        sandbox=settings.sandbox,
    )


KIND = ProviderKind("postmark", PostmarkSettings, build, "Postmark /email (JSON)")
