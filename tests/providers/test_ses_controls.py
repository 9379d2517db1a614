"""SES's SMTP-interface control headers (X-SES-*): what the SendEmail request carries
for each, what is left of the raw message, what is refused at the end of DATA; checked
offline, against moto's SES, against a fake SES that checks the request as SES's API
reference documents it, and end to end through a real relay."""

from __future__ import annotations

import base64
import re
import smtplib
from pathlib import Path
from typing import Any

import botocore.session
import httpx
import pytest
from botocore.credentials import Credentials
from botocore.validate import ParamValidator

from esprelay.errors import MessageRejected
from esprelay.models import Envelope, OutboundMessage
from esprelay.providers import ses as ses_module
from esprelay.testing.fakeesp import FakeESP, Recorded, Reply
from tests.providers.test_ses import (
    FAKE_KEY,
    FAKE_SECRET,
    SENDER,
    Moto,
    fake_ses,
    moto,
    provider,
    raw_data,
    ses_env,
    ses_error,
)
from tests.relayproc import RelayProcess
from tests.test_e2e_smtp import queued_id, send_raw

__all__ = ["moto"]  # the module-scoped moto server fixture of test_ses, shared here

BODY = b"\r\nHello from the app.\r\nX-SES-CONFIGURATION-SET: not a header, body text\r\n"
TOP = b"From: App <app@example.com>\r\nTo: ops@example.org\r\nSubject: controls\r\n"
ARNS = (
    b"X-SES-SOURCE-ARN: arn:aws:ses:eu-west-1:123456789012:identity/example.com\r\n"
    b"X-SES-FROM-ARN: arn:aws:ses:*:123456789012:identity/app@example.com\r\n"
    b"X-SES-RETURN-PATH-ARN: arn:aws:ses:eu-west-1:123456789012:identity/example.com\r\n"
)


#: esprelay's id as the tag it travels as (tests/providers/test_stamp.py for the rules).
OURS = {"Name": "esprelay_id", "Value": "m1"}


def message(*fields: bytes, rcpts: tuple[str, ...] = ("ops@example.org",)) -> OutboundMessage:
    return OutboundMessage("m1", Envelope(SENDER, rcpts), TOP + b"".join(fields) + BODY)


def build(msg: OutboundMessage, **kw: Any) -> tuple[dict[str, Any], bytes, tuple[str, ...]]:
    built = provider(httpx.AsyncClient(), **kw).build_request(msg)
    payload = httpx.Response(200, content=built.request.read()).json()
    assert send_email_problems(payload) == []
    return payload, raw_data(built.request), built.warnings


# -- SendEmail as SES's API reference documents it --------------------------------------

_SENDEMAIL = botocore.session.get_session().get_service_model("sesv2").operation_model("SendEmail")
# Restated from SES's documentation, independently of the adapter: MessageTag Name and
# Value (API reference v2, MessageTag) and configuration set names (SES quotas page).
_DOCUMENTED_TAG = re.compile(r"[A-Za-z0-9_-]{1,256}")
_DOCUMENTED_SET = re.compile(r"[A-Za-z0-9_-]{1,64}")


def send_email_problems(payload: dict[str, Any]) -> list[str]:
    """What SES would object to in a SendEmail body: botocore's model of SES v2 (names,
    types, required members), then the documented rules the model does not encode."""
    report = ParamValidator().validate(payload, _SENDEMAIL.input_shape)
    problems = [report.generate_report()] if report.has_errors() else []
    for tag in payload.get("EmailTags", []):
        problems += [f"tag {tag}" for v in tag.values() if not _DOCUMENTED_TAG.fullmatch(v)]
    name = payload.get("ConfigurationSetName")
    if name is not None and not _DOCUMENTED_SET.fullmatch(name):
        problems.append(f"configuration set {name!r}")
    return problems


def checked_ses(request: Recorded) -> Reply:
    """test_ses's fake SES (signature, path, recipients, size), plus the checks above."""
    reply = fake_ses(request)
    if reply.status == 200 and (problems := send_email_problems(request.json())):
        return ses_error(400, "BadRequestException", "; ".join(problems))
    return reply


# -- the request, offline, one header at a time ----------------------------------------


