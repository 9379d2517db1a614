"""Amazon SES (API v2): ``SendEmail`` with the raw message, over plain httpx.

``POST {endpoint}/v2/email/outbound-emails`` with a JSON body::

    {"FromEmailAddress": envelope sender (omitted for the null sender),
     "Destination": {"ToAddresses": [every envelope recipient]},
     "Content": {"Raw": {"Data": base64 of the message}},
     "ConfigurationSetName": ESPRELAY_SES_CONFIGURATION_SET (when set)}

The message is sent as received except that its Bcc header is removed and 8-bit
content is re-encoded (SES does not keep 8bit): see :mod:`esprelay.message.rawmime`.

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
from esprelay.message.rawmime import strip_bcc, to_7bit
from esprelay.models import OutboundMessage, SendResult
from esprelay.providers.base import (
    Built,
    HttpProvider,
    ProviderKind,
    ProviderSettings,
    classify_status,
    excerpt,
    parse_retry_after,
)

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

    def prepare(self, message: OutboundMessage) -> tuple[bytes, tuple[str, ...]]:
        """The raw bytes SES gets (no Bcc header, 7bit) and what was changed."""
        stripped = strip_bcc(message.raw)
        encoded = to_7bit(stripped.raw)
        return encoded.raw, stripped.warnings + encoded.warnings

    def build_request(self, message: OutboundMessage) -> Built:
        raw, warnings = self.prepare(message)
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
        if self.configuration_set:
            payload["ConfigurationSetName"] = self.configuration_set
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
        body = _json(response)
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
    body = _json(response)
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


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


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
