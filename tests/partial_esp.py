"""A provider for the tests only: it answers per recipient, as SparkPost and Mailjet do.

``ESPRELAY_PARTIALESP_URL``: each message is POSTed there as ``{"from": ..., "to":
[...], "raw": base64}``; the answer ``{"id": ..., "refused": [{"rcpt": ..., "permanent":
bool, "error": ..., "retry_after": seconds}]}`` names the recipients refused while the
others were accepted (``SendResult.rejected``).  tests/test_e2e_partial.py registers it
under the ``esprelay.providers`` entry points for a relay process of its own.
"""

from __future__ import annotations

import base64

import httpx

from esprelay.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from esprelay.models import OutboundMessage, SendResult
from esprelay.providers import Built, HttpProvider, ProviderKind, ProviderSettings
from esprelay.providers.base import json_body, json_object


class PartialSettings(ProviderSettings):
    url: str

    def api_urls(self) -> tuple[str, ...]:
        return (self.url,)


class PartialProvider(HttpProvider):
    kind = "partialesp"

    def __init__(self, client: httpx.AsyncClient, settings: PartialSettings) -> None:
        super().__init__(client)
        self.settings = settings

    def build_request(self, message: OutboundMessage) -> Built:
        body = {
            "from": message.envelope.mail_from,
            "to": list(message.envelope.rcpt_tos),
            "raw": base64.b64encode(message.raw).decode("ascii"),
        }
        request = httpx.Request(
            "POST",
            self.settings.url,
            content=json_body(body),
            headers={"Content-Type": "application/json"},
        )
        # A warning of the build travels with the per-recipient result.
        return Built(request, ("built by the test provider",))

    def parse_response(self, response: httpx.Response, message: OutboundMessage) -> SendResult:
        answer = json_object(response) or {}
        rejected: list[tuple[str, DeliveryError]] = []
        for item in answer.get("refused", []):
            kind = PermanentDeliveryError if item["permanent"] else TransientDeliveryError
            error = kind(item["error"], provider=self.name, retry_after=item.get("retry_after"))
            rejected.append((item["rcpt"], error))
        return SendResult(provider_message_id=str(answer["id"]), rejected=tuple(rejected))


def build(settings: PartialSettings, client: httpx.AsyncClient) -> PartialProvider:
    return PartialProvider(client, settings)


KIND = ProviderKind("partialesp", PartialSettings, build, "per-recipient answers (tests)")
