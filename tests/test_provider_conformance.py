"""Every built-in HTTP provider passes the shared adapter checks of the test kit
(``esprelay.testing.conformance``), as a third-party provider's tests would call them."""

from __future__ import annotations

import base64
import email.policy
import json
import sys
from email.message import Message
from email.parser import BytesParser
from email.utils import getaddresses, parseaddr
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from botocore.credentials import Credentials
from pydantic import SecretStr

from esprelay.message.rawmime import strip_bcc
from esprelay.providers.base import HttpProvider
from esprelay.providers.brevo import BrevoProvider
from esprelay.providers.graph import GraphProvider
from esprelay.providers.graphauth import TokenSource
from esprelay.providers.http import HttpApiProvider, HttpApiSettings
from esprelay.providers.mailgun import MailgunProvider
from esprelay.providers.mailjet import MailjetProvider
from esprelay.providers.postmark import PostmarkProvider
from esprelay.providers.resend import ResendProvider
from esprelay.providers.sendgrid import SendGridProvider
from esprelay.providers.ses import SesProvider
from esprelay.providers.sparkpost import SparkPostProvider
from esprelay.testing.conformance import Probe, check_adapter, check_errors
from esprelay.testing.fakeesp import Recorded
from tests.providers.test_mailgun import form_fields


def _recorded(request: httpx.Request) -> Recorded:
    headers = {k.lower(): v for k, v in request.headers.items()}
    return Recorded(request.method, request.url.path, {}, headers, request.read())


def _mime_sender(raw: bytes) -> str:
    return parseaddr(str(BytesParser(policy=email.policy.compat32).parsebytes(raw)["From"]))[1]


def _sendgrid() -> tuple[HttpProvider, Probe]:
    def recipients(request: httpx.Request) -> set[str]:
        body = json.loads(request.read())
        return {
            box["email"]
            for p in body["personalizations"]
            for field in ("to", "cc", "bcc")
            for box in p.get(field, [])
        }

    provider = SendGridProvider(httpx.AsyncClient(), SecretStr("SG.k"), "http://127.0.0.1:9")
    return provider, Probe(recipients, lambda r: json.loads(r.read())["from"]["email"])


def _postmark() -> tuple[HttpProvider, Probe]:
    def recipients(request: httpx.Request) -> set[str]:
        body = json.loads(request.read())
        values = [body[f] for f in ("To", "Cc", "Bcc") if body.get(f)]
        return {address for _, address in getaddresses(values)}

    provider = PostmarkProvider(httpx.AsyncClient(), SecretStr("pm"), "http://127.0.0.1:9")
    return provider, Probe(recipients, lambda r: parseaddr(json.loads(r.read())["From"])[1])


def _mailgun() -> tuple[HttpProvider, Probe]:
    def field(request: httpx.Request, name: str) -> list[bytes]:
        return [v for n, _, v in form_fields(_recorded(request)) if n == name]

    provider = MailgunProvider(
        httpx.AsyncClient(), api_key=SecretStr("k"), domain="mg.example.com", api_url="http://x"
    )
    return provider, Probe(
        recipients=lambda r: {v.decode() for v in field(r, "to")},
        sender=lambda r: _mime_sender(field(r, "message")[0]),
        shown=lambda r: field(r, "message")[0],
    )


def _ses() -> tuple[HttpProvider, Probe]:
    def raw(request: httpx.Request) -> bytes:
        return base64.b64decode(json.loads(request.read())["Content"]["Raw"]["Data"])

    provider = SesProvider(
        httpx.AsyncClient(),
        region="eu-west-1",
        endpoint_url="http://127.0.0.1:9",
        credentials=lambda: Credentials("AKID", "secret"),
    )
    return provider, Probe(
        recipients=lambda r: set(json.loads(r.read())["Destination"]["ToAddresses"]),
        sender=lambda r: _mime_sender(raw(r)),
        shown=raw,
    )


def _http() -> tuple[HttpProvider, Probe]:
    def raw(request: httpx.Request) -> bytes:
        return base64.b64decode(json.loads(request.read())["raw"])

    settings = HttpApiSettings(
        api_url="http://127.0.0.1:9/in",
        api_secret=SecretStr("whsec_" + base64.b64encode(b"k" * 32).decode()),
        api_parsed=True,
    )
    return HttpApiProvider(httpx.AsyncClient(), settings), Probe(
        recipients=lambda r: set(json.loads(r.read())["envelope"]["rcpt_to"]),
        sender=lambda r: _mime_sender(raw(r)),
        shown=raw,
    )


def _resend() -> tuple[HttpProvider, Probe]:
    def emails(request: httpx.Request) -> list[dict[str, Any]]:
        body = json.loads(request.read())
        return body if isinstance(body, list) else [body]  # /emails/batch or /emails

    def recipients(request: httpx.Request) -> set[str]:
        values = [v for e in emails(request) for f in ("to", "cc", "bcc") for v in e.get(f, [])]
        return {address for _, address in getaddresses(values)}

    def sender(request: httpx.Request) -> str:
        (address,) = {parseaddr(e["from"])[1] for e in emails(request)}
        return address

    provider = ResendProvider(httpx.AsyncClient(), SecretStr("re_k"), "http://127.0.0.1:9")
    return provider, Probe(recipients, sender)


