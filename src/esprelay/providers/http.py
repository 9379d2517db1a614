"""Generic HTTP: POST each message as signed JSON to a URL of your own service.

For teams whose "ESP" is their own service.  The request is ``POST`` to
``ESPRELAY_HTTP_API_URL`` (the full URL) with a JSON body that the schema beside this
module describes (``http.schema.json``)::

    {"type": "esprelay.message", "id": "<spool id>",
     "envelope": {"mail_from": "...", "rcpt_to": ["...", ...]},
     "raw": "<the message as received, Bcc header removed, base64>",
     "parsed": {...}}            # only with ESPRELAY_HTTP_API_PARSED=true

signed the Standard Webhooks way (https://www.standardwebhooks.com, spec/
standard-webhooks.md, "Signature scheme" and "Webhook headers"): ``webhook-id`` is the
spool id (the same on every retry: the receiver's idempotency key), ``webhook-timestamp``
the Unix time of the attempt, ``webhook-signature`` is ``v1,`` and the base64
HMAC-SHA256 of ``{id}.{timestamp}.{body}`` under the secret of
``ESPRELAY_HTTP_API_SECRET`` (``whsec_`` and the base64 of 24 to 64 random bytes, the
spec's "at least 24 bytes (192 bits, 512 maximum)").  The signature is made just before
each attempt (:meth:`HttpApiProvider.authorize`), so a retry carries a fresh timestamp
that a verifier's replay window (5 minutes in the reference libraries) accepts.

Answers, after the spec's "Delivery success and failure": 2xx delivered (the ``id``
of a JSON answer is stored as the provider's id); 408, 429, 5xx and timeouts retried,
Retry-After honoured; 3xx (redirects are never followed), 401, 403, 404 and 405 are
configuration problems, retried slowly; every other 4xx fails the message (a bounce).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from typing import Annotated, Any

import httpx
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
)

from esprelay.clock import SYSTEM_CLOCK, Clock
from esprelay.errors import DeliveryError, ProviderConfigError
from esprelay.message.mime import Attachment, Mailbox, ParsedMessage, full_content_type, parse
from esprelay.message.rawmime import strip_bcc
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
)

#: The payload's ``type`` (Standard Webhooks, "Payload structure": a full-stop
#: delimited event type that names the payload's schema).
PAYLOAD_TYPE = "esprelay.message"
SECRET_PREFIX = "whsec_"
#: Signing secret size, in bytes: "Random. At least 24 bytes (192 bits, 512 maximum)".
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64
#: The headers of the signature scheme ("Webhook headers").
ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
#: Headers esprelay writes itself, which ESPRELAY_HTTP_API_HEADERS may not set.
RESERVED_HEADERS = frozenset(
    {
        ID_HEADER,
        TIMESTAMP_HEADER,
        SIGNATURE_HEADER,
        "host",
        "content-type",
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "connection",
    }
)
#: An answer's id is stored and logged: printable ASCII, bounded.
MAX_ANSWER_ID = 255
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 field-name (token)
_FIELD_VALUE = re.compile(r"[\x20-\x7e\t]*")  # visible ASCII, space and tab
_PRINTABLE_ID = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")


def secret_key(value: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret (``whsec_`` + base64); ValueError
    when it is not one, with a reason that never shows the value."""
    if not value.startswith(SECRET_PREFIX):
        raise ValueError(
            "not a Standard Webhooks secret: it must start with whsec_ (whsec_ and the"
            f" base64 of {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} random bytes)"
        )
    text = value.removeprefix(SECRET_PREFIX)
    try:
        # The reference libraries accept the base64 without its padding: so does this.
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        raise ValueError(
            "not a Standard Webhooks secret: what follows whsec_ is not base64"
        ) from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise ValueError(
            f"not a Standard Webhooks secret: {len(key)} bytes, not {MIN_SECRET_BYTES} to"
            f" {MAX_SECRET_BYTES}"
        )
    return key


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` and the base64 HMAC-SHA256 of
    ``{id}.{timestamp}.{body}`` (Standard Webhooks, "Signature scheme")."""
    digest = hmac.new(key, b"%s.%d.%s" % (message_id.encode(), timestamp, body), hashlib.sha256)
    return "v1," + base64.b64encode(digest.digest()).decode("ascii")


def _check_secret(value: SecretStr) -> SecretStr:
    secret_key(value.get_secret_value())
    return value


def _check_url(value: str) -> str:
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise ValueError("not an http:// or https:// URL with a host")
    return value


def _check_token(value: SecretStr | None) -> SecretStr | None:
    if value is not None and not re.fullmatch(r"[\x21-\x7e]+", value.get_secret_value()):
        raise ValueError("a bearer token is printable ASCII without spaces, CR or LF")
    return value


def _header_object(value: Any) -> Any:
    """ESPRELAY_HTTP_API_HEADERS is a JSON object; a routes file may give a TOML table."""
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            value = json.loads(value, object_pairs_hook=_no_repeats)
        except ValueError as exc:
            raise ValueError(
                'not a JSON object of header names and values ({"X-Name": "value"}):'
                f" {_json_error(exc)}"
            ) from None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError('a JSON object of header names and string values ({"X-Name": "value"})')
    return value


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name.lower() for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"header {repeated[0]!r} given twice")
    return dict(pairs)


def _json_error(exc: ValueError) -> str:
    # json's message names a position, never the text; our own names a header.
    return exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)


def _check_headers(value: dict[str, SecretStr]) -> dict[str, SecretStr]:
    seen: set[str] = set()
    for name, secret in value.items():
        lower = name.lower()
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"{ascii(name)[:60]} is not a header name")
        if lower in seen:
            raise ValueError(f"header {name!r} given twice")
        seen.add(lower)
        if lower in RESERVED_HEADERS:
            raise ValueError(f"{name} is written by esprelay and cannot be set")
        text = secret.get_secret_value()
        if "\r" in text or "\n" in text or "\x00" in text:
            raise ValueError(f"the value of {name} contains CR, LF or NUL")
        if not _FIELD_VALUE.fullmatch(text):
            raise ValueError(f"the value of {name} is not printable ASCII")
    return value


HeaderValues = Annotated[
    dict[str, SecretStr], BeforeValidator(_header_object), AfterValidator(_check_headers)
]


class HttpApiSettings(ProviderSettings):
    """``ESPRELAY_HTTP_API_*``: where to POST, the signing secret, optional bearer token
    and headers.  Every field starts with ``api_``: ``ESPRELAY_HTTP_HOST``, ``_PORT``,
    ``_ENABLED`` and ``_TRANSPORT`` are the relay's own settings (the ops endpoint)."""

    #: The full URL to POST to (scheme, host, path, query).
    api_url: Annotated[str, AfterValidator(_check_url)]
    #: The Standard Webhooks secret: ``whsec_`` + base64.
    api_secret: Annotated[SecretStr, AfterValidator(_check_secret)]
    #: Sent as ``Authorization: Bearer <token>``.
    api_token: Annotated[SecretStr | None, AfterValidator(_check_token)] = None
    #: Extra headers: a JSON object ``{"Name": "value"}`` (values kept secret).
    api_headers: HeaderValues = Field(default_factory=dict)
    #: Add the parsed parts (``parsed``) to the payload.
    api_parsed: bool = False

    @field_validator("api_headers")
    @classmethod
    def _one_authorization(
        cls, value: dict[str, SecretStr], info: ValidationInfo
    ) -> dict[str, SecretStr]:
        if info.data.get("api_token") is not None and any(
            name.lower() == "authorization" for name in value
        ):
            raise ValueError("sets Authorization and so does ESPRELAY_HTTP_API_TOKEN: use one")
        return value

    def api_urls(self) -> tuple[str, ...]:
        return (self.api_url,)


class HttpApiProvider(HttpProvider):
    kind = "http"
    #: Your service gets the envelope as it was given (JSON is UTF-8).
    smtputf8 = True

    def __init__(
        self,
        client: httpx.AsyncClient,
        settings: HttpApiSettings,
        *,
        clock: Clock = SYSTEM_CLOCK,
        name: str | None = None,
    ) -> None:
        super().__init__(client, name)
        self.endpoint = settings.api_url
        self.parsed = settings.api_parsed
        self._key = secret_key(settings.api_secret.get_secret_value())
        self._time = clock.time
        headers = {name: value.get_secret_value() for name, value in settings.api_headers.items()}
        if settings.api_token is not None:
            headers["Authorization"] = f"Bearer {settings.api_token.get_secret_value()}"
        headers["Content-Type"] = "application/json"
        if not any(name.lower() == "accept" for name in headers):
            headers["Accept"] = "application/json"
        self._target = PostTarget(self.endpoint, headers)

    def build_request(self, message: OutboundMessage) -> Built:
        stripped = strip_bcc(message.raw)
        payload: dict[str, Any] = {
            "type": PAYLOAD_TYPE,
            "id": message.id,
            "envelope": {
                "mail_from": message.envelope.mail_from,
                "rcpt_to": list(message.envelope.rcpt_tos),
            },
            "raw": base64.b64encode(stripped.raw).decode("ascii"),
        }
        if self.parsed:
            payload["parsed"] = parsed_view(parse(message.raw, message.envelope))
        request = self._target.request(json_body(payload))
        request.headers[ID_HEADER] = message.id
        return Built(request, stripped.warnings)

    async def authorize(self, request: httpx.Request) -> None:
        """Sign at send time: every attempt carries its own timestamp."""
        timestamp = int(self._time())
        request.headers[TIMESTAMP_HEADER] = str(timestamp)
        request.headers[SIGNATURE_HEADER] = sign(
            self._key, request.headers[ID_HEADER], timestamp, request.content
        )

    def parse_response(self, response: httpx.Response, message: OutboundMessage) -> SendResult:
        try:
            answer = response.json() if response.content else None
        except (ValueError, UnicodeDecodeError):
            answer = None
        found = answer.get("id") if isinstance(answer, dict) else None
        if isinstance(found, int) and not isinstance(found, bool):
            found = str(found)
        if not isinstance(found, str):
            return SendResult(provider_message_id=None)
        if len(found) > MAX_ANSWER_ID or not _PRINTABLE_ID.fullmatch(found):
            return SendResult(
                provider_message_id=None,
                warnings=(
                    f"the answer's id is not kept: not 1 to {MAX_ANSWER_ID} printable ASCII"
                    " characters",
                ),
            )
        return SendResult(provider_message_id=found)

    def classify_error(self, response: httpx.Response) -> DeliveryError:
        status = response.status_code
        if 300 <= status < 400 or status in (401, 403, 404, 405):
            where = response.headers.get("location")
            hint = (
                f"redirected to {where[:200]!r} (redirects are not followed): set"
                " ESPRELAY_HTTP_API_URL to the final URL"
                if where and status < 400
                else "check ESPRELAY_HTTP_API_URL, the secret, the token and the headers"
            )
            return ProviderConfigError(
                f"HTTP {status}: {excerpt(response)}; {hint}",
                provider=self.name,
                status_code=status,
            )
        return classify_status(response, provider=self.name)


def parsed_view(parsed: ParsedMessage) -> dict[str, Any]:
    """The ``parsed`` member of the payload: the fields a JSON ESP would get.

    ``to`` and ``cc`` are the header addresses that are envelope recipients (the
    envelope decides who receives); the Bcc header is never shown.
    """
    return {
        "subject": parsed.subject,
        "from": _mailbox(parsed.from_) if parsed.from_ is not None else None,
        "reply_to": [_mailbox(box) for box in parsed.reply_to],
        "to": [_mailbox(box) for box in parsed.recipients.to],
        "cc": [_mailbox(box) for box in parsed.recipients.cc],
        "text": parsed.text,
        "html": parsed.html,
        "headers": [{"name": name, "value": value} for name, value in parsed.headers],
        "attachments": [_attachment(item) for item in parsed.attachments],
        "warnings": list(parsed.warnings),
    }


def _mailbox(box: Mailbox) -> dict[str, str]:
    return {"name": box.name, "address": box.addr}


def _attachment(item: Attachment) -> dict[str, Any]:
    return {
        "filename": item.filename,
        "content_type": full_content_type(item),
        "content_id": item.content_id,
        "inline": item.inline,
        "content": base64.b64encode(item.content).decode("ascii"),
    }


def build(settings: HttpApiSettings, client: httpx.AsyncClient) -> HttpApiProvider:
    return HttpApiProvider(client, settings)


KIND = ProviderKind(
    "http", HttpApiSettings, build, "your own service: signed JSON POST (Standard Webhooks)"
)
