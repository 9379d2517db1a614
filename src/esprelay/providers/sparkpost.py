"""SparkPost: ``POST /api/v1/transmissions`` with the raw message as ``email_rfc822``.

Facts from SparkPost's API Blueprint (SparkPost/developers.sparkpost.com,
``content/api/transmissions.apib``, ``index.apib``, ``recipient-lists.apib`` and
``template-language.apib``), cited where used:

- ``Authorization: <API key>``; base URLs ``https://api.sparkpost.com/api/v1`` and, for
  SparkPost EU (separate accounts), ``https://api.eu.sparkpost.com/api/v1``.
- ``content.email_rfc822``: the message "should NOT be dot stuffed" nor end in the SMTP
  terminator; content headers are not generated; unparseable MIME is refused.
- ``recipients[].address.email`` "is used as the envelope RCPT TO value", and "the
  ``To`` header is not built for email_rfc822 content": the recipients are the envelope,
  and recipients see the message's own To and Cc.  The Bcc header is removed
  (:func:`esprelay.message.rawmime.strip_bcc`), as by every provider.
- "The transmission content ... is limited to 20 MBs" (:data:`MAX_MESSAGE_SIZE`); one
  transmission may hold thousands of recipients (10,000 advised per call, support
  article "SMTP and REST API performance"; :data:`MAX_RECIPIENTS`).
- The template language: ``{{...}}`` is substituted "in the top-level headers and the
  first non-attachment text/plain, text/html, and text/x-amp-html MIME parts";
  ``options.perform_substitutions: false`` stops it in the bodies, but "Headers are
  still passed to the substitution engine ... That includes headers that are part of
  email_rfc822 content parts", RFC 2047 encoded words decoded first.  So every request
  turns substitutions off, and a header field whose text holds ``{{`` is protected
  (:func:`protect_headers`): each brace in it is written as a substitution variable
  whose value is that brace (``{{esprelaylbrace}}`` is ``{``), so the engine writes the
  field back as it was.  Where that cannot work (``{{`` in base64-encoded words), the
  message is refused at the end of DATA (:meth:`SparkPostProvider.refusal`).
- Success is ``200 {"results": {"id", "total_accepted_recipients",
  "total_rejected_recipients"}}``; a ``200`` may refuse some recipients
  (``errors: [{"code": "2000", "message": "transmission created, but with validation
  errors"}]`` and ``results.rcpt_to_errors``, whose entries carry a code, a message and
  a description but no address).  See :meth:`SparkPostProvider.parse_response`.
- Errors are ``{"errors": [{"message", "code", "description"}]}``; ``420`` is a
  sending limit (codes 2101 hourly, 2102 daily, 2103 sandbox: "no messages are sent"),
  retried later; ``429`` "wait 1 to 5 seconds" (POSTs to transmissions are not
  rate-limited that way, other calls are); ``401``/``403`` are the key;
  ``7001`` "Unconfigured or unverified sending domain".
- ``options.sandbox``: SparkPost's sandbox sending domain (``sparkpostbox.com``, five
  messages over an account's life), ``ESPRELAY_SPARKPOST_SANDBOX``.

Coming from SparkPost's SMTP relay (``smtp-api.apib``): its ``X-MSYS-API`` header (a
JSON object) is read as the relay reads it and leaves the message: ``campaign_id``,
``metadata``, ``tags`` and ``options`` become the transmission's fields
(:func:`read_msys_api`).  Its ``cc``, ``bcc`` and ``archive`` lists would add recipients
outside the envelope, so such a message is refused at the end of DATA, as is one whose
header is not JSON (the relay answers ``550 5.6.0`` too).  "SMTP click and open tracking
are disabled by default" while the REST API turns click tracking on unless told
otherwise: every transmission sets both off, so links and HTML arrive as written,
unless ``X-MSYS-API`` options turn them on.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
from pydantic import SecretStr, field_validator

from esprelay.errors import (
    DeliveryError,
    MessageRejected,
    ProviderConfigError,
    ProviderUnavailable,
    RateLimited,
)
from esprelay.message.header import Field, decoded_text, may_have, read_header
from esprelay.message.rawmime import remove_fields, strip_bcc, to_7bit
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
    no_json_constant,
    parse_retry_after,
)
from esprelay.ratelimit import RateLimit

PATH = "/api/v1/transmissions"
#: "The transmission content (text + html + attachments + inline images) is limited to
#: 20 MBs": the raw message is that content.
MAX_MESSAGE_SIZE = 20_000_000
#: Recipients per transmission: "thousands"; SparkPost advises at most 10,000 per call.
MAX_RECIPIENTS = 10_000
#: Requests per second kept proactively: none documented for transmissions, so only
#: high enough never to matter; the bucket is there to hold requests after a 429.
SEND_RATE = 1000.0
#: "wait 1 to 5 seconds after receiving a 429 response before requesting again".
WAIT_AFTER_429 = 5.0
#: The longest a 429's Retry-After holds every request of the provider.
MAX_HOLD = 60.0
#: The substitution variables that write a brace back into a protected header field:
#: letters only, as ``_`` reads as a space inside a quoted-printable encoded word.
OPEN_VARIABLE = "esprelaylbrace"
CLOSE_VARIABLE = "esprelayrbrace"
SUBSTITUTIONS = {OPEN_VARIABLE: "{", CLOSE_VARIABLE: "}"}
_OPEN = ("{{" + OPEN_VARIABLE + "}}").encode()
_CLOSE = ("{{" + CLOSE_VARIABLE + "}}").encode()
_BRACE = re.compile(rb"[{}]")
#: The metadata key that carries the spool id to SparkPost's webhook events.
ID_METADATA = "esprelay_id"
#: Sending limits (HTTP 420): nothing was sent; retried later.
QUOTA_CODES = frozenset({"2101", "2102", "2103"})
#: Codes an operator must act on, whatever the message (extended error codes table):
#: permission denied, unauthorized tenant or user, unconfigured sending domain.
CONFIG_CODES = frozenset({"1100", "1303", "1304", "7001"})
#: SparkPost's SMTP relay control header (lower case).
MSYS_HEADER = b"x-msys-api"
#: Its options: the booleans and the one string (``smtp-api.apib``).
MSYS_FLAGS = frozenset(
    {
        "open_tracking",
        "click_tracking",
        "transactional",
        "sandbox",
        "skip_suppression",
        "smart_send",
        "inline_css",
    }
)
#: "campaign_id ... Maximum length: 64 bytes"; "Maximum number of tags is 10 per recipient".
CAMPAIGN_LIMIT = 64
TAG_LIMIT = 10
#: The relay's defaults: "SMTP click and open tracking are disabled by default".
TRACKING_OFF = {"open_tracking": False, "click_tracking": False}


class ControlHeaderError(ValueError):
    """An X-MSYS-API header SparkPost's relay would refuse, or that asks for what the
    envelope does not say; the text says why."""


class TemplateHazard(ValueError):
    """A header field SparkPost's template engine would change, and esprelay cannot
    protect; the text says which."""


# -- the substitution hazard -----------------------------------------------------------


def _shown(raw: bytes, item: Field) -> str | None:
    """A field's text as SparkPost's engine reads it (encoded words decoded), or None
    when it is not UTF-8 (the engine cannot read it either)."""
    try:
        return decoded_text(raw, item)
    except UnicodeError:
        return None


def protect_headers(raw: bytes) -> tuple[bytes, tuple[str, ...]]:
    """``raw`` with every top-level field whose text holds ``{{`` protected from
    SparkPost's template engine, and the names of those fields; ``raw`` itself when
    none needs it.  Raises :class:`TemplateHazard` for a field it cannot protect.

    Each ``{`` and ``}`` of such a field becomes ``{{esprelaylbrace}}`` / ``{{esprelayrbrace}}``
    (the request's ``substitution_data`` gives them the values ``{`` and ``}``), so
    that the field holds no brace but those of whole expressions, and the engine's
    output is the field as written.  Braces inside quoted-printable encoded words are
    replaced the same way (the engine decodes the word first); in base64 ones they
    cannot be, and such a field is refused.
    """
    header = read_header(raw)
    head = raw[: header.end]
    if b"{{" not in head and b"=?" not in head:
        return raw, ()
    pieces: list[bytes] = []
    names: list[str] = []
    done = 0
    for item in header.fields:
        whole = raw[item.start : item.end]
        if b"{{" not in whole:
            if b"=?" not in whole:
                continue
            text = _shown(raw, item)
            if text is None or "{{" not in text:
                continue
        name, colon, value = whole.partition(b":")
        rewritten = name + colon + _BRACE.sub(_brace_variable, value)
        text = _shown(rewritten, Field(item.name, 0, len(rewritten)))
        shown_name = name.decode("ascii", "replace")
        if text is not None:
            left = text.replace(_OPEN.decode(), "\x00").replace(_CLOSE.decode(), "\x00")
            if "{{" in left:
                raise TemplateHazard(
                    f"header {shown_name} holds '{{{{' in RFC 2047 encoded text, which"
                    " SparkPost's template engine would rewrite (it substitutes {{...}} in"
                    " every header, even with substitutions off); write it as plain or"
                    " quoted-printable text"
                )
        pieces += [raw[done : item.start], rewritten]
        done = item.end
        names.append(shown_name)
    if not names:
        return raw, ()
    pieces.append(raw[done:])
    return b"".join(pieces), tuple(names)


def _brace_variable(match: re.Match[bytes]) -> bytes:
    return _OPEN if match[0] == b"{" else _CLOSE


# -- X-MSYS-API: SparkPost's SMTP relay control header ---------------------------------


def read_msys_api(raw: bytes) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The transmission fields the message's ``X-MSYS-API`` header asks for (empty
    without one) and warnings.  Raises :class:`ControlHeaderError` for a header the
    relay would refuse or that adds recipients."""
    if not may_have(raw, MSYS_HEADER):  # the common message: one scan of its header
        return {}, ()
    header = read_header(raw, obsolete=True)
    fields = header.all(MSYS_HEADER)
    if not fields:
        return {}, ()
    if len(fields) > 1:
        raise ControlHeaderError(f"X-MSYS-API given {len(fields)} times; SparkPost takes one")
    try:
        text = decoded_text(raw, fields[0])
        found = json.loads(text, parse_constant=no_json_constant)
    except ValueError as exc:  # UnicodeError and JSONDecodeError both
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise ControlHeaderError(f"X-MSYS-API is not valid JSON: {reason}") from None
    if not isinstance(found, dict):
        raise ControlHeaderError("X-MSYS-API must be a JSON object")
    added = sorted(k for k in ("cc", "bcc", "archive") if found.get(k))
    if added:
        raise ControlHeaderError(
            f"X-MSYS-API {'/'.join(added)} would add recipients outside the envelope;"
            " give them as RCPT TO instead (the envelope decides who receives)"
        )
    fields_out: dict[str, Any] = {}
    warnings: list[str] = []
    campaign = found.get("campaign_id")
    if campaign is not None:
        if not isinstance(campaign, str) or len(campaign.encode()) > CAMPAIGN_LIMIT:
            raise ControlHeaderError(
                f"X-MSYS-API campaign_id must be a string of at most {CAMPAIGN_LIMIT} bytes"
            )
        fields_out["campaign_id"] = campaign
    metadata = found.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise ControlHeaderError("X-MSYS-API 'metadata' must be of type 'json object'")
        fields_out["metadata"] = metadata
    tags = found.get("tags")
    if tags is not None:
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ControlHeaderError("X-MSYS-API 'tags' must be an array of strings")
        if len(tags) > TAG_LIMIT:
            warnings.append(
                f"X-MSYS-API has {len(tags)} tags; SparkPost keeps the first {TAG_LIMIT}"
            )
        fields_out["tags"] = tags
    options = found.get("options")
    if options is not None:
        if not isinstance(options, dict):
            raise ControlHeaderError("X-MSYS-API 'options' must be of type 'json object'")
        taken: dict[str, Any] = {}
        for key, value in options.items():
            expected = bool if key in MSYS_FLAGS else str if key == "ip_pool" else None
            if expected is not None and isinstance(value, expected):
                taken[key] = value
            elif expected is not None:
                kind = "a boolean" if expected is bool else "a string"
                raise ControlHeaderError(f"X-MSYS-API options.{key} must be {kind}")
            else:
                warnings.append(f"X-MSYS-API options.{key} is not an SMTP API option: ignored")
        fields_out["options"] = taken
    if "substitution_data" in found:
        warnings.append("X-MSYS-API substitution_data ignored (the SMTP API ignores it too)")
    unknown = sorted(
        set(found) - {"campaign_id", "metadata", "tags", "options", "substitution_data"}
    )
    if unknown:
        warnings.append(f"X-MSYS-API fields not in the SMTP API ignored: {', '.join(unknown)}")
    return fields_out, tuple(warnings)


# -- the request, pure -----------------------------------------------------------------


def _without_msys(raw: bytes) -> bytes:
    """``raw`` without X-MSYS-API: the relay consumes its control header."""
    if not may_have(raw, MSYS_HEADER):
        return raw
    return remove_fields(raw, lambda name: name == MSYS_HEADER)[0]


def _sendable(raw: bytes) -> bytes:
    """The header fields of ``raw`` that reach SparkPost (no Bcc, no X-MSYS-API)."""
    return _without_msys(strip_bcc(raw).raw)


def rfc822_text(raw: bytes) -> tuple[str, tuple[str, ...]]:
    """The message as the JSON string ``email_rfc822``, and what had to change.

    JSON holds text: a message that is ASCII or UTF-8 goes as it is (SparkPost sends
    the same bytes); one with other 8-bit bytes (a Latin-1 body sent 8bit) is
    re-encoded to 7-bit first (quoted-printable or base64), which keeps its meaning.
    """
    if raw.isascii():
        return raw.decode("ascii"), ()
    try:
        return raw.decode("utf-8"), ()
    except UnicodeDecodeError:
        pass
    seven = to_7bit(raw)
    warnings = (
        "8-bit content that is not UTF-8 was re-encoded to 7-bit (SparkPost takes the"
        " message as JSON text)",
        *seven.warnings,
    )
    return seven.raw.decode("ascii", "replace"), warnings


def build_payload(
    message: OutboundMessage, *, sandbox: bool = False, provider: str = "sparkpost"
) -> tuple[dict[str, Any], list[str]]:
    """The transmission for ``message``, and what had to change to fit; pure."""
    if not message.envelope.rcpt_tos:
        raise MessageRejected("no recipients", provider=provider)
    try:  # spooled before the checks at DATA existed: refused now
        controls, warned = read_msys_api(message.raw)
        stripped = strip_bcc(message.raw)
        protected, fields = protect_headers(_without_msys(stripped.raw))
    except (ControlHeaderError, TemplateHazard) as exc:
        raise MessageRejected(str(exc), provider=provider) from None
    warnings = [*stripped.warnings, *warned]
    text, changed = rfc822_text(protected)
    warnings += changed
    # SparkPost's SMTP relay defaults (tracking off), then the message's own options;
    # substitutions stay off whatever they say.
    options: dict[str, Any] = {**TRACKING_OFF, **controls.get("options", {})}
    if sandbox:
        options["sandbox"] = True
    options["perform_substitutions"] = False
    recipient: dict[str, Any] = {}
    if controls.get("tags"):
        recipient["tags"] = controls["tags"]
    metadata = dict(controls.get("metadata", {}))
    if ID_METADATA in metadata:
        warnings.append(f"X-MSYS-API metadata {ID_METADATA} replaced by the spool id")
    metadata[ID_METADATA] = message.id
    payload: dict[str, Any] = {
        "options": options,
        "recipients": [
            {"address": {"email": rcpt}, **recipient} for rcpt in message.envelope.rcpt_tos
        ],
        "content": {"email_rfc822": text},
        "metadata": metadata,
    }
    if "campaign_id" in controls:
        payload["campaign_id"] = controls["campaign_id"]
    if fields:
        payload["substitution_data"] = dict(SUBSTITUTIONS)
        warnings.append(
            f"braces in header(s) {', '.join(dict.fromkeys(fields))} were sent as"
            " substitution variables so that SparkPost's template engine writes them back"
            " unchanged"
        )
    return payload, warnings


# -- the answer ------------------------------------------------------------------------


def _errors(answer: dict[str, Any] | None, key: str = "errors") -> list[dict[str, Any]]:
    found = answer.get(key) if answer else None
    return [e for e in found if isinstance(e, dict)] if isinstance(found, list) else []


def _said(error: dict[str, Any]) -> str:
    """``code message: description`` of one SparkPost error, on one line."""
    parts = [str(error.get(k, "")).strip() for k in ("code", "message")]
    text = " ".join(p for p in parts if p)
    description = str(error.get("description") or "").strip()
    if description:
        text = f"{text}: {description}" if text else description
    return " ".join(text.split())[:300]


def _count(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def named_recipients(rcpts: tuple[str, ...], errors: list[dict[str, Any]]) -> dict[str, str]:
    """The envelope recipients a recipient error names (address written out in its
    message or description), each with that error's text."""
    named: dict[str, str] = {}
    for error in errors:
        text = " ".join(str(error.get(k, "")) for k in ("message", "description")).lower()
        for rcpt in rcpts:
            pattern = r"(?<![\w.+-])" + re.escape(rcpt.lower()) + r"(?![\w-]|\.\w)"
            if rcpt not in named and re.search(pattern, text):
                named[rcpt] = _said(error)
    return named


# -- the provider ----------------------------------------------------------------------


class SparkPostProvider(HttpProvider):
    kind = "sparkpost"
    #: The raw message goes as it is (but its Bcc header): signatures survive.
    rebuilds_message = False
    #: Not documented for the recipients array: domains go as Punycode, a UTF-8 local
    #: part is refused at RCPT.
    smtputf8 = False
    max_message_size = MAX_MESSAGE_SIZE
    max_recipients = MAX_RECIPIENTS

    def __init__(
        self,
        client: httpx.AsyncClient,
        api_key: SecretStr,
        api_url: str = "https://api.sparkpost.com",
        *,
        sandbox: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(client, name)
        #: SparkPost's sandbox sending domain (shown in the start-up line).
        self.sandbox = sandbox
        self.endpoint = api_url.rstrip("/") + PATH
        self._target = PostTarget(
            self.endpoint,
            {
                "Authorization": api_key.get_secret_value(),
                "Accept": "application/json",
                "Content-Type": "application/json",
            },
        )
        self.rate_limit = RateLimit(SEND_RATE, burst=int(SEND_RATE))

    def refusal(self, message: OutboundMessage) -> str | None:
        """A malformed X-MSYS-API header, or a header SparkPost's template engine would
        rewrite and esprelay cannot protect, refused at the end of DATA."""
        try:
            read_msys_api(message.raw)
        except ControlHeaderError as exc:
            return str(exc)
        try:
            protect_headers(message.raw)
        except TemplateHazard:
            try:  # the rare case: judged on what is sent (no Bcc, no X-MSYS-API)
                protect_headers(_sendable(message.raw))
            except TemplateHazard as exc:
                return str(exc)
        return None

    def build_request(self, message: OutboundMessage) -> Built:
        payload, warnings = build_payload(message, sandbox=self.sandbox, provider=self.name)
        return Built(self._target.request(json_body(payload)), tuple(warnings))

    def parse_response(self, response: httpx.Response, message: OutboundMessage) -> SendResult:
        answer = json_object(response)
        results = answer.get("results") if answer else None
        found = results.get("id") if isinstance(results, dict) else None
        if isinstance(found, int) and not isinstance(found, bool):
            found = str(found)
        if not isinstance(results, dict) or not isinstance(found, str) or not found:
            raise ProviderConfigError(
                f"HTTP {response.status_code} without a transmission id; is"
                " ESPRELAY_SPARKPOST_API_URL SparkPost's API (https://api.sparkpost.com)?"
                f" {excerpt(response, 120)}",
                provider=self.name,
                status_code=response.status_code,
            )
        rejected = _count(results.get("total_rejected_recipients")) or 0
        if rejected <= 0:
            return SendResult(provider_message_id=found)
        accepted = _count(results.get("total_accepted_recipients"))
        rcpts = message.envelope.rcpt_tos
        errors = _errors(results, "rcpt_to_errors")
        said = "; ".join(dict.fromkeys(_said(e) for e in errors)) or "no detail given"
        if accepted == 0 or rejected >= len(rcpts):
            # Nothing was sent: the message failed, for every recipient alike.
            raise MessageRejected(
                f"SparkPost refused every recipient (transmission {found},"
                f" total_rejected_recipients {rejected}): {said}",
                provider=self.name,
                status_code=response.status_code,
            )
        named = named_recipients(rcpts, errors)
        refused = tuple(
            (
                rcpt,
                MessageRejected(
                    f"SparkPost refused this recipient (transmission {found}): {text}",
                    provider=self.name,
                    status_code=response.status_code,
                ),
            )
            for rcpt, text in named.items()
        )
        warnings: tuple[str, ...] = ()
        if len(named) < rejected:
            # SparkPost counts them but does not say which: they can be neither retried
            # nor bounced, only reported.
            unknown = rejected - len(named)
            warnings = (
                f"SparkPost accepted {accepted if accepted is not None else '?'} of"
                f" {len(rcpts)} recipients and refused {rejected}; {unknown} of them it"
                f" does not name, so they get neither the message nor a bounce: {said}",
            )
        return SendResult(provider_message_id=found, warnings=warnings, rejected=refused)

    def classify_error(self, response: httpx.Response) -> DeliveryError:
        status = response.status_code
        errors = _errors(json_object(response))
        codes = {str(e.get("code", "")).strip() for e in errors}
        if errors:
            detail = f"HTTP {status}: " + "; ".join(dict.fromkeys(_said(e) for e in errors))
        else:
            detail = f"HTTP {status}: {excerpt(response)}"
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if status == 420 or codes & QUOTA_CODES:
            # A sending limit: nothing was sent; the spool tries again later.
            return RateLimited(
                f"{detail} (a SparkPost sending limit)",
                provider=self.name,
                status_code=status,
                retry_after=retry_after,
            )
        if status == 429:
            hold = retry_after if retry_after is not None else WAIT_AFTER_429
            if self.rate_limit is not None:
                # Every request of this provider waits, not only this message's retry.
                self.rate_limit.hold_until(min(hold, MAX_HOLD))
            return RateLimited(detail, provider=self.name, status_code=status, retry_after=hold)
        if status in (401, 403) or codes & CONFIG_CODES:
            return ProviderConfigError(
                f"{detail} (check ESPRELAY_SPARKPOST_API_KEY, its permissions"
                " (Transmissions: Read/Write) and the sending domain)",
                provider=self.name,
                status_code=status,
            )
        if status in (404, 405):
            return ProviderConfigError(
                f"{detail} (check ESPRELAY_SPARKPOST_API_URL: scheme and host only)",
                provider=self.name,
                status_code=status,
            )
        if status == 400 and json_object(response) is None:
            # SparkPost's own refusals are JSON; an HTML 400 is the front proxy's
            # (php-sparkpost issue 140: "400 Bad Request ... openresty" for a few of
            # thousands of identical requests): not the message's fault, retried.
            return ProviderUnavailable(
                f"{detail} (not SparkPost's JSON answer: retried)",
                provider=self.name,
                status_code=status,
                retry_after=retry_after,
            )
        if status in (400, 409):
            return MessageRejected(detail, provider=self.name, status_code=status)
        error = classify_status(response, provider=self.name)
        if errors:  # SparkPost's own words rather than the raw body
            return type(error)(
                detail, provider=self.name, status_code=status, retry_after=error.retry_after
            )
        return error


class SparkPostSettings(ProviderSettings):
    """``ESPRELAY_SPARKPOST_*``: an API key with Transmissions: Read/Write, the API's
    scheme and host (``https://api.eu.sparkpost.com`` for SparkPost EU), and
    ``sandbox`` for SparkPost's sandbox sending domain."""

    api_key: SecretStr
    api_url: str = "https://api.sparkpost.com"
    sandbox: bool = False

    @field_validator("api_url")
    @classmethod
    def _scheme_and_host(cls, value: str) -> str:
        try:
            url = httpx.URL(value)
        except httpx.InvalidURL:
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise ValueError("not an http:// or https:// URL with a host")
        if url.path not in ("", "/") or url.query:
            raise ValueError(
                "scheme and host only (https://api.sparkpost.com, or"
                " https://api.eu.sparkpost.com for SparkPost EU); esprelay adds"
                " /api/v1/transmissions"
            )
        return value

    def api_urls(self) -> tuple[str, ...]:
        return (self.api_url,)


def build(settings: SparkPostSettings, client: httpx.AsyncClient) -> SparkPostProvider:
    return SparkPostProvider(client, settings.api_key, settings.api_url, sandbox=settings.sandbox)


KIND = ProviderKind(
    "sparkpost", SparkPostSettings, build, "SparkPost /api/v1/transmissions (raw MIME)"
)