def _brevo() -> tuple[HttpProvider, Probe]:
    def recipients(request: httpx.Request) -> set[str]:
        body = json.loads(request.read())
        versions = [body, *body.get("messageVersions", [])]
        return {p["email"] for v in versions for f in ("to", "cc", "bcc") for p in v.get(f, [])}

    provider = BrevoProvider(httpx.AsyncClient(), SecretStr("xkeysib-k"), "http://127.0.0.1:9")
    return provider, Probe(recipients, lambda r: json.loads(r.read())["sender"]["email"])


def _mailjet() -> tuple[HttpProvider, Probe]:
    def messages(request: httpx.Request) -> list[dict[str, Any]]:
        body = json.loads(request.read())
        return [{**body.get("Globals", {}), **m} for m in body["Messages"]]

    def recipients(request: httpx.Request) -> set[str]:
        return {
            p["Email"] for m in messages(request) for f in ("To", "Cc", "Bcc") for p in m.get(f, [])
        }

    def sender(request: httpx.Request) -> str:
        (address,) = {m["From"]["Email"] for m in messages(request)}
        return address

    provider = MailjetProvider(
        httpx.AsyncClient(), SecretStr("k"), SecretStr("s"), "http://127.0.0.1:9"
    )
    return provider, Probe(recipients, sender)


def _sparkpost() -> tuple[HttpProvider, Probe]:
    # recipients[].address.email is the envelope; the To header is not built for
    # email_rfc822 content: recipients see the message as sent.
    def raw(request: httpx.Request) -> bytes:
        return str(json.loads(request.read())["content"]["email_rfc822"]).encode("utf-8")

    provider = SparkPostProvider(httpx.AsyncClient(), SecretStr("k"), "http://127.0.0.1:9")
    return provider, Probe(
        recipients=lambda r: {p["address"]["email"] for p in json.loads(r.read())["recipients"]},
        sender=lambda r: _mime_sender(raw(r)),
        shown=raw,
    )


def _graph() -> tuple[HttpProvider, Probe]:
    # Graph sends to the To, Cc and Bcc addresses of the MIME, and Exchange removes the
    # Bcc field from what it delivers ([MS-OXCMAIL] 2.1.3.1.1.2): that is what is shown.
    def mime(request: httpx.Request) -> Message:
        return BytesParser(policy=email.policy.compat32).parsebytes(
            base64.b64decode(request.read())
        )

    def recipients(request: httpx.Request) -> set[str]:
        parsed = mime(request)
        values = [str(v) for name in ("To", "Cc", "Bcc") for v in parsed.get_all(name, [])]
        return {address for _, address in getaddresses(values) if address}

    def shown(request: httpx.Request) -> bytes:
        return strip_bcc(base64.b64decode(request.read())).raw

    client = httpx.AsyncClient()
    tokens = TokenSource(
        client, url="http://127.0.0.1:9/t", client_id="c", scope="s", secret=SecretStr("x")
    )
    provider = GraphProvider(client, tokens=tokens, api_url="http://127.0.0.1:9")
    return provider, Probe(
        recipients=recipients,
        sender=lambda r: unquote(r.url.path.split("/")[-2]),
        shown=shown,
    )


def _example() -> tuple[HttpProvider, Probe]:
    sys.path.insert(0, str(Path(__file__).parent / "plugin"))
    try:
        import esprelay_example_provider as example
    finally:
        sys.path.pop(0)
    settings = example.ExampleSettings(url="http://127.0.0.1:9/send", token=SecretStr("t"))
    return example.ExampleProvider(httpx.AsyncClient(), settings), Probe(
        recipients=lambda r: set(json.loads(r.read())["to"]),
        sender=lambda r: _mime_sender(base64.b64decode(json.loads(r.read())["raw"])),
        shown=lambda r: base64.b64decode(json.loads(r.read())["raw"]),
    )


ADAPTERS = {
    "sendgrid": _sendgrid,
    "postmark": _postmark,
    "mailgun": _mailgun,
    "ses": _ses,
    "http": _http,
    "resend": _resend,
    "brevo": _brevo,
    "mailjet": _mailjet,
    "graph": _graph,
    "sparkpost": _sparkpost,
    "example": _example,
}


@pytest.mark.parametrize("name", ADAPTERS)
def test_request_builder_contract(name: str) -> None:
    provider, probe = ADAPTERS[name]()
    check_adapter(provider, probe)


@pytest.mark.parametrize("name", ADAPTERS)
def test_errors_map_onto_the_tree(name: str) -> None:
    provider, _ = ADAPTERS[name]()
    check_errors(provider)
