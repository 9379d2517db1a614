"""SendGrid: ``POST /v3/mail/send`` with a JSON body built from the parsed message.

Facts from SendGrid's v3 Mail Send reference (``tsg_mail_v3.json``): Bearer API key;
``personalizations`` and ``from`` are required and every personalization needs a
``to``; ``content`` lists text/plain before text/html and each ``value`` is non-empty;
attachments need ``content`` and ``filename``, inline images ``disposition: inline``
plus ``content_id``; ``headers`` may not set To, From, Subject, Reply-To, CC, BCC,
Content-Type, Content-Transfer-Encoding, DKIM-Signature, Received or x-sg-*; the
whole request stays under 30 MB and 1000 recipients.  Success is ``202`` with the
message id in ``X-Message-Id``.  Recipient names with a comma or semicolon are quoted:
SendGrid otherwise reads part of the name as an address and drops the message.
An attachment's ``type`` takes no parameters (SendGrid refuses a ``;``), so a calendar
invitation goes out as a ``text/calendar; method=...`` entry of ``content``.
The ``X-SMTPAPI`` header of SendGrid's SMTP relay becomes Mail Send fields and is never
sent on; a malformed one is refused at the end of DATA (see :func:`read_smtpapi`).
Sandbox mode (``ESPRELAY_SENDGRID_SANDBOX``): ``mail_settings.sandbox_mode.enable`` is
true in every request, so SendGrid validates it and sends nothing; it answers ``200``
rather than ``202``, without a message id (SendGrid's Sandbox Mode page).
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import SecretStr

from esprelay.errors import (
    DeliveryError,
    MessageRejected,
    ProviderConfigError,
    RateLimited,
)
from esprelay.message.header import decoded_text, may_have, read_header
from esprelay.message.mime import (
    Attachment,
    Mailbox,
    ParsedMessage,
    attachment_text,
    fallback_filename,
    parse,
    summarize,
)
from esprelay.models import OutboundMessage, SendResult
from esprelay.providers.base import (
    LONG_STRING,
    Built,
    HttpProvider,
    PostTarget,
    ProviderKind,
    ProviderSettings,
    classify_status,
    excerpt,
    json_body,
    no_json_constant,
    parse_retry_after,
)
from esprelay.providers.stamp import ID_KEY, left_out_warning, without_ours

REQUEST_LIMIT = 30_000_000  # bytes, the whole JSON request
#: Headers SendGrid sets itself and refuses in ``headers`` (plus every x-sg-*).
RESERVED_HEADERS = frozenset(
    {
        "to",
        "from",
        "subject",
        "reply-to",
        "cc",
        "bcc",
        "content-type",
        "content-transfer-encoding",
        "dkim-signature",
        "received",
        "return-path",  # the ESP writes its own bounce address
    }
)


def build_payload(
    parsed: ParsedMessage,
    smtpapi: SmtpApi | None = None,
    esprelay_id: str = "",
    *,
    sandbox: bool = False,
) -> tuple[dict[str, Any], list[str]]:
    """The Mail Send JSON for ``parsed`` (with what its X-SMTPAPI header asks for, and
    ``esprelay_id`` as a custom argument), and what had to change to fit; pure.
    ``sandbox``: SendGrid's sandbox mode (nothing is sent), whatever the header says of
    the other mail settings."""
    warnings = list(parsed.warnings)
    if parsed.from_ is None:
        raise MessageRejected("no usable From address and no envelope sender", provider="sendgrid")
    payload: dict[str, Any] = {
        "personalizations": _personalizations(parsed, warnings),
        "from": _mailbox(parsed.from_, quote=False),
    }
    if parsed.subject:
        payload["subject"] = parsed.subject
    else:
        payload["subject"] = "(no subject)"
        warnings.append("no Subject: sent as '(no subject)' (SendGrid requires one)")
    if len(parsed.reply_to) == 1:
        payload["reply_to"] = _mailbox(parsed.reply_to[0], quote=False)
    elif parsed.reply_to:
        payload["reply_to_list"] = [_mailbox(m, quote=False) for m in parsed.reply_to]

    content = [
        {"type": ctype, "value": value}
        for ctype, value in (("text/plain", parsed.text), ("text/html", parsed.html))
        if value
    ]
    if not content:
        content = [{"type": "text/plain", "value": " "}]
        warnings.append("no text or HTML body: sent a blank text body (SendGrid requires one)")
    invite = _invitation(parsed, warnings)
    if invite is not None:
        content.append(invite[1])
    payload["content"] = content

    attachments = _attachments(parsed, warnings, skip=invite[0] if invite else None)
    if attachments:
        payload["attachments"] = attachments
    headers = _headers(parsed, warnings)
    if headers:
        payload["headers"] = headers
    if smtpapi is not None:
        for personalization in payload["personalizations"]:
            personalization.update(smtpapi.personalization)
        payload.update(smtpapi.fields)
        warnings.extend(smtpapi.warnings)
    if esprelay_id:
        _stamp(payload["personalizations"], esprelay_id, warnings)
    if sandbox:
        payload["mail_settings"] = {
            **payload.get("mail_settings", {}),
            "sandbox_mode": {"enable": True},
        }
    return payload, warnings


def _stamp(personalizations: list[dict[str, Any]], esprelay_id: str, warnings: list[str]) -> None:
    """esprelay's id as the ``esprelay_id`` custom argument of every personalization
    (:mod:`esprelay.providers.stamp`): SendGrid puts each custom argument on every event
    of the message, asynchronous bounces included, which carry no message id otherwise.

    Personalization-level, not the message-level ``custom_args``: a personalization's
    argument would override a message-level one of the same name.  An X-SMTPAPI
    ``unique_args`` value under the key is dropped; if the id would take the arguments
    past SendGrid's 10,000 bytes, the message's own are kept and the id left out.
    """
    own: dict[str, str] = personalizations[0].get("custom_args", {})  # one X-SMTPAPI for all
    args, dropped = without_ours(own, "X-SMTPAPI unique_args")
    warnings.extend(dropped)
    stamped = {**args, ID_KEY: esprelay_id}
    if len(json_body(stamped)) <= MAX_ARGS_BYTES:
        args = stamped
    else:
        warnings.append(left_out_warning(f"custom_args would exceed {MAX_ARGS_BYTES} bytes"))
    for personalization in personalizations:
        if args:
            personalization["custom_args"] = dict(args)
        else:
            personalization.pop("custom_args", None)


def _mailbox(box: Mailbox, *, quote: bool = True) -> dict[str, str]:
    out = {"email": box.addr}
    name = box.name
    if name:
        if quote and (("," in name) or (";" in name)):
            name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out["name"] = name
    return out


def _personalizations(parsed: ParsedMessage, warnings: list[str]) -> list[dict[str, Any]]:
    r = parsed.recipients
    if not r.all():
        raise MessageRejected("no recipients", provider="sendgrid")
    to, cc = r.to, r.cc
    if not to and cc:
        warnings.append("no To recipient: the Cc recipients are sent as To (SendGrid needs a To)")
        to, cc = cc, ()
    if not to:
        # Every recipient is blind: one personalization each, so nobody sees another.
        warnings.append(
            "no visible recipient: each Bcc recipient gets a copy addressed to itself"
            " (SendGrid needs a To)"
        )
        return [{"to": [_mailbox(box)]} for box in r.bcc]
    personalization: dict[str, Any] = {"to": [_mailbox(b) for b in to]}
    if cc:
        personalization["cc"] = [_mailbox(b) for b in cc]
    if r.bcc:
        personalization["bcc"] = [_mailbox(b) for b in r.bcc]
    return [personalization]


def _invitation(
    parsed: ParsedMessage, warnings: list[str]
) -> tuple[Attachment, dict[str, str]] | None:
    """The first calendar part with a ``method`` (an invitation, a reply, a
    cancellation...) as a ``content`` entry of its own, ``text/calendar; method=REQUEST``,
    and the part it came from.

    SendGrid refuses a ``;`` in an attachment's ``type`` ("The attachment type cannot
    contain ';', or CRLF characters", sendgrid-nodejs#1313), and a calendar attachment
    without its method is shown as a plain .ics file rather than an invitation; a
    ``content`` entry keeps the parameter and goes out as a part of the message's
    multipart/alternative, where Outlook and Gmail look for invitations (SendGrid's
    own example, sendgrid-ruby#298).  SendGrid sends that text as UTF-8.
    """
    for att in parsed.attachments:
        params = dict(att.params)
        method = params.get("method")
        if att.content_type != "text/calendar" or not method or not att.content:
            continue
        value = attachment_text(att, warnings)
        if not value.strip() or any(c in method for c in ';"\r\n'):
            continue
        return att, {"type": f"text/calendar; method={method}", "value": value}
    return None


def _harmless(key: str, value: str) -> bool:
    """A Content-Type parameter that does not change how an attachment is read (Apple
    Mail's x-unix-mode, x-mac-type..., an ASCII or UTF-8 charset): dropped silently."""
    if key.startswith("x-"):
        return True
    return key == "charset" and value.lower() in ("us-ascii", "utf-8", "ascii", "utf8")


def _attachments(
    parsed: ParsedMessage, warnings: list[str], skip: Attachment | None = None
) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for index, att in enumerate(parsed.attachments, 1):
        if att is skip:
            if not att.filename:
                continue  # an alternative part: sent as content, not as a file too
        elif att.content_type == "text/calendar" and dict(att.params).get("method"):
            warnings.append(
                f"attachment {index} is a second calendar part: its method is dropped"
                " (SendGrid takes one as content, attachment types take no parameters)"
            )
        dropped = [f"{k}={v}" for k, v in att.params if k != "method" and not _harmless(k, v)]
        if dropped and att is not skip:
            warnings.append(
                f"attachment {index} ({att.content_type}) lost its parameters"
                f" {'; '.join(dropped)} (SendGrid's attachment type takes none)"
            )
        if not att.content:
            warnings.append(f"attachment {index} is empty and was dropped (SendGrid refuses it)")
            continue
        filename = att.filename
        if not filename:
            filename = fallback_filename(att, index)
            warnings.append(f"attachment {index} ({att.content_type}) had no filename: {filename}")
        item = {
            "content": base64.b64encode(att.content).decode("ascii"),
            "type": att.content_type,
            "filename": filename,
            "disposition": "attachment",
        }
        if att.inline and att.content_id:
            item["disposition"] = "inline"
            item["content_id"] = att.content_id
        elif att.inline:
            warnings.append(f"inline part {index} has no Content-ID: sent as an attachment")
        out.append(item)
    return out


def _headers(parsed: ParsedMessage, warnings: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    seen: set[str] = set()
    dropped: list[str] = []
    for name, value in parsed.headers:
        lname = name.lower()
        if lname == "x-smtpapi":
            continue  # SendGrid's relay strips it: its instructions are fields (read_smtpapi)
        if lname in RESERVED_HEADERS or lname.startswith("x-sg-"):
            dropped.append(name)
        elif lname in seen:
            dropped.append(f"{name} (repeated)")  # a JSON object holds one value per name
        else:
            seen.add(lname)
            out[name] = value
    if dropped:
        warnings.append(f"headers SendGrid does not accept were dropped: {summarize(dropped)}")
    return out


# -- SendGrid's X-SMTPAPI header ------------------------------------------------------
#
# An application that used SendGrid's SMTP relay sends its handling instructions as one
# JSON object in X-SMTPAPI ("Building an X-SMTPAPI Header",
# https://www.twilio.com/docs/sendgrid/for-developers/sending-email/building-an-x-smtpapi-header).
# SendGrid's relay strips the header ("The X-SMTPAPI headers that you add will be
# stripped from the final email", https://sendgrid.com/docs/API_Reference/SMTP_API/)
# and bounces a message whose header it cannot parse ("if our system encounters a
# parsing error, the message will be bounced to the address specified in the MAIL
# FROM"): esprelay turns each instruction into its v3 Mail Send field (the spec in
# ../shared/specs/sendgrid), never passes the header on, and refuses at the end of DATA
# (550 5.6.0) an instruction SendGrid would not take or esprelay cannot carry.
#
# "For any request received with multiple X-SMTPAPI headers ... Twilio SendGrid will
# adhere to the first X-SMTPAPI header instance" (same page): so does esprelay, with a
# warning. The header may be folded (old SendGrid examples fold it with textwrap at
# token boundaries) and may carry non-ASCII text as \u escapes (SendGrid's advice, and
# what json.dumps writes), raw UTF-8 or RFC 2047 encoded words: each is read.

SMTPAPI_HEADER = b"x-smtpapi"
#: "The total collective size of your substitutions may not exceed 10,000 bytes per
#: personalization object"; custom_args: "This field may not exceed 10,000 bytes" (v3
#: spec); unique_args: "up to 10,000 bytes" (SendGrid's Unique Arguments page).  Counted
#: as the compact UTF-8 JSON of the object.
MAX_ARGS_BYTES = 10_000
#: categories: "maxItems": 10, each "maxLength": 255 (v3 spec); "Categories must be in
#: 7bit encoding using the US-ASCII character set" (SendGrid's Categories page).
MAX_CATEGORIES = 10
MAX_CATEGORY_LENGTH = 255
#: send_at: "A send cannot be scheduled more than 72 hours in advance" (v3 spec).
MAX_SCHEDULE_AHEAD = 72 * 3600
#: asm.groups_to_display: "maxItems": 25 (v3 spec; "You can specify up to 25 groups to
#: display", SendGrid's Suppression Groups page).
MAX_GROUPS_TO_DISPLAY = 25
#: ip_pool_name: "minLength": 2, "maxLength": 64 (v3 spec).
IP_POOL_LENGTH = (2, 64)


class MalformedSmtpApi(ValueError):
    """An X-SMTPAPI header SendGrid would not apply or esprelay cannot carry."""


@dataclass(frozen=True, slots=True)
class SmtpApi:
    """What a message's X-SMTPAPI header becomes in the Mail Send request."""

    #: Message-level fields: categories, send_at, batch_id, asm, ip_pool_name,
    #: template_id, mail_settings, tracking_settings.
    fields: dict[str, Any]
    #: Fields of every personalization: custom_args, substitutions.
    personalization: dict[str, Any]
    warnings: tuple[str, ...] = ()


def read_smtpapi(raw: bytes, *, now: float | None = None) -> SmtpApi | None:
    """The Mail Send fields ``raw``'s X-SMTPAPI header asks for, None without one; raises
    :class:`MalformedSmtpApi` with the reason for one SendGrid would not apply.
    ``now`` (epoch seconds, default the clock) bounds ``send_at``."""
    header = read_header(raw, obsolete=True)
    found = header.all(SMTPAPI_HEADER)
    if not found:
        return None
    warnings: tuple[str, ...] = ()
    if len(found) > 1:
        warnings = (f"{len(found)} X-SMTPAPI headers: the first is used, as SendGrid does",)
    try:
        text = decoded_text(raw, found[0])
    except UnicodeError:
        raise MalformedSmtpApi("X-SMTPAPI: not UTF-8") from None
    try:
        value = json.loads(text, parse_constant=no_json_constant, parse_float=_finite)
    except RecursionError:
        raise MalformedSmtpApi("X-SMTPAPI: nested too deeply") from None
    except ValueError:
        raise MalformedSmtpApi("X-SMTPAPI: not valid JSON") from None
    if not isinstance(value, dict):
        raise MalformedSmtpApi("X-SMTPAPI: not a JSON object")
    try:
        json_body(value)
    except TypeError as exc:  # what the request's JSON encoder (orjson) cannot write
        reason = next((r for k, r in _UNWRITABLE.items() if k in str(exc)), "not writable")
        raise MalformedSmtpApi(f"X-SMTPAPI: {reason}") from None
    return _translate(value, time.time() if now is None else now, warnings)


_UNWRITABLE = {
    "surrogates": "a \\u escape that is not a character",  # a lone "\ud800"
    "64-bit": "an integer over 64 bits",
    "ecursion": "nested too deeply",
}


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # 1e400
        raise ValueError(f"{text} is not a finite number")
    return value


def _translate(api: dict[str, Any], now: float, warnings: tuple[str, ...]) -> SmtpApi:
    unknown = [key for key in api if key not in _KEYS]
    if unknown:
        raise MalformedSmtpApi(
            f"X-SMTPAPI: unknown {_names(unknown)} (SendGrid's keys: {', '.join(_KEYS)})"
        )
    for key, reason in _REFUSED.items():
        if key in api:
            raise MalformedSmtpApi(f'X-SMTPAPI "{key}": {reason}')
    fields: dict[str, Any] = {}
    personalization: dict[str, Any] = {}
    if "category" in api:
        categories = _categories(api["category"])
        if categories:
            fields["categories"] = categories
    if "unique_args" in api:
        args = _string_map("unique_args", api["unique_args"])
        if args:
            personalization["custom_args"] = args
    if "sub" in api:
        subs = _substitutions(api["sub"])
        if subs:
            personalization["substitutions"] = subs
    if "send_at" in api:
        fields["send_at"] = _send_at(api["send_at"], now)
    if "batch_id" in api:
        fields["batch_id"] = _text("batch_id", api["batch_id"])
    if "asm_groups_to_display" in api and "asm_group_id" not in api:
        raise MalformedSmtpApi(
            'X-SMTPAPI "asm_groups_to_display" without "asm_group_id" (Mail Send takes'
            " the groups to display only with the group)"
        )
    if "asm_group_id" in api:
        asm: dict[str, Any] = {"group_id": _group_id("asm_group_id", api["asm_group_id"])}
        if "asm_groups_to_display" in api:
            asm["groups_to_display"] = _groups(api["asm_groups_to_display"])
        fields["asm"] = asm
    if "ip_pool" in api:
        pool = _text("ip_pool", api["ip_pool"])
        low, high = IP_POOL_LENGTH
        if not low <= len(pool) <= high:
            raise MalformedSmtpApi(f'X-SMTPAPI "ip_pool": not {low} to {high} characters')
        fields["ip_pool_name"] = pool
    if "filters" in api:
        warnings += _filters(api["filters"], fields)
    return SmtpApi(fields, personalization, warnings)


#: X-SMTPAPI's keys, as SendGrid's SMTP API pages name them.
_KEYS = (
    "to",
    "sub",
    "section",
    "category",
    "unique_args",
    "send_at",
    "send_each_at",
    "batch_id",
    "asm_group_id",
    "asm_groups_to_display",
    "ip_pool",
    "filters",
)
_REFUSED = {
    # SendGrid's relay sends one copy to each address of "to" (with its "sub" values)
    # instead of to the RCPT TO recipients; esprelay's envelope decides who receives.
    "to": "esprelay sends to the SMTP envelope; give these recipients as RCPT TO",
    # "send_each_at is a sequence of UNIX timestamps ... one timestamp per email" of "to".
    "send_each_at": 'schedules each "to" recipient, which esprelay does not take; use send_at',
    # Sections are substitution values shared by the "to" recipients; the v3 Mail Send
    # spec (../shared/specs/sendgrid) has no field for them.
    "section": "Mail Send has no sections; write the text into the sub values",
}


def _names(keys: list[str]) -> str:
    return ", ".join(_quoted(k) for k in keys[:5]) + (" ..." if len(keys) > 5 else "")


def _quoted(text: str, limit: int = 40) -> str:
    """A value from the header for a reply line: ASCII, quoted, bounded."""
    shown = ascii(text if len(text) <= limit else text[: limit - 3] + "...")
    return '"' + shown[1:-1].replace('"', '\\"') + '"'


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise MalformedSmtpApi(f'X-SMTPAPI "{key}": not a non-empty string')
    return value


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _group_id(key: str, value: Any) -> int:
    # "When passing asm_group_id please make sure to only use integers" (Suppression
    # Groups page); v3 asm.group_id and groups_to_display items are integers.
    if not _integer(value) or value <= 0:
        raise MalformedSmtpApi(f'X-SMTPAPI "{key}": not a group id (a positive integer)')
    return int(value)


def _groups(value: Any) -> list[int]:
    if not isinstance(value, list) or not value:
        raise MalformedSmtpApi('X-SMTPAPI "asm_groups_to_display": not a list of group ids')
    if len(value) > MAX_GROUPS_TO_DISPLAY:
        raise MalformedSmtpApi(
            f'X-SMTPAPI "asm_groups_to_display": {len(value)} groups; SendGrid displays at'
            f" most {MAX_GROUPS_TO_DISPLAY}"
        )
    return [_group_id("asm_groups_to_display", v) for v in value]


def _categories(value: Any) -> list[str]:
    # "category" is a string or a list of strings (Building an X-SMTPAPI Header).
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(c, str) for c in items):
        raise MalformedSmtpApi('X-SMTPAPI "category": not a string or a list of strings')
    categories = list(dict.fromkeys(items))  # the spec's "uniqueItems": repeats merged
    for category in categories:
        if not category.isascii() or not category.isprintable():
            raise MalformedSmtpApi(
                f'X-SMTPAPI "category" {_quoted(category)}: not printable US-ASCII'
            )
        if len(category) > MAX_CATEGORY_LENGTH:
            raise MalformedSmtpApi(
                f'X-SMTPAPI "category" {_quoted(category)}: over {MAX_CATEGORY_LENGTH} characters'
            )
    if len(categories) > MAX_CATEGORIES:
        raise MalformedSmtpApi(
            f'X-SMTPAPI "category": {len(categories)} categories; SendGrid takes at most'
            f" {MAX_CATEGORIES}"
        )
    return categories


def _scalar_text(key: str, name: str, value: Any) -> str:
    """A value Mail Send takes only as a string: a number or boolean as its JSON text."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return json.dumps(value)
    raise MalformedSmtpApi(f'X-SMTPAPI "{key}" {_quoted(name)}: not a string or number')


def _string_map(key: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise MalformedSmtpApi(f'X-SMTPAPI "{key}": not a JSON object')
    out: dict[str, str] = {}
    for name, item in value.items():
        if not name:
            raise MalformedSmtpApi(f'X-SMTPAPI "{key}": an empty name')
        out[name] = _scalar_text(key, name, item)
    _bounded(key, out)
    return out


def _bounded(key: str, value: dict[str, str]) -> None:
    size = len(json_body(value))
    if size > MAX_ARGS_BYTES:
        raise MalformedSmtpApi(
            f'X-SMTPAPI "{key}": {size} bytes; SendGrid takes at most {MAX_ARGS_BYTES}'
        )


def _substitutions(value: Any) -> dict[str, str]:
    # "sub": each tag has a list with one value per "to" recipient.  Without "to" (which
    # esprelay refuses) the message is one copy: one value, or a plain string.
    if not isinstance(value, dict):
        raise MalformedSmtpApi('X-SMTPAPI "sub": not a JSON object')
    out: dict[str, str] = {}
    for tag, values in value.items():
        if not tag:
            raise MalformedSmtpApi('X-SMTPAPI "sub": an empty tag')
        if isinstance(values, list):
            if len(values) != 1:
                raise MalformedSmtpApi(
                    f'X-SMTPAPI "sub" {_quoted(tag)}: {len(values)} values, one per "to"'
                    " recipient; esprelay sends one copy to the envelope: give one value"
                )
            values = values[0]
        out[tag] = _scalar_text("sub", tag, values)
    _bounded("sub", out)
    return out


def _send_at(value: Any, now: float) -> int:
    if not _integer(value) or value < 0:
        raise MalformedSmtpApi('X-SMTPAPI "send_at": not a UNIX timestamp (an integer)')
    if value > now + MAX_SCHEDULE_AHEAD:
        raise MalformedSmtpApi(
            'X-SMTPAPI "send_at": more than 72 hours ahead; SendGrid schedules up to 72'
        )
    return int(value)


# SendGrid's SMTP Filters page
# (https://www.twilio.com/docs/sendgrid/for-developers/sending-email/smtp-filters):
# {"filters": {"<filter>": {"settings": {"<setting>": value}}}}, "All filters and setting
# names must be lowercase", "enable" is 0 or 1.  Each filter with a Mail Send field, by
# (where, field) and {setting: field setting}; "enable" becomes a boolean.
_FILTERS: dict[str, tuple[str, str, dict[str, str]]] = {
    "clicktrack": (
        "tracking_settings",
        "click_tracking",
        {"enable": "enable", "enable_text": "enable_text"},
    ),
    "opentrack": (
        "tracking_settings",
        "open_tracking",
        {"enable": "enable", "replace": "substitution_tag"},
    ),
    "subscriptiontrack": (
        "tracking_settings",
        "subscription_tracking",
        {
            "enable": "enable",
            "text/html": "html",
            "text/plain": "text",
            "replace": "substitution_tag",
        },
    ),
    "ganalytics": (
        "tracking_settings",
        "ganalytics",
        {
            k: k
            for k in (
                "enable",
                "utm_source",
                "utm_medium",
                "utm_term",
                "utm_content",
                "utm_campaign",
            )
        },
    ),
    "footer": (
        "mail_settings",
        "footer",
        {"enable": "enable", "text/html": "html", "text/plain": "text"},
    ),
    "bypass_list_management": ("mail_settings", "bypass_list_management", {"enable": "enable"}),
}
_BOOLEAN_SETTINGS = frozenset({"enable", "enable_text"})
#: Filters SendGrid retired ("Due to low usage, this setting has been removed"): its
#: relay no longer applies them, so neither does esprelay (a warning says so).
_RETIRED_FILTERS = frozenset({"bcc", "spamcheck"})
#: Filters with no Mail Send field: refused rather than dropped.
_UNCARRIED_FILTERS = {
    "dkim": "Mail Send has no per-message DKIM domain",
    "template": "the legacy template app has no Mail Send field",
}


def _filters(value: Any, fields: dict[str, Any]) -> tuple[str, ...]:
    if not isinstance(value, dict):
        raise MalformedSmtpApi('X-SMTPAPI "filters": not a JSON object')
    warnings: list[str] = []
    for name, item in value.items():
        settings = item.get("settings") if isinstance(item, dict) else None
        if not isinstance(settings, dict):
            raise MalformedSmtpApi(f'X-SMTPAPI filter {_quoted(name)}: not {{"settings": {{...}}}}')
        if name in _RETIRED_FILTERS:
            warnings.append(f"X-SMTPAPI filter {name!r} was retired by SendGrid: not applied")
            continue
        if name in _UNCARRIED_FILTERS:
            raise MalformedSmtpApi(f"X-SMTPAPI filter {name!r}: {_UNCARRIED_FILTERS[name]}")
        if name == "templates":
            template = _template(settings)
            if template:
                fields["template_id"] = template
            continue
        if name not in _FILTERS:
            raise MalformedSmtpApi(
                f"X-SMTPAPI filter {_quoted(name)}: not one of SendGrid's (lowercase)"
                f" filters: {', '.join([*_FILTERS, 'templates'])}"
            )
        where, field, known = _FILTERS[name]
        setting: dict[str, Any] = {}
        for key, raw_setting in settings.items():
            if key not in known:
                raise MalformedSmtpApi(
                    f"X-SMTPAPI filter {name!r}: unknown setting {_quoted(key)}"
                    f" (it takes {', '.join(known)})"
                )
            if key in _BOOLEAN_SETTINGS:
                setting[known[key]] = _switch(name, key, raw_setting)
            elif isinstance(raw_setting, str):
                setting[known[key]] = raw_setting
            else:
                raise MalformedSmtpApi(f"X-SMTPAPI filter {name!r}: {key!r} is not a string")
        fields.setdefault(where, {})[field] = setting
    return tuple(warnings)


def _switch(name: str, key: str, value: Any) -> bool:
    # The documented values are 0 and 1 (true/false for enable_text); SendGrid's own
    # smtpapi libraries pass what they are given, often "1".
    if value in (0, 1) or value in ("0", "1"):  # True and False are 1 and 0
        return value in (1, "1")
    raise MalformedSmtpApi(f"X-SMTPAPI filter {name!r}: {key!r} is not 0 or 1")


def _template(settings: dict[str, Any]) -> str | None:
    unknown = [k for k in settings if k not in ("enable", "template_id")]
    if unknown:
        raise MalformedSmtpApi(f"X-SMTPAPI filter 'templates': unknown {_names(unknown)}")
    if not _switch("templates", "enable", settings.get("enable", 0)):
        return None
    return _text("templates.template_id", settings.get("template_id"))


class SendGridProvider(HttpProvider):
    kind = "sendgrid"
    rebuilds_message = True
    smtputf8 = False  # v3 answers 202 then drops a UTF-8 local part as "Invalid"
    #: Raw bytes that still fit 30 MB after base64 (4/3) with room for the JSON around.
    max_message_size = REQUEST_LIMIT * 3 // 4 - 200_000
    max_recipients = 1000

    def __init__(
        self,
        client: httpx.AsyncClient,
        api_key: SecretStr,
        api_url: str,
        name: str | None = None,
        *,
        sandbox: bool = False,
    ) -> None:
        super().__init__(client, name)
        #: Sandbox mode: SendGrid validates each request and sends nothing.
        self.sandbox = sandbox
        self._api_key = api_key
        self.endpoint = api_url.rstrip("/") + "/v3/mail/send"
        self._target = PostTarget(
            self.endpoint,
            {
                "Authorization": f"Bearer {api_key.get_secret_value()}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
        )

    def refusal(self, message: OutboundMessage) -> str | None:
        """A malformed X-SMTPAPI header, refused at the end of DATA."""
        if not may_have(message.raw, SMTPAPI_HEADER):
            return None
        try:
            read_smtpapi(message.raw)
        except MalformedSmtpApi as exc:
            return str(exc)
        return None

    def build_request(self, message: OutboundMessage) -> Built:
        parsed = parse(message.raw, message.envelope)
        smtpapi = None
        if may_have(message.raw, SMTPAPI_HEADER):
            try:
                smtpapi = read_smtpapi(message.raw)
            except MalformedSmtpApi as exc:  # spooled before the intake refused these
                raise MessageRejected(str(exc), provider=self.name) from None
        payload, warnings = build_payload(parsed, smtpapi, message.id, sandbox=self.sandbox)
        body = json_body(payload, large=len(message.raw) >= LONG_STRING)
        if len(body) >= REQUEST_LIMIT:
            raise MessageRejected(
                f"request of {len(body)} bytes exceeds SendGrid's 30 MB limit", provider=self.name
            )
        return Built(self._target.request(body), tuple(warnings))

    def parse_response(self, response: httpx.Response, message: OutboundMessage) -> SendResult:
        warnings: tuple[str, ...] = ()
        if self.sandbox and response.status_code == 200:
            # Sandbox mode: the request is valid and nothing was sent, so there is no id.
            return SendResult(provider_message_id=response.headers.get("x-message-id"))
        if response.status_code != 202:
            # SendGrid answers 202 and nothing else; a 200 is some other server.
            raise ProviderConfigError(
                f"unexpected HTTP {response.status_code} (not SendGrid's 202; check"
                f" ESPRELAY_SENDGRID_API_URL): {excerpt(response)}",
                provider=self.name,
                status_code=response.status_code,
            )
        provider_id = response.headers.get("x-message-id")
        if not provider_id:
            warnings += ("SendGrid answered 202 without an X-Message-Id",)
        return SendResult(provider_message_id=provider_id, warnings=warnings)

    def classify_error(self, response: httpx.Response) -> DeliveryError:
        status = response.status_code
        if status == 429:
            return RateLimited(
                f"HTTP 429: {excerpt(response)}",
                provider=self.name,
                status_code=status,
                retry_after=rate_limit_reset(response),
            )
        if status in (404, 405):
            return ProviderConfigError(
                f"HTTP {status} (check ESPRELAY_SENDGRID_API_URL): {excerpt(response)}",
                provider=self.name,
                status_code=status,
            )
        return classify_status(response, provider=self.name)


def rate_limit_reset(response: httpx.Response, *, now: float | None = None) -> float | None:
    """Seconds until SendGrid's ``X-RateLimit-Reset`` (epoch seconds), else Retry-After."""
    value = response.headers.get("x-ratelimit-reset")
    if value:
        try:
            return max(0.0, float(value) - (time.time() if now is None else now))
        except ValueError:
            pass
    return parse_retry_after(response.headers.get("retry-after"))


class SendGridSettings(ProviderSettings):
    """``ESPRELAY_SENDGRID_*``: an API key with Mail Send permission; ``sandbox`` turns
    on SendGrid's sandbox mode (requests are validated, nothing is sent)."""

    api_key: SecretStr
    api_url: str = "https://api.sendgrid.com"
    sandbox: bool = False

    def api_urls(self) -> tuple[str, ...]:
        return (self.api_url,)


def build(settings: SendGridSettings, client: httpx.AsyncClient) -> SendGridProvider:
    return SendGridProvider(client, settings.api_key, settings.api_url, sandbox=settings.sandbox)


KIND = ProviderKind("sendgrid", SendGridSettings, build, "SendGrid v3 Mail Send (JSON)")
