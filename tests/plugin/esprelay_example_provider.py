"""An example third-party provider for esprelay, written as the README describes.

``ESPRELAY_PROVIDER=example`` with ``ESPRELAY_EXAMPLE_URL`` and ``ESPRELAY_EXAMPLE_TOKEN``:
each message is POSTed as ``{"from": ..., "to": [...], "raw": base64}`` with a bearer
token, and the answer's ``{"id": ...}`` is the provider's message id.
"""

from __future__ import annotations

import base64

import httpx
from pydantic import SecretStr

from esprelay.message.rawmime import strip_bcc
from esprelay.models import OutboundMessage, SendResult
from esprelay.providers import Built, HttpProvider, ProviderKind, ProviderSettings
from esprelay.providers.base import json_body


class ExampleSettings(ProviderSettings):
    url: str
    token: SecretStr

    def api_urls(self) -> tuple[str, ...]:
        return (self.url,)


class ExampleProvider(HttpProvider):
    kind = "example"

    def __init__(self, client: httpx.AsyncClient, settings: ExampleSettings) -> None:
        super().__init__(client)
        self.settings = settings

    def build_request(self, message: OutboundMessage) -> Built:
        stripped = strip_bcc(message.raw)
        body = {
            "from": message.envelope.mail_from,
            "to": list(message.envelope.rcpt_tos),
            "raw": base64.b64encode(stripped.raw).decode("ascii"),
        }
        headers = {
            "Authorization": f"Bearer {self.settings.token.get_secret_value()}",
            "Content-Type": "application/json",
        }
        request = httpx.Request("POST", self.settings.url, content=json_body(body), headers=headers)
        return Built(request, stripped.warnings)

    def parse_response(self, response: httpx.Response, message: OutboundMessage) -> SendResult:
        return SendResult(provider_message_id=str(response.json()["id"]))


def build(settings: ExampleSettings, client: httpx.AsyncClient) -> ExampleProvider:
    return ExampleProvider(client, settings)


KIND = ProviderKind("example", ExampleSettings, build, "the example provider of the tests")
