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
"""

from __future__ import annotations

import base64
import re
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from esprelay.errors import DeliveryError, ProviderConfigError, RateLimited
from esprelay.message.rawmime import strip_bcc
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

    def build_request(self, message: OutboundMessage) -> Built:
        stripped = strip_bcc(message.raw)
        credentials = f"api:{self._api_key.get_secret_value()}".encode()
        request = httpx.Request(
            "POST",
            self.endpoint,
            headers={
                "Authorization": f"Basic {base64.b64encode(credentials).decode('ascii')}",
                "Accept": "application/json",
            },
            data={"to": list(message.envelope.rcpt_tos)},
            files={"message": ("message.mime", stripped.raw, "message/rfc822")},
        )
        return Built(request, stripped.warnings)

    def parse_response(self, response: httpx.Response, message: OutboundMessage) -> SendResult:
        body = _json(response)
        message_id = body.get("id") if isinstance(body, dict) else None
        if not isinstance(message_id, str) or not message_id:
            raise ProviderConfigError(
                f"HTTP {response.status_code} without a message id; is ESPRELAY_MAILGUN_API_URL"
                f" the API (https://api.mailgun.net or https://api.eu.mailgun.net)?"
                f" {excerpt(response, 120)}",
                provider=self.name,
                status_code=response.status_code,
            )
        return SendResult(provider_message_id=message_id)

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


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


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
