"""Amazon SES (API v2): ``SendEmail`` with the raw message, over plain httpx.

``POST {endpoint}/v2/email/outbound-emails`` with a JSON body::

    {"FromEmailAddress": envelope sender (omitted for the null sender),
     "Destination": {"ToAddresses": [every envelope recipient]},
     "Content": {"Raw": {"Data": base64 of the message}},
     "ConfigurationSetName": X-SES-CONFIGURATION-SET, else ESPRELAY_SES_CONFIGURATION_SET,
     "EmailTags": [{"Name", "Value"} of X-SES-MESSAGE-TAGS, then esprelay_id: the
                   spool id, which SES echoes in its events (see :func:`stamp`)]}

The message is sent as received except that its Bcc header is removed, the two SES
control headers translated above are removed (as SES's SMTP interface removes them:
see :func:`read_controls`), and 8-bit content is re-encoded (SES does not keep 8bit):
see :mod:`esprelay.message.rawmime`.

botocore supplies what we do not want to write again: the AWS credential chain
(environment incl. AWS_SESSION_TOKEN, shared config/profile, web identity, container
and instance metadata, refreshed before expiry) and SigV4 signing.  Credentials are
resolved in a worker thread, since the chain may block on files or the network.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, ReadOnlyCredentials
from botocore.exceptions import BotoCoreError
from botocore.session import get_session

from esprelay.errors import (
    DeliveryError,
    MessageRejected,
    ProviderConfigError,
    ProviderUnavailable,
    RateLimited,
)
from esprelay.message.header import Field, may_have, raw_value, read_header, unfolded
from esprelay.message.rawmime import remove_fields, strip_bcc, to_7bit
from esprelay.models import OutboundMessage, SendResult
from esprelay.providers.base import (
    Built,
    HttpProvider,
    ProviderKind,
    ProviderSettings,
    classify_status,
    excerpt,
    json_object,
    parse_retry_after,
)
from esprelay.providers.stamp import ID_KEY, dropped_warning, left_out_warning

#: SES counts the message after base64: 40 MB.
MAX_ENCODED_SIZE = 40 * 1024 * 1024
#: So the raw message may be 3/4 of that (re-encoding 8bit may inflate it further;
#: that is checked again when the request is built).
MAX_MESSAGE_SIZE = MAX_ENCODED_SIZE // 4 * 3
#: Recipients per SendEmail call.
MAX_RECIPIENTS = 50

THROTTLING = frozenset(
    {"TooManyRequestsException", "Throttling", "ThrottlingException", "LimitExceededException"}
)
CONFIGURATION = frozenset(
    {
        "MailFromDomainNotVerifiedException",
        "AccountSuspendedException",
        "SendingPausedException",
        "AccountSendingPausedException",
        "ConfigurationSetSendingPausedException",
        "ConfigurationSetDoesNotExistException",
        "NotFoundException",
        "AccessDeniedException",
        "AccessDenied",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "IncompleteSignatureException",
        "MissingAuthenticationToken",
        "MissingAuthenticationTokenException",
        "ExpiredToken",
        "ExpiredTokenException",
    }
)
PERMANENT = frozenset(
    {
        "MessageRejected",
        "BadRequestException",
        "InvalidParameterValue",
        "ValidationException",
        "SerializationException",
    }
)
# MessageRejected that really means "the sender (or, in the sandbox, the recipient)
# is not a verified identity": an operator problem, retried slowly.
_UNVERIFIED = re.compile(r"not verified|did not have authority|not authorized", re.IGNORECASE)
_XML_CODE = re.compile(r"<Code>\s*([^<\s]+)\s*</Code>")
_XML_MESSAGE = re.compile(r"<Message>\s*([^<]*?)\s*</Message>", re.DOTALL)

CredentialsLoader = Callable[[], Credentials | None]

# -- SES's control headers --------------------------------------------------------------
#
# Applications that used SES's SMTP interface steer it with header fields of the message
# (the SMTP interface has no other channel):
#
# - X-SES-CONFIGURATION-SET and X-SES-MESSAGE-TAGS ("tagName1=tagValue1, tagName2=
#   tagValue2"). "When you use SendRawEmail or the SMTP interface, you can specify the
#   configuration set and the message tags by adding Amazon SES-specific headers to the
#   email. Amazon SES removes the headers before sending the email."
#   (https://docs.aws.amazon.com/ses/latest/dg/event-publishing-send-email.html)
#   esprelay turns them into SendEmail's own ConfigurationSetName and EmailTags and removes
#   them from the raw message, as the SMTP interface would have, so that recipients never
#   see them whatever SES v2 does with them inside raw content (the v2 API reference does
#   not say; the same guide says header tags are ignored once tags are given as API
#   parameters). The header's configuration set wins over ESPRELAY_SES_CONFIGURATION_SET
#   for its message, as the one chosen by the application. Both are checked at the end
#   of DATA against SES's documented rules, so a mistake is a 550 there and not a bounce
#   later.
# - X-SES-SOURCE-ARN, X-SES-FROM-ARN, X-SES-RETURN-PATH-ARN (sending authorization).
#   "Amazon SES removes all X-headers from the email before sending it. If you include
#   multiple instances of an X-header, Amazon SES uses only the first instance."
#   (https://docs.aws.amazon.com/ses/latest/dg/sending-authorization-delegate-sender-tasks-email.html)
#   SendEmail v2 reads the first two from raw content itself: "For Raw emails, the
#   FromEmailAddressIdentityArn value overrides the X-SES-SOURCE-ARN and X-SES-FROM-ARN
#   headers specified in raw email message content"
#   (https://docs.aws.amazon.com/ses/latest/APIReference-V2/API_SendEmail.html). v2 has
#   one field for what those two headers tell apart, and its
#   FeedbackForwardingEmailAddressIdentityArn goes with a FeedbackForwardingEmailAddress
#   that esprelay does not set, so translating would lose or invent an authorization:
#   these stay in the message, for SES to apply and remove. They are only checked.
#
# A header SES reads only once: like SES, the first field of a name counts; the others
# are removed with it (a warning says so). A message with no X-SES-* field, nearly
# every message, is told apart with one scan of its header bytes (see message.header.may_have).

CONFIGURATION_SET_HEADER = b"x-ses-configuration-set"
MESSAGE_TAGS_HEADER = b"x-ses-message-tags"
ARN_HEADERS = (b"x-ses-source-arn", b"x-ses-from-arn", b"x-ses-return-path-arn")
#: The control headers translated into SendEmail fields, removed from the raw message.
TRANSLATED_HEADERS = frozenset({CONFIGURATION_SET_HEADER, MESSAGE_TAGS_HEADER})
_DISPLAY_NAMES = {
    CONFIGURATION_SET_HEADER: "X-SES-CONFIGURATION-SET",
    MESSAGE_TAGS_HEADER: "X-SES-MESSAGE-TAGS",
    b"x-ses-source-arn": "X-SES-SOURCE-ARN",
    b"x-ses-from-arn": "X-SES-FROM-ARN",
    b"x-ses-return-path-arn": "X-SES-RETURN-PATH-ARN",
}
#: "Configuration set names can contain up to 64 alphanumeric characters. They can also
#: contain hyphens (-) and underscores (_)." (https://docs.aws.amazon.com/ses/latest/dg/quotas.html)
_CONFIGURATION_SET_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: MessageTag Name and Value: "It can only contain ASCII letters (a-z, A-Z), numbers
#: (0-9), underscores (_), or dashes (-). It can contain no more than 256 characters."
#: (https://docs.aws.amazon.com/ses/latest/APIReference-V2/API_MessageTag.html). An
#: empty name or value is refused too: the header's form is name=value. SES documents no
#: limit on the number of tags of a message (nor does its API model), so none is set here.
_TAG_TEXT = re.compile(r"[A-Za-z0-9_-]{1,256}")
#: An SES identity ARN, as the sending authorization guide writes them
#: (arn:aws:ses:us-east-1:123456789012:identity/example.com; the region may be "*" for
#: global endpoints).
_IDENTITY_ARN = re.compile(r"arn:[a-z0-9-]+:ses:(?:[a-z0-9-]+|\*):[0-9]{12}:identity/[!-~]+")


class ControlHeaderError(ValueError):
    """An SES control header that SES would not accept; the text says why."""


@dataclass(frozen=True, slots=True)
class Controls:
    """What a message's SES control headers ask for."""

    configuration_set: str | None = None
    tags: tuple[tuple[str, str], ...] = ()
    #: Whether a translated header is present, to be removed from the raw message.
    translated: bool = False
    warnings: tuple[str, ...] = ()


