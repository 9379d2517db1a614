"""Internationalised envelope addresses for ESPs that take ASCII only."""

from __future__ import annotations

import pytest

from esprelay.dispatch import ProviderSet
from esprelay.errors import MessageRejected
from esprelay.message.idn import ascii_address, ascii_message
from esprelay.models import Envelope, OutboundMessage, SendResult
from esprelay.providers.base import Provider
from esprelay.providers.mailgun import MailgunProvider
from esprelay.providers.outbox import OutboxProvider
from esprelay.providers.postmark import PostmarkProvider
from esprelay.providers.sendgrid import SendGridProvider
from esprelay.providers.ses import SesProvider


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("a@example.com", "a@example.com"),
        ("", ""),
        ("a@bücher.de", "a@xn--bcher-kva.de"),
        ("a@Bücher.DE", "a@xn--bcher-kva.de"),
        ("a@straße.de", "a@xn--strae-oqa.de"),  # IDNA 2008: not strasse.de (IDNA 2003)
        ("a@例え.テスト", "a@xn--r8jz45g.xn--zckzah"),
        ("josé@example.com", None),  # a UTF-8 local part has no ASCII form
        ("a@exa mple.de\u00e9", None),
        ("a@\u00e9-.de", None),  # IDNA refuses a label ending with a hyphen
        ("a@\u2603.de", None),  # nor a symbol (a snowman): IDNA 2008 disallows it
    ],
)
def test_ascii_address(address: str, expected: str | None) -> None:
    assert ascii_address(address) == expected


def test_ascii_message_converts_every_domain_and_keeps_order() -> None:
    message = OutboundMessage(
        "m1", Envelope("s@bücher.de", ("a@example.org", "b@münchen.de")), b"raw"
    )
    converted = ascii_message(message, "sg")
    assert converted.envelope == Envelope(
        "s@xn--bcher-kva.de", ("a@example.org", "b@xn--mnchen-3ya.de")
    )
    assert (converted.id, converted.raw) == ("m1", b"raw")
    ascii_only = OutboundMessage("m2", Envelope("", ("a@example.org",)), b"raw")
    assert ascii_message(ascii_only, "sg") is ascii_only


def test_ascii_message_refuses_a_utf8_local_part_naming_it() -> None:
    message = OutboundMessage("m", Envelope("s@example.com", ("a@x.org", "josé@x.org")), b"r")
    with pytest.raises(MessageRejected, match=r"<josé@x\.org>") as caught:
        ascii_message(message, "sg")
    assert caught.value.provider == "sg"


def test_which_esps_take_utf8_addresses() -> None:
    """As their documentation says (README, "SMTPUTF8")."""
    assert MailgunProvider.smtputf8 and OutboxProvider.smtputf8
    assert not (SendGridProvider.smtputf8 or PostmarkProvider.smtputf8 or SesProvider.smtputf8)
    assert not Provider.smtputf8  # a provider that does not say: ASCII


class _Recording(Provider):
    kind = "recording"

    def __init__(self, name: str, smtputf8: bool) -> None:
        super().__init__(name)
        self.smtputf8 = smtputf8
        self.sent: list[Envelope] = []

    async def send(self, message: OutboundMessage) -> SendResult:
        self.sent.append(message.envelope)
        return SendResult("id")


async def test_dispatch_gives_ascii_providers_punycode_and_others_utf8() -> None:
    ascii_only = _Recording("ascii", smtputf8=False)
    utf8 = _Recording("utf8", smtputf8=True)
    providers = ProviderSet({"ascii": ascii_only, "utf8": utf8})
    envelope = Envelope("s@example.com", ("a@bücher.de",))
    await providers.send(OutboundMessage("m", envelope, b"raw"), ["ascii"])
    await providers.send(OutboundMessage("m", envelope, b"raw"), ["utf8"])
    assert ascii_only.sent == [Envelope("s@example.com", ("a@xn--bcher-kva.de",))]
    assert utf8.sent == [envelope]


async def test_dispatch_fails_a_utf8_local_part_permanently_without_calling_the_esp() -> None:
    ascii_only = _Recording("ascii", smtputf8=False)
    providers = ProviderSet({"ascii": ascii_only})
    message = OutboundMessage("m", Envelope("josé@example.com", ("a@example.org",)), b"raw")
    with pytest.raises(MessageRejected):
        await providers.send(message, ["ascii"])
    assert ascii_only.sent == []
