"""Mailgun: ``POST /v3/{domain}/messages.mime`` with the message as it was received.

The request is multipart/form-data: one ``to`` field per envelope recipient (the
envelope decides who receives the message; Bcc recipients are only there) and the
MIME file as ``message``, its Bcc header removed.  Authentication is HTTP Basic with
the user ``api`` and the API key.

Mailgun quirks handled here:

- a wrong ``ESPRELAY_MAILGUN_API_URL`` can answer ``200`` with an HTML welcome page
  ("Mailgun Magnificent API"): without a JSON ``id`` that is not a success;
- ``404 Domain not found`` (and any 404: the URL or domain is wrong) is a
  configuration problem, not a reason to fail the message;
- ``429`` says "try again after N seconds" in its message; that hint is honoured.

Mailgun's SMTP control headers (``X-Mailgun-Tag``, ``X-Mailgun-Variables``,
``X-Mailgun-Track``...) become the ``o:``/``v:``/``t:`` fields of the request and leave
the MIME (see :func:`sending_options`).  Mailgun documents them for its SMTP service
only: "For HTTP please use the specified o: parameter ... For SMTP you must use the
SMTP Headers below" (https://documentation.mailgun.com/docs/mailgun/user-manual/
sending-messages/pass-sending-options), and nowhere that messages.mime reads them from
inside the MIME.  A malformed one is refused at the end of DATA (:meth:`refusal`).
"""

from __future__ import annotations

import base64
import email.policy
import email.utils
import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from esprelay.errors import DeliveryError, MessageRejected, ProviderConfigError, RateLimited
from esprelay.message.header import Field, Header, decoded_text, read_header
from esprelay.message.rawmime import BLIND_FIELDS, Rewritten, remove_fields, strip_bcc
from esprelay.models import OutboundMessage, SendResult
from esprelay.providers.base import (
    Built,
    HttpProvider,
    ProviderKind,
    ProviderSettings,
    classify_status,
    excerpt,
    json_object,
    no_json_constant,
    parse_retry_after,
)
from esprelay.providers.stamp import ID_KEY, dropped_warning, left_out_warning

#: Mailgun's documented maximum message size (25 MB, MIME as sent).
MAX_MESSAGE_SIZE = 25 * 1024 * 1024
#: Recipients per message; Mailgun documents 1,000.
MAX_RECIPIENTS = 1000

_TRY_AGAIN = re.compile(r"try again (?:after|in) (\d+(?:\.\d+)?) ?s", re.IGNORECASE)