def read_controls(raw: bytes) -> Controls | None:
    """The SES control headers of ``raw``'s top-level header, checked; None without any.

    Raises :class:`ControlHeaderError` for one that SES would refuse (see the notes above).
    """
    if not may_have(raw, b"x-ses-"):
        return None
    # Read as rawmime.remove_fields reads them (the obsolete "Name :" form included), so
    # what is translated is exactly what is removed.
    header = read_header(raw, obsolete=True)
    first: dict[bytes, Field] = {}
    counts: dict[bytes, int] = {}
    for item in header.fields:
        if item.name in _DISPLAY_NAMES:
            first.setdefault(item.name, item)
            counts[item.name] = counts.get(item.name, 0) + 1
    if not first:
        return None
    warnings = tuple(
        f"{_DISPLAY_NAMES[name]} given {count} times: the first is used, as SES does"
        for name, count in counts.items()
        if count > 1
    )
    values = {name: unfolded(raw_value(raw, item)) for name, item in first.items()}
    configuration_set = None
    if CONFIGURATION_SET_HEADER in values:
        configuration_set = values[CONFIGURATION_SET_HEADER]
        if not configuration_set:
            raise ControlHeaderError("X-SES-CONFIGURATION-SET is empty")
        if not _CONFIGURATION_SET_NAME.fullmatch(configuration_set):
            raise ControlHeaderError(
                f"X-SES-CONFIGURATION-SET {_show(configuration_set)} is not a configuration"
                " set name (1 to 64 ASCII letters, digits, '-' and '_')"
            )
    tags: tuple[tuple[str, str], ...] = ()
    if MESSAGE_TAGS_HEADER in values:
        tags = _parse_tags(values[MESSAGE_TAGS_HEADER])
    for name in ARN_HEADERS:
        if name in values and not _IDENTITY_ARN.fullmatch(values[name]):
            raise ControlHeaderError(
                f"{_DISPLAY_NAMES[name]} {_show(values[name])} is not an SES identity ARN"
                " (arn:aws:ses:REGION:ACCOUNT:identity/NAME)"
            )
    translated = not TRANSLATED_HEADERS.isdisjoint(first)
    return Controls(configuration_set, tags, translated, warnings)