def test_configuration_set_header_overrides_the_configured_one() -> None:
    header = b"X-SES-CONFIGURATION-SET: per-message_set\r\n"
    payload, sent, warnings = build(message(header), configuration_set="default-set")
    assert payload["ConfigurationSetName"] == "per-message_set"
    assert payload["EmailTags"] == [OURS]  # esprelay's id alone
    assert sent == TOP + BODY  # the header is gone, every other byte kept
    assert warnings == ()
    payload, _, _ = build(message(), configuration_set="default-set")
    assert payload["ConfigurationSetName"] == "default-set"


def test_message_tags_header_becomes_email_tags() -> None:
    header = b"X-SES-MESSAGE-TAGS: campaign=spring-sale,\r\n\tuser_id=42 ,tier = Gold_1\r\n"
    payload, sent, warnings = build(message(header))
    assert payload["EmailTags"] == [
        {"Name": "campaign", "Value": "spring-sale"},
        {"Name": "user_id", "Value": "42"},
        {"Name": "tier", "Value": "Gold_1"},
        OURS,
    ]
    assert "ConfigurationSetName" not in payload
    assert sent == TOP + BODY
    assert warnings == ()


def test_both_headers_anywhere_in_the_header_in_any_case() -> None:
    fields = (
        b"x-ses-message-tags: a=1\r\n",
        b"Reply-To: help@example.com\r\n",
        b"X-Ses-Configuration-Set: marketing\r\n",
    )
    payload, sent, _ = build(message(*fields), configuration_set="default-set")
    assert payload["ConfigurationSetName"] == "marketing"
    assert payload["EmailTags"] == [{"Name": "a", "Value": "1"}, OURS]
    assert sent == TOP + b"Reply-To: help@example.com\r\n" + BODY


def test_first_of_repeated_headers_counts_and_all_are_removed() -> None:
    fields = (
        b"X-SES-CONFIGURATION-SET: first\r\n",
        b"X-SES-MESSAGE-TAGS: a=1\r\n",
        b"X-SES-CONFIGURATION-SET: second\r\n",
        b"X-SES-MESSAGE-TAGS: not tags at all\r\n",  # ignored, as SES ignores it
    )
    msg = message(*fields)
    assert provider(httpx.AsyncClient()).refusal(msg) is None
    payload, sent, warnings = build(msg)
    assert payload["ConfigurationSetName"] == "first"
    assert payload["EmailTags"] == [{"Name": "a", "Value": "1"}, OURS]
    assert sent == TOP + BODY
    assert warnings == (
        "X-SES-CONFIGURATION-SET given 2 times: the first is used, as SES does",
        "X-SES-MESSAGE-TAGS given 2 times: the first is used, as SES does",
    )


def test_authorization_arn_headers_stay_for_ses_to_apply() -> None:
    """SendEmail v2 applies X-SES-SOURCE-ARN/-FROM-ARN from raw content and SES removes
    them: the message goes as it is, with no ARN field in the request."""
    msg = message(ARNS)
    payload, sent, warnings = build(msg)
    assert set(payload) == {"FromEmailAddress", "Destination", "Content", "EmailTags"}
    assert sent == msg.raw
    assert warnings == ()