class MailgunProvider(HttpProvider):
    kind = "mailgun"
    smtputf8 = True  # UTF-8 addresses on the Messages API: documentation.mailgun.com, i18n page
    max_message_size = MAX_MESSAGE_SIZE
    max_recipients = MAX_RECIPIENTS

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        api_key: SecretStr,
        domain: str,
        api_url: str = "https://api.mailgun.net",
        name: str | None = None,
    ) -> None:
        super().__init__(client, name)
        self._api_key = api_key
        self.domain = domain
        self.endpoint = f"{api_url.rstrip('/')}/v3/{quote(domain, safe='')}/messages.mime"

    def refusal(self, message: OutboundMessage) -> str | None:
        header = read_header(message.raw, obsolete=True)
        if not any(f.name.startswith(CONTROL_PREFIX) for f in header.fields):
            return None
        try:
            sending_options(message.raw, header)
        except MalformedControl as exc:
            return str(exc)
        return None

    def build_request(self, message: OutboundMessage) -> Built:
        raw = message.raw
        # One pass of the header reader tells the common message (no Bcc, no control
        # header) to go as it is.  Fields are read as remove_fields reads them ("Bcc :"
        # too: a message spooled by an older version may not have been repaired).
        header = read_header(raw, obsolete=True)
        controls = blind = False
        for item in header.fields:
            controls = controls or item.name.startswith(CONTROL_PREFIX)
            blind = blind or item.name in BLIND_FIELDS
        stripped = strip_bcc(raw) if blind else Rewritten(raw)
        options: tuple[tuple[str, str], ...] = ()
        if controls:
            try:
                found = sending_options(raw, header)
            except MalformedControl as exc:  # spooled before the intake refused these
                raise MessageRejected(str(exc), provider=self.name) from None
            options = found.fields
            if found.translated:
                kept, _ = remove_fields(stripped.raw, found.translated.__contains__)
                stripped = Rewritten(kept, stripped.warnings)
        warnings = stripped.warnings
        if message.id:
            options, stamped = stamp(options, message.id)
            warnings += stamped
        data: dict[str, list[str]] = {"to": list(message.envelope.rcpt_tos)}
        for name, value in options:
            data.setdefault(name, []).append(value)
        credentials = f"api:{self._api_key.get_secret_value()}".encode()
        request = httpx.Request(
            "POST",
            self.endpoint,
            headers={
                "Authorization": f"Basic {base64.b64encode(credentials).decode('ascii')}",
                "Accept": "application/json",
            },
            data=data,
            files={"message": ("message.mime", stripped.raw, "message/rfc822")},
        )
        return Built(request, warnings)

    def parse_response(self, response: httpx.Response, message: OutboundMessage) -> SendResult:
        body = json_object(response)
        message_id = body.get("id") if isinstance(body, dict) else None
        if not isinstance(message_id, str) or not message_id:
            raise ProviderConfigError(
                f"HTTP {response.status_code} without a message id; is ESPRELAY_MAILGUN_API_URL"
                f" the API (https://api.mailgun.net or https://api.eu.mailgun.net)?"
                f" {excerpt(response, 120)}",
                provider=self.name,
                status_code=response.status_code,
            )
        # "<20240101120000.1.ABCDEF@mg.example.com>": the events name the message by
        # the same id without the angle brackets (message.headers.message-id).
        return SendResult(provider_message_id=message_id.strip().strip("<>") or message_id)

    def classify_error(self, response: httpx.Response) -> DeliveryError:
        status = response.status_code
        detail = f"HTTP {status}: {excerpt(response)}"
        if status == 404:
            return ProviderConfigError(
                f"{detail}; check ESPRELAY_MAILGUN_DOMAIN={self.domain} and"
                " ESPRELAY_MAILGUN_API_URL (EU domains use https://api.eu.mailgun.net)",
                provider=self.name,
                status_code=status,
            )
        if status == 429:
            hint = parse_retry_after(response.headers.get("retry-after"))
            found = _TRY_AGAIN.search(response.text)
            if found:
                hint = max(hint or 0.0, float(found.group(1)))
            return RateLimited(detail, provider=self.name, status_code=status, retry_after=hint)
        return classify_status(response, provider=self.name)


# -- Mailgun's SMTP control headers ---------------------------------------------------
#
# The table of Mailgun's "Passing Sending Options" page (cited in the module docstring)
# pairs each header with its HTTP field; the values each field takes are those of the
# messages.mime reference (POST /v3/{domain}/messages.mime, ../shared/specs/mailgun).

#: Every control header's lower-cased name starts with this.
CONTROL_PREFIX = b"x-mailgun-"
#: "Send options (parameters starting with o:, h:, v:, or t:) are limited to 16KB total"
#: (the messages.mime reference); counted here as the UTF-8 bytes of names and values.
MAX_SEND_OPTIONS = 16 * 1024
_OPTION_PREFIXES = ("o:", "h:", "v:", "t:")
#: Tags: "Tags are case insensitive and should be ascii only. The maximum length of
#: characters is 128" (https://documentation.mailgun.com/docs/mailgun/user-manual/
#: tracking-messages/track-tagging).  That page allows 3 tags per message, Mailgun's
#: newer help article 10 ("Message Limit: Maximum of 10 tags per individual email
#: message", https://help.mailgun.com/hc/en-us/articles/34389096824219-Tags): 10 is
#: refused above, not 3, so that no message Mailgun takes is refused.
MAX_TAG_LENGTH = 128
MAX_TAGS = 10