def _parse_tags(value: str) -> tuple[tuple[str, str], ...]:
    """``name1=value1, name2=value2`` (the SMTP interface's form) as (name, value) pairs."""
    tags: list[tuple[str, str]] = []
    seen: set[str] = set()
    for item in value.split(","):
        name, equals, text = (part.strip(" \t") for part in item.partition("="))
        if not equals or not name:
            raise ControlHeaderError(
                f"X-SES-MESSAGE-TAGS: {_show(item.strip())} is not name=value"
                " (the form is: name1=value1, name2=value2)"
            )
        for what, checked in (("name", name), ("value", text)):
            if not _TAG_TEXT.fullmatch(checked):
                raise ControlHeaderError(
                    f"X-SES-MESSAGE-TAGS: tag {what} {_show(checked)} is not 1 to 256 ASCII"
                    " letters, digits, '-' and '_'"
                )
        if name in seen:
            raise ControlHeaderError(f"X-SES-MESSAGE-TAGS: tag {_show(name)} is given twice")
        seen.add(name)
        tags.append((name, text))
    return tuple(tags)


def stamp(
    tags: tuple[tuple[str, str], ...], esprelay_id: str
) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """``tags`` with esprelay's id as the message tag ``esprelay_id``
    (:mod:`esprelay.providers.stamp`), and the warnings.

    SendEmail takes ``EmailTags`` whatever the content (Raw included), and SES puts them
    in the ``mail.tags`` of the events a configuration set publishes.  Notifications
    sent without a configuration set (an identity's bounce and complaint topics) carry
    no tags: they name the message by ``mail.messageId``, the id the send answered.  An
    ``X-SES-MESSAGE-TAGS`` tag of that name is dropped; an id that is no tag value (only
    ASCII letters, digits, ``-`` and ``_``, at most 256) is left out.
    """
    kept = tuple(tag for tag in tags if tag[0] != ID_KEY)
    warnings = () if len(kept) == len(tags) else (dropped_warning("X-SES-MESSAGE-TAGS"),)
    if not _TAG_TEXT.fullmatch(esprelay_id):
        return kept, (*warnings, left_out_warning("not an SES tag value"))
    return (*kept, (ID_KEY, esprelay_id)), warnings