def test_a_message_without_control_headers_is_not_parsed_for_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The common message costs one scan of its header bytes: the header reader is never
    called for it (a body line that looks like a control header does not count)."""

    def no_header_reading(*args: Any, **kw: Any) -> Any:
        raise AssertionError("the header was read")

    monkeypatch.setattr(ses_module, "read_header", no_header_reading)
    msg = message(b"X-SESSION: not a control header\r\n")
    ses = provider(httpx.AsyncClient(), configuration_set="default-set")
    assert ses.refusal(msg) is None
    payload, sent, warnings = build(msg, configuration_set="default-set")
    assert payload["ConfigurationSetName"] == "default-set"
    assert sent == msg.raw and warnings == ()


@pytest.mark.parametrize(
    ("raw", "found"),
    [
        (b"X-SES-MESSAGE-TAGS: a=1\r\nFrom: a@example.com\r\n\r\nbody\r\n", True),
        (b"From: a@example.com\nX-SES-MESSAGE-TAGS: a=1\n\nbody\n", True),  # LF only
        (b"X-SES-MESSAGE-TAGS : a=1\r\n\r\n", True),  # obsolete form, as remove_fields
        (b"From: a@example.com\r\n\r\nX-SES-MESSAGE-TAGS: a=1\r\n", False),  # body
        (b"From: a@example.com\nX-SES-MESSAGE-TAGS: a=1\r\n", True),  # no body
        # A line that is not a field ends the header (esprelay.message.header).
        (b"From: a@example.com\r\nnot a field\r\nX-SES-MESSAGE-TAGS: a=1\r\n\r\n", False),
    ],
)
def test_only_the_top_level_header_counts(raw: bytes, found: bool) -> None:
    controls = ses_module.read_controls(raw)
    assert (controls is not None and controls.tags == (("a", "1"),)) is found


# -- what is refused at the end of DATA --------------------------------------------------

LONG = "x" * 257


@pytest.mark.parametrize(
    ("field", "reason"),
    [
        (b"X-SES-CONFIGURATION-SET:\r\n", "X-SES-CONFIGURATION-SET is empty"),
        (b"X-SES-CONFIGURATION-SET:   \r\n", "X-SES-CONFIGURATION-SET is empty"),
        (b"X-SES-CONFIGURATION-SET: my set\r\n",
         "X-SES-CONFIGURATION-SET 'my set' is not a configuration set name (1 to 64"),
        (b"X-SES-CONFIGURATION-SET: " + b"s" * 65 + b"\r\n", "is not a configuration set name"),
        (b"X-SES-CONFIGURATION-SET: caf\xc3\xa9\r\n", "is not a configuration set name"),
        (b"X-SES-MESSAGE-TAGS: campaign\r\n",
         "X-SES-MESSAGE-TAGS: 'campaign' is not name=value"),
        (b"X-SES-MESSAGE-TAGS:\r\n", "X-SES-MESSAGE-TAGS: '' is not name=value"),
        (b"X-SES-MESSAGE-TAGS: a=1, \r\n", "X-SES-MESSAGE-TAGS: '' is not name=value"),
        (b"X-SES-MESSAGE-TAGS: a=1; b=2\r\n",
         "X-SES-MESSAGE-TAGS: tag value '1; b=2' is not 1 to 256 ASCII letters"),
        (b"X-SES-MESSAGE-TAGS: =1\r\n", "X-SES-MESSAGE-TAGS: '=1' is not name=value"),
        (b"X-SES-MESSAGE-TAGS: a=\r\n", "tag value '' is not 1 to 256 ASCII"),
        (b"X-SES-MESSAGE-TAGS: user=a@example.com\r\n", "tag value 'a@example.com' is not"),
        (b"X-SES-MESSAGE-TAGS: v1.2=x\r\n", "tag name 'v1.2' is not"),
        (b"X-SES-MESSAGE-TAGS: a=" + LONG.encode() + b"\r\n", "tag value 'xxxx"),
        (b"X-SES-MESSAGE-TAGS: " + LONG.encode() + b"=a\r\n", "tag name 'xxxx"),
        (b"X-SES-MESSAGE-TAGS: a=1, a=2\r\n", "X-SES-MESSAGE-TAGS: tag 'a' is given twice"),
        (b"X-SES-SOURCE-ARN: example.com\r\n",
         "X-SES-SOURCE-ARN 'example.com' is not an SES identity ARN"),
        (b"X-SES-FROM-ARN: arn:aws:iam::123456789012:user/app\r\n",
         "X-SES-FROM-ARN 'arn:aws:iam::123456789012:user/app' is not an SES identity ARN"),
        (b"X-SES-RETURN-PATH-ARN:\r\n", "X-SES-RETURN-PATH-ARN '' is not an SES identity ARN"),
    ],
)  # fmt: skip
def test_malformed_control_headers_are_refused(field: bytes, reason: str) -> None:
    msg = message(b"X-SES-CONFIGURATION-SET: fine\r\n" if b"CONFIG" not in field else b"", field)
    ses = provider(httpx.AsyncClient())
    refusal = ses.refusal(msg)
    assert refusal is not None and reason in refusal
    assert refusal.isascii() and "\n" not in refusal and len(refusal) < 200
    # One spooled before the check existed fails at once, with the same reason.
    with pytest.raises(MessageRejected) as info:
        ses.build_request(msg)
    assert str(info.value) == f"{refusal} (provider=ses)"


@pytest.mark.parametrize(
    "field",
    [
        b"X-SES-CONFIGURATION-SET: " + b"s" * 64 + b"\r\n",
        b"X-SES-MESSAGE-TAGS: a=" + b"x" * 256 + b", " + b"n" * 256 + b"=1\r\n",
        b"X-SES-MESSAGE-TAGS: A-Z_a-z=0-9\r\n",
        ARNS,
        b"X-SES-TENANT: anything\r\n",  # not read by esprelay: left in the message for SES
    ],
)
def test_well_formed_control_headers_pass(field: bytes) -> None:
    msg = message(field)
    assert provider(httpx.AsyncClient()).refusal(msg) is None
    build(msg)  # and the request passes the documented checks


# -- moto's SES takes the request -----------------------------------------------------


async def test_moto_accepts_configuration_set_and_tags(moto: Moto) -> None:
    """moto's SendEmail ignores ConfigurationSetName and EmailTags (send_email_problems
    checks them above); that it answers 200 to the signed request, with the headers gone
    from what it stored, is what it can show."""
    msg = message(
        b"X-SES-CONFIGURATION-SET: transactional\r\n", b"X-SES-MESSAGE-TAGS: kind=receipt\r\n"
    )
    async with httpx.AsyncClient() as client:
        ses = provider(client, moto.url, credentials=lambda: Credentials(moto.key_id, moto.secret))
        result = await ses.send(msg)
    (stored,) = [m for m in moto.sent() if m["id"] == result.provider_message_id]
    assert stored["raw_data"].encode() == TOP + BODY
    assert result.warnings == ()


# -- end to end through a relay ---------------------------------------------------------


def data_reply(relay: RelayProcess, raw: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        assert smtp.mail(SENDER)[0] == 250
        assert smtp.rcpt("ops@example.org")[0] == 250
        return smtp.data(raw)


def test_relay_translates_control_headers_and_refuses_malformed_ones(
    relay_factory: type[RelayProcess], tmp_path: Path
) -> None:
    with FakeESP(checked_ses) as esp:
        env = ses_env(esp.url, FAKE_KEY, FAKE_SECRET, tmp_path)
        relay = relay_factory({**env, "ESPRELAY_SES_CONFIGURATION_SET": "default-set"}).start()

        bad = message(b"X-SES-MESSAGE-TAGS: campaign=spring sale\r\n").raw
        code, reply = data_reply(relay, bad)
        assert code == 550
        assert reply.decode().startswith(
            "5.6.0 ses: X-SES-MESSAGE-TAGS: tag value 'spring sale' is not 1 to 256"
        )
        code, reply = data_reply(relay, message(b"X-SES-CONFIGURATION-SET:\r\n").raw)
        assert (code, reply) == (550, b"5.6.0 ses: X-SES-CONFIGURATION-SET is empty")

        good = message(
            b"X-SES-CONFIGURATION-SET: per-message\r\n",
            b"X-SES-MESSAGE-TAGS: campaign=spring-sale, user_id=42\r\n",
        )
        message_id = queued_id(send_raw(relay, SENDER, ["ops@example.org"], good.raw))
        relay.wait_for_log(rf"delivered id={message_id} provider=ses attempt=1")

    # Nothing of the refused messages was queued or sent: one request, the good one.
    (request,) = esp.requests
    payload = request.json()
    assert payload["ConfigurationSetName"] == "per-message"
    assert payload["EmailTags"] == [
        {"Name": "campaign", "Value": "spring-sale"},
        {"Name": "user_id", "Value": "42"},
        {"Name": "esprelay_id", "Value": message_id},  # the spool id, for the events
    ]
    assert base64.b64decode(payload["Content"]["Raw"]["Data"]) == TOP + BODY
    assert len(re.findall(r"not accepted: .*ses: X-SES-", relay.log)) == 2