_YES_NO = ("yes", "no", "true", "false")
_YES_NO_HTMLONLY = (*_YES_NO, "htmlonly")
_HOURS = re.compile(r"([0-9]+)h")
_CLOCK = re.compile(r"(?:[01][0-9]|2[0-3]):[0-5][0-9]|(?:0[1-9]|1[0-2]):[0-5][0-9][ap]m", re.I)
_KEY = re.compile(r"[^\x00-\x1f\x7f\"\\]+")  # what a form field name carries unchanged


class MalformedControl(ValueError):
    """A Mailgun control header Mailgun could not apply; the reason is the message."""


@dataclass(frozen=True, slots=True)
class SendingOptions:
    """What a message's control headers become."""

    #: messages.mime form fields, in the order of the table below (o:tag repeated).
    fields: tuple[tuple[str, str], ...]
    #: The lower-cased names of the header fields translated, to remove from the MIME.
    translated: frozenset[bytes]


Parse = Callable[[str, str], str | None]


@dataclass(frozen=True, slots=True)
class _Control:
    header: str  # as Mailgun writes it
    field: str  # the messages.mime field it becomes
    parse: Parse  # (header, text) -> the field's value, None for no field; or raise
    repeatable: bool = False


def _choice(*allowed: str) -> Parse:
    def parse(header: str, text: str) -> str:
        value = text.strip().lower()
        if value not in allowed:
            raise MalformedControl(f"{header}: {_shown(text)} is not one of {', '.join(allowed)}")
        return value

    return parse


def _testmode(header: str, text: str) -> str | None:
    # o:testmode takes only "yes"; the SMTP page allows "yes" or "no" (no: no test mode).
    return "yes" if _choice(*_YES_NO)(header, text) in ("yes", "true") else None


def _tag(header: str, text: str) -> str:
    if not text:
        raise MalformedControl(f"{header}: an empty tag")
    if not text.isascii() or not text.isprintable():
        raise MalformedControl(f"{header}: {_shown(text)} is not printable ASCII")
    if len(text) > MAX_TAG_LENGTH:
        raise MalformedControl(f"{header}: a tag longer than {MAX_TAG_LENGTH} characters")
    return text


def _token(header: str, text: str) -> str:
    if not text or not text.isascii() or not text.isprintable() or " " in text:
        raise MalformedControl(f"{header}: {_shown(text)} is not one word of printable ASCII")
    return text