def _show(value: str, limit: int = 60) -> str:
    """A header value quoted for a reply or a log line: ASCII, one line, bounded."""
    shown = ascii(value)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def default_endpoint(region: str) -> str:
    return f"https://email.{region}.amazonaws.com"


class SesProvider(HttpProvider):
    kind = "ses"
    smtputf8 = False  # SES API reference, Destination: no SMTPUTF8, 7-bit ASCII, Punycode
    max_message_size = MAX_MESSAGE_SIZE
    max_recipients = MAX_RECIPIENTS

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        region: str,
        endpoint_url: str | None = None,
        configuration_set: str | None = None,
        credentials: CredentialsLoader | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(client, name)
        self.region = region
        base = (endpoint_url or default_endpoint(region)).rstrip("/")
        self.endpoint = f"{base}/v2/email/outbound-emails"
        self.configuration_set = configuration_set or None
        self._load_credentials = credentials or _credential_chain
        self._credentials: Credentials | None = None
        self._lock = threading.Lock()

    # -- the request, pure ----------------------------------------------------------

    def refusal(self, message: OutboundMessage) -> str | None:
        """A malformed SES control header (X-SES-*), refused at the end of DATA."""
        try:
            read_controls(message.raw)
        except ControlHeaderError as exc:
            return str(exc)
        return None

    def controls(self, message: OutboundMessage) -> Controls | None:
        """The message's SES control headers; MessageRejected for a malformed one (a
        message spooled before the check at the end of DATA existed)."""
        try:
            return read_controls(message.raw)
        except ControlHeaderError as exc:
            raise MessageRejected(str(exc), provider=self.name) from None

    def prepare(
        self, message: OutboundMessage, controls: Controls | None = None
    ) -> tuple[bytes, tuple[str, ...]]:
        """The raw bytes SES gets (no Bcc header, no translated control header, 7bit) and
        what was changed."""
        stripped = strip_bcc(message.raw)
        raw, warnings = stripped.raw, stripped.warnings
        if controls is not None:
            if controls.translated:
                raw, _ = remove_fields(raw, TRANSLATED_HEADERS.__contains__)
            warnings += controls.warnings
        encoded = to_7bit(raw)
        return encoded.raw, warnings + encoded.warnings

    def build_request(self, message: OutboundMessage) -> Built:
        controls = self.controls(message)
        raw, warnings = self.prepare(message, controls)
        data = base64.b64encode(raw)
        if len(data) > MAX_ENCODED_SIZE:
            raise MessageRejected(
                f"message is {len(data)} bytes after base64, over SES's limit of"
                f" {MAX_ENCODED_SIZE}",
                provider=self.name,
            )
        payload: dict[str, Any] = {}
        if message.envelope.mail_from:
            payload["FromEmailAddress"] = message.envelope.mail_from
        payload["Destination"] = {"ToAddresses": list(message.envelope.rcpt_tos)}
        payload["Content"] = {"Raw": {"Data": data.decode("ascii")}}
        configuration_set = self.configuration_set
        tags: tuple[tuple[str, str], ...] = ()
        if controls is not None:
            configuration_set = controls.configuration_set or configuration_set
            tags = controls.tags
        if message.id:
            tags, stamped = stamp(tags, message.id)
            warnings += stamped
        if tags:
            payload["EmailTags"] = [{"Name": n, "Value": v} for n, v in tags]
        if configuration_set:
            payload["ConfigurationSetName"] = configuration_set
        request = httpx.Request(
            "POST",
            self.endpoint,
            content=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        return Built(request, warnings)

    # -- sending --------------------------------------------------------------------

    async def authorize(self, request: httpx.Request) -> None:
        """Sign with SigV4 (botocore may refresh the credentials: off the event loop)."""
        credentials = await asyncio.to_thread(self._frozen_credentials)
        sign(request, credentials, self.region)

    def _frozen_credentials(self) -> ReadOnlyCredentials:
        """Current credentials, refreshed by botocore when they near expiry (blocking)."""
        try:
            with self._lock:
                if self._credentials is None:
                    self._credentials = self._load_credentials()
                credentials = self._credentials
            if credentials is None:
                raise ProviderConfigError(
                    "no AWS credentials found: set AWS_ACCESS_KEY_ID and"
                    " AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with an IAM role",
                    provider=self.name,
                )
            return credentials.get_frozen_credentials()
        except BotoCoreError as exc:
            raise ProviderConfigError(
                f"cannot get AWS credentials: {type(exc).__name__}: {exc}", provider=self.name
            ) from None

    def parse_response(self, response: httpx.Response, message: OutboundMessage) -> SendResult:
        body = json_object(response)
        message_id = body.get("MessageId") if isinstance(body, dict) else None
        if not isinstance(message_id, str) or not message_id:
            raise ProviderConfigError(
                f"HTTP {response.status_code} without a MessageId; is ESPRELAY_SES_ENDPOINT_URL"
                f" an SES API endpoint? {excerpt(response, 120)}",
                provider=self.name,
                status_code=response.status_code,
            )
        return SendResult(provider_message_id=message_id)

    def classify_error(self, response: httpx.Response) -> DeliveryError:
        status = response.status_code
        code, text = error_details(response)
        detail = f"HTTP {status} {code or 'error'}: {text}"
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        common: dict[str, Any] = {"provider": self.name, "status_code": status}
        if status == 429 or code in THROTTLING:
            return RateLimited(detail, retry_after=retry_after, **common)
        if (
            code in CONFIGURATION
            or status in (401, 403, 404)
            or (code == "MessageRejected" and _UNVERIFIED.search(text))
        ):
            return ProviderConfigError(detail, **common)
        if code in PERMANENT:
            return MessageRejected(detail, **common)
        if status >= 500:
            return ProviderUnavailable(detail, retry_after=retry_after, **common)
        return classify_status(response, provider=self.name)


def sign(request: httpx.Request, credentials: ReadOnlyCredentials, region: str) -> None:
    """Add SigV4 headers (service ``ses``) to ``request``, computed by botocore."""
    aws = AWSRequest(
        method=request.method,
        url=str(request.url),
        data=request.content,
        headers={"Content-Type": request.headers["content-type"]},
    )
    SigV4Auth(credentials, "ses", region).add_auth(aws)
    for name in ("Authorization", "X-Amz-Date", "X-Amz-Security-Token"):
        value = aws.headers.get(name)
        if value is not None:
            request.headers[name] = value


def error_details(response: httpx.Response) -> tuple[str, str]:
    """SES's error code and message, from the header, a JSON body or an XML body."""
    code = response.headers.get("x-amzn-errortype", "").split(":", 1)[0].strip()
    message = ""
    body = json_object(response)
    if isinstance(body, dict):
        found = body.get("__type") or body.get("code") or body.get("Code") or ""
        code = code or str(found).rsplit("#", 1)[-1]
        message = str(body.get("message") or body.get("Message") or "")
    else:
        text = response.text if response.content else ""
        match = _XML_CODE.search(text)
        if match and not code:
            code = match.group(1)
        match_message = _XML_MESSAGE.search(text)
        if match_message:
            message = match_message.group(1)
    return code, " ".join(message.split())[:300] or excerpt(response)


def _credential_chain() -> Credentials | None:
    return get_session().get_credentials()


class SesSettings(ProviderSettings):
    """``ESPRELAY_SES_*``: the region (credentials come from the standard AWS chain)."""

    region: str
    endpoint_url: str | None = None
    configuration_set: str | None = None

    def api_urls(self) -> tuple[str, ...]:
        return (self.endpoint_url or default_endpoint(self.region),)


def build(settings: SesSettings, client: httpx.AsyncClient) -> SesProvider:
    return SesProvider(
        client,
        region=settings.region,
        endpoint_url=settings.endpoint_url,
        configuration_set=settings.configuration_set,
    )


KIND = ProviderKind("ses", SesSettings, build, "Amazon SES v2 SendEmail (raw MIME)")