def _ip(header: str, text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise MalformedControl(f"{header}: {_shown(text)} is not an IP address") from None


def _domain_key(header: str, text: str) -> str:
    # The API writes signing_domain/selector; the SMTP table writes signing_domain,selector
    # for X-Mailgun-Secondary-DKIM: both are read, the API's form is sent.
    parts = re.split(r"[/,]", _token(header, text))
    if len(parts) != 2 or not all(parts):
        raise MalformedControl(f"{header}: {_shown(text)} is not signing_domain/selector")
    return "/".join(parts)


def _date(header: str, text: str) -> str:
    # o:deliverytime: "RFC-2822 format ... Example: 'Fri, 14 Oct 2011 12:00:00 +0000'".
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        raise MalformedControl(f"{header}: {_shown(text)} is not an RFC 2822 date") from None
    if when.tzinfo is None:  # "-0000": no zone given; read as UTC
        when = when.replace(tzinfo=UTC)
    return email.utils.format_datetime(when)


def _optimize_period(header: str, text: str) -> str:
    # o:deliverytime-optimize-period: "[0-9]+h format, with the minimum being 24h and
    # the maximum being 72h".
    match = _HOURS.fullmatch(text.strip().lower())
    if match is None or not 24 <= int(match.group(1)) <= 72:
        raise MalformedControl(f"{header}: {_shown(text)} is not 24h to 72h")
    return match.group(0)


def _local_time(header: str, text: str) -> str:
    # o:time-zone-localize: "HH:mm or hh:mmaa format".
    if _CLOCK.fullmatch(text.strip()) is None:
        raise MalformedControl(f"{header}: {_shown(text)} is not HH:mm or hh:mmAM/PM")
    return text.strip()


def _json_object(header: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text, parse_constant=no_json_constant)
    except ValueError:
        raise MalformedControl(f"{header}: not valid JSON") from None
    except RecursionError:  # "[[[[..." folded over many lines
        raise MalformedControl(f"{header}: nested too deeply") from None
    if not isinstance(value, dict):
        raise MalformedControl(f"{header}: not a JSON object")
    return value


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _object_text(header: str, text: str) -> str:
    _json_object(header, text)
    return text


def _recipient_variables(header: str, text: str) -> str:
    # recipient-variables: "Each key is a recipient email address, each value is a
    # dictionary of variables for that recipient".
    if not all(isinstance(v, dict) for v in _json_object(header, text).values()):
        raise MalformedControl(f"{header}: a recipient's variables are not a JSON object")
    return text


def _text_value(header: str, text: str) -> str:
    if not text:
        raise MalformedControl(f"{header}: empty")
    return text


#: The headers of Mailgun's table, by lower-cased name.  X-Mailgun-Variables is read
#: apart (one v: field per variable).
_CONTROLS: dict[bytes, _Control] = {
    c.header.lower().encode(): c
    for c in (
        _Control("X-Mailgun-Tag", "o:tag", _tag, repeatable=True),
        _Control("X-Mailgun-Dkim", "o:dkim", _choice(*_YES_NO)),
        _Control("X-Mailgun-Secondary-DKIM", "o:secondary-dkim", _domain_key),
        _Control("X-Mailgun-Secondary-DKIM-Public", "o:secondary-dkim-public", _domain_key),
        _Control("X-Mailgun-Drop-Message", "o:testmode", _testmode),
        _Control("X-Mailgun-Track", "o:tracking", _choice(*_YES_NO_HTMLONLY)),
        _Control("X-Mailgun-Track-Clicks", "o:tracking-clicks", _choice(*_YES_NO_HTMLONLY)),
        _Control("X-Mailgun-Track-Opens", "o:tracking-opens", _choice(*_YES_NO)),
        _Control(
            "X-Mailgun-Track-Pixel-Location-Top",
            "o:tracking-pixel-location-top",
            _choice(*_YES_NO_HTMLONLY),
        ),
        _Control("X-Mailgun-Sending-Ip", "o:sending-ip", _ip),
        _Control("X-Mailgun-Sending-Ip-Pool", "o:sending-ip-pool", _token),
        _Control("X-Mailgun-Require-TLS", "o:require-tls", _choice(*_YES_NO)),
        _Control("X-Mailgun-Skip-Verification", "o:skip-verification", _choice(*_YES_NO)),
        _Control("X-Mailgun-Deliver-By", "o:deliverytime", _date),
        _Control(
            "X-Mailgun-Delivery-Time-Optimize-Period",
            "o:deliverytime-optimize-period",
            _optimize_period,
        ),
        _Control("X-Mailgun-Time-Zone-Localize", "o:time-zone-localize", _local_time),
        _Control("X-Mailgun-Template-Name", "template", _text_value),
        _Control("X-Mailgun-Template-Version", "t:version", _text_value),
        _Control("X-Mailgun-Template-Variables", "t:variables", _object_text),
        _Control("X-Mailgun-Recipient-Variables", "recipient-variables", _recipient_variables),
    )
}
_VARIABLES = b"x-mailgun-variables"
_NEEDS = {  # a field Mailgun takes only with another one
    "t:version": "template",
    "o:secondary-dkim-public": "o:secondary-dkim",
}


def sending_options(raw: bytes, header: Header) -> SendingOptions:
    """The messages.mime fields the control headers of ``raw`` make, or raise
    :class:`MalformedControl` with the reason Mailgun could not apply one.

    ``header`` is :func:`~esprelay.message.header.read_header` of ``raw``.  Headers
    starting ``X-Mailgun-`` that are not in Mailgun's table stay in the MIME as they are.
    """
    texts: dict[bytes, list[str]] = {}
    for item in header.fields:
        if item.name in _CONTROLS or item.name == _VARIABLES:
            texts.setdefault(item.name, []).append(_text(raw, item))
    fields: list[tuple[str, str]] = []
    for name, control in _CONTROLS.items():
        values = texts.get(name, [])
        if len(values) > 1 and not control.repeatable:
            raise MalformedControl(f"{len(values)} {control.header} headers; Mailgun takes one")
        for text in values:
            value = control.parse(control.header, text)
            if value is not None:
                fields.append((control.field, value))
    tags = sum(1 for name, _ in fields if name == "o:tag")
    if tags > MAX_TAGS:
        raise MalformedControl(f"X-Mailgun-Tag: {tags} tags; Mailgun takes at most {MAX_TAGS}")
    present = {name for name, _ in fields}
    for field, needed in _NEEDS.items():
        if field in present and needed not in present:
            raise MalformedControl(f"{_header_of(field)} without {_header_of(needed)}")
    # "You can provide multiple X-Mailgun-Variables headers, their map values will be
    # combined" (Attaching Metadata to emails via SMTP); over HTTP each is a v: field
    # whose value is a string or "custom JSON data" (the v: field's description).
    variables: dict[str, Any] = {}
    for text in texts.get(_VARIABLES, []):
        variables.update(_json_object("X-Mailgun-Variables", text))
    for key, value in variables.items():
        if _KEY.fullmatch(key) is None:
            raise MalformedControl(
                f"X-Mailgun-Variables: the name {_shown(key)} cannot be a v: field"
                " (empty, or a quote, backslash or control character)"
            )
        text = value if isinstance(value, str) else _compact(value)
        fields.append((f"v:{key}", text))
    size = sum(len(n.encode()) + len(v.encode()) for n, v in fields if n[:2] in _OPTION_PREFIXES)
    if size > MAX_SEND_OPTIONS:
        raise MalformedControl(
            f"the X-Mailgun-* headers make {size} bytes of send options; Mailgun takes 16 KB"
        )
    return SendingOptions(tuple(fields), frozenset(texts))


def stamp(
    fields: tuple[tuple[str, str], ...], esprelay_id: str
) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """``fields`` with esprelay's id as the user variable ``v:esprelay_id``
    (:mod:`esprelay.providers.stamp`), which Mailgun echoes in every event's
    ``user-variables``, and the warnings.

    An ``X-Mailgun-Variables`` value under that name is dropped; if the id would take
    the send options past Mailgun's 16 KB, the message's own are kept and the id left out.
    """
    name = f"v:{ID_KEY}"
    kept = tuple(item for item in fields if item[0] != name)
    warnings = () if len(kept) == len(fields) else (dropped_warning("X-Mailgun-Variables"),)
    size = sum(len(n.encode()) + len(v.encode()) for n, v in kept if n[:2] in _OPTION_PREFIXES)
    if size + len(name) + len(esprelay_id.encode()) > MAX_SEND_OPTIONS:
        return kept, (*warnings, left_out_warning("the send options would exceed 16 KB"))
    return (*kept, (name, esprelay_id)), warnings


def _header_of(field: str) -> str:
    return next(c.header for c in _CONTROLS.values() if c.field == field)


def _text(raw: bytes, item: Field) -> str:
    """A control header's value on one line (message.header.decoded_text)."""
    try:
        return decoded_text(raw, item)
    except UnicodeError:
        name = raw[item.start : item.end].split(b":", 1)[0].decode("ascii", "replace")
        raise MalformedControl(f"{name.strip()}: not UTF-8") from None


def _shown(text: str) -> str:
    """A value quoted for a reply line, cut short."""
    return repr(text if len(text) <= 40 else text[:37] + "...")


class MailgunSettings(ProviderSettings):
    """``ESPRELAY_MAILGUN_*``: the sending domain's API key and the domain."""

    api_key: SecretStr
    domain: str
    api_url: str = "https://api.mailgun.net"

    def api_urls(self) -> tuple[str, ...]:
        return (self.api_url,)


def build(settings: MailgunSettings, client: httpx.AsyncClient) -> MailgunProvider:
    return MailgunProvider(
        client, api_key=settings.api_key, domain=settings.domain, api_url=settings.api_url
    )


KIND = ProviderKind("mailgun", MailgunSettings, build, "Mailgun messages.mime (raw MIME)")
